"""Correct-and-fine-tune as a user does it (issue 14): segment, erase a false object (bright
debris) with napari's editing path, fine-tune briefly, segment again: the corrected region follows
the correction."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _wait_worker(qtbot, widget, timeout=300_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def _false_object(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Paint a bright 6 x 30 px streak into a background area of ``image``; its mask."""
    from scipy import ndimage

    near = ndimage.binary_dilation(truth > 0, iterations=4)
    for y in range(4, 128 - 10, 2):
        for x in range(4, 128 - 34, 2):
            if not near[y : y + 6, x : x + 30].any():
                mask = np.zeros(image.shape, bool)
                mask[y : y + 6, x : x + 30] = True
                image[mask] = np.percentile(image[truth > 0], 90)
                return mask
    raise AssertionError("no background area for the streak")


def test_erasing_an_object_teaches_the_model(make_napari_viewer, qtbot, monkeypatch):
    import dataclasses

    import tifffile

    from napari_s2mnet._qt import _layers
    from napari_s2mnet._qt._session import get_session
    from napari_s2mnet._sample_data import SAMPLE_DIR
    from napari_s2mnet.checkpoint import load_default_model

    viewer = make_napari_viewer(show=True)
    image = tifffile.imread(SAMPLE_DIR / "dsb2018_nuclei.tif")[:128, :128].astype(np.float32)
    truth = tifffile.imread(SAMPLE_DIR / "dsb2018_nuclei_labels.tif")[:128, :128]
    streak = _false_object(image, truth)  # bright debris the model takes for a nucleus
    layer = viewer.add_image(image, name="crop")
    _, seg = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Fine-tune", tabify=True)
    get_session(viewer).set_active(load_default_model(), "bundled")

    # Eager torch: a compiled backend would export each fine-tuned model again (slow here).
    config = seg.config
    monkeypatch.setattr(seg, "config", lambda: dataclasses.replace(config(), backend="torch"))
    seg.image.value = layer
    seg.run_button.native.click()
    _wait_worker(qtbot, seg)
    before = viewer.layers[-1]
    ids = np.unique(before.data[streak])
    ids = ids[ids > 0]
    assert ids.size, "the model did not take the debris for an object: nothing to correct"
    where = np.isin(before.data, ids)  # the false object(s) the user deletes

    # Erase it with napari's own editing path (a paint event, as the eraser makes).
    before.visible = True
    yy, xx = np.nonzero(where)
    before.data_setitem((yy, xx), 0)
    painted = _layers.info(before).painted
    assert painted is not None and painted[where].all() and painted.sum() == where.sum()
    qtbot.waitUntil(lambda: any(lab is before for _, lab in ft.selected_pairs()), timeout=5000)

    # A short budget in steps (not seconds: the test must not depend on the machine's load).
    ft.budget_mode.value = "epochs"
    ft.budget_value.value = 6
    ft.advanced["crop_size"].value = 64
    ft.advanced["lr"].value = 1e-3
    ft.run()
    _wait_worker(qtbot, ft)
    result = ft.last_result
    assert result is not None and result.steps == 60
    assert ft.plot.n_points >= 1 and ft.plot.steps[0] == 1  # loss points from the first step
    assert result.corrected_before is not None and result.corrected_after is not None
    assert "regions you corrected" in ft.status.text()

    seg.image.value = layer
    seg.run_button.native.click()
    _wait_worker(qtbot, seg)
    after = viewer.layers[-1]
    assert after is not before
    # The deleted object is (mostly) gone, and the model still finds the real ones.
    assert not result.kept_previous, result.message
    assert get_session(viewer).active() is result.bundle
    assert (after.data[where] > 0).mean() < 0.5
    assert (after.data[~where] > 0).sum() > 0.5 * (before.data[~where] > 0).sum()
