"""Drive the widgets as a user would, in a real napari window under Xvfb."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from napari_s2mnet.inference import InferenceConfig
from napari_s2mnet.training import FinetuneConfig

pytestmark = pytest.mark.gui


def _wait_worker(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_widget_defaults_equal_config_defaults(viewer_with_plugin, monkeypatch):
    _, seg, ft, _ = viewer_with_plugin
    inf_defaults = {f.name: f.default for f in dataclasses.fields(InferenceConfig)}
    for w in seg.advanced:
        assert w.value == inf_defaults[w.name], w.name
    assert seg.device.value == InferenceConfig().device
    # Fine-tune shows the interactive preset (issue 14: a time budget, small CPU crops), which
    # FinetuneConfig.interactive defines: no widget-only values.
    preset = FinetuneConfig.interactive("cpu")
    for w in [*ft.advanced, *ft.main_form]:
        assert w.value == getattr(preset, w.name), w.name
    cfg = ft.config()
    assert ft.budget_mode.value == "seconds"
    assert cfg.seconds == preset.seconds and cfg.epochs is None
    assert dataclasses.replace(cfg, device="cpu") == preset
    # On a GPU the seconds budget keeps the GPU preset's step cap (the measured ~210 steps).
    monkeypatch.setattr("napari_s2mnet.training.config._is_gpu", lambda device: True)
    gpu = ft.config()
    assert gpu.total_steps == FinetuneConfig.interactive("cuda").total_steps == 210
    assert gpu.seconds == preset.seconds


def test_segment_adds_labels_with_features_and_scale(viewer_with_plugin, qtbot):
    viewer, seg, _, _ = viewer_with_plugin
    image = viewer.layers["nuclei"]
    image.scale = (0.5, 0.25)
    image.translate = (10.0, 5.0)
    seg.image.value = image
    image.name = "renamed nuclei"  # the picker follows layer objects, not names
    n_before = len(viewer.layers)
    worker = seg.run()
    assert worker is not None
    _wait_worker(qtbot, seg)
    assert len(viewer.layers) == n_before + 1
    out = viewer.layers[-1]
    assert out.name == "renamed nuclei S2M-Net"
    assert out.data.shape == image.data.shape
    assert out.data.dtype.kind == "u"
    np.testing.assert_allclose(out.scale, image.scale)
    np.testing.assert_allclose(out.translate, image.translate)
    feats = out.features
    # Scale without a unit: physical columns say "units" (issue 16: units in the names).
    for col in (
        "index",
        "label",
        "area_px",
        "area_units2",
        "centroid_y_units",
        "centroid_x_units",
        "bbox_y0",
        "bbox_x1",
        "compactness",
        "tubularity",
        "irregularity",
        "area_fraction",
        "class",
        "mean_probability",
        "mean_intensity",
        "max_intensity",
        "integrated_intensity",
    ):
        assert col in feats.columns
    assert "scale" not in feats.columns and "area" not in feats.columns
    ids = np.unique(out.data)
    assert list(feats["index"]) == [int(i) for i in ids if i != 0]
    if len(feats):
        np.testing.assert_allclose(feats["area_units2"], feats["area_px"] * 0.5 * 0.25)


def test_rerun_never_overwrites_an_edited_layer(viewer_with_plugin, qtbot):
    viewer, seg, _, _ = viewer_with_plugin
    seg.image.value = viewer.layers["nuclei"]
    seg.run()
    _wait_worker(qtbot, seg)
    first = viewer.layers[-1]
    # the user paints on it
    first.data_setitem((np.array([5, 5, 6]), np.array([5, 6, 5])), 77)
    before = first.data.copy()
    seg.run()
    _wait_worker(qtbot, seg)
    second = viewer.layers[-1]
    assert second is not first
    np.testing.assert_array_equal(first.data, before)


def test_cancel_leaves_no_layer(viewer_with_plugin, qtbot):
    viewer, seg, _, _ = viewer_with_plugin
    big = np.random.default_rng(0).random((2048, 2048)).astype(np.float32)
    layer = viewer.add_image(big, name="big")
    seg.image.value = layer
    seg.advanced["tile_size"].value = 256
    n = len(viewer.layers)
    worker = seg.run()
    with qtbot.waitSignal(worker.yielded, timeout=30_000):
        pass
    t0 = time.perf_counter()
    seg.cancel()
    _wait_worker(qtbot, seg, timeout=30_000)
    assert time.perf_counter() - t0 < 20
    assert len(viewer.layers) == n
    assert "Cancelled" in seg.status.text()


def test_paint_refreshes_features(viewer_with_plugin, qtbot):
    viewer, _, _, _ = viewer_with_plugin
    gt = viewer.layers["nuclei ground truth"]
    gt.visible = True  # users paint on visible layers (napari does not slice hidden ones)
    from napari_s2mnet._qt import _layers

    _layers.refresh_features(gt, full=True)
    n0 = len(gt.features)
    assert n0 == len(np.unique(gt.data)) - 1
    new_id = int(gt.data.max()) + 1
    yy, xx = np.mgrid[100:120, 300:340]
    gt.data_setitem((yy.ravel(), xx.ravel()), new_id)
    qtbot.waitUntil(lambda: new_id in set(gt.features["label"]), timeout=5000)
    row = gt.features.set_index("label").loc[new_id]
    assert row["area_px"] == int((gt.data == new_id).sum())
    assert list(gt.features["index"]) == sorted(gt.features["index"])


def test_finetune_updates_plot_and_model_and_stops(viewer_with_plugin, qtbot):
    viewer, seg, ft, _ = viewer_with_plugin
    from napari_s2mnet._qt._session import get_session

    session = get_session(viewer)
    gt = viewer.layers["nuclei ground truth"]
    ft.update_pairs()
    ft.set_checked(gt, True)
    assert ft.selected_pairs() and ft.selected_pairs()[0][1] is gt
    ft.budget_mode.value = "seconds"
    ft.budget_value.value = 60
    ft.advanced["crop_size"].value = 128
    ft.advanced["batch_size"].value = 2
    ft.advanced["val_fraction"].value = 0.0  # no validation: the returned state is the last one
    before = session.active()
    w0 = {k: v.clone() for k, v in before.model.state_dict().items()}
    worker = ft.run()
    assert worker is not None
    qtbot.waitUntil(lambda: ft.plot.n_points >= 3, timeout=60_000)
    t0 = time.perf_counter()
    ft.stop()
    _wait_worker(qtbot, ft, timeout=30_000)
    assert time.perf_counter() - t0 < 5, "Stop must take effect at the next step"
    after = session.active()
    assert after is not before
    assert ft.last_result.stopped_reason == "cancelled"
    assert ft.last_result.steps >= 3
    changed = any(
        not np.allclose(w0[k].numpy(), v.numpy())
        for k, v in after.model.state_dict().items()
        if v.dtype.is_floating_point
    )
    assert changed
    # the previous model is untouched and Revert brings it back
    assert all(
        np.array_equal(w0[k].numpy(), v.numpy()) for k, v in before.model.state_dict().items()
    )
    assert ft.revert_button.enabled
    ft.revert()
    assert session.active() is before
    # Segment still works with the restored model
    seg.image.value = viewer.layers["nuclei"]
    seg.run()
    _wait_worker(qtbot, seg)


def test_export_and_reread(viewer_with_plugin, tmp_path):
    viewer, _, _, ex = viewer_with_plugin
    from napari_s2mnet._qt import _layers
    from napari_s2mnet.io import read_labels

    gt = viewer.layers["nuclei ground truth"]
    gt.scale = (0.3, 0.3)
    _layers.refresh_features(gt, full=True)
    ex.labels.value = gt
    for fmt in ("TIFF (Fiji)", "PNG", "NumPy"):
        ex.fmt.value = fmt
        written = ex.export(tmp_path / "gt")
        assert written, fmt
        np.testing.assert_array_equal(read_labels(written[0]), gt.data)
    import pandas as pd
    import tifffile

    from napari_s2mnet._qt.export import _safe

    with tifffile.TiffFile(tmp_path / "gt.tif") as tif:  # what Fiji reads: ImageJ, pixel size
        assert tif.is_imagej and tif.pages[0].dtype == np.uint8  # 125 labels fit in uint8
        num, den = tif.pages[0].tags["XResolution"].value
        assert num / den == pytest.approx(1 / 0.3)
    df = pd.read_csv(tmp_path / "gt_features.csv")
    expected = gt.features.reset_index(drop=True)
    pd.testing.assert_frame_equal(df[expected.columns], expected, check_dtype=False)
    # folder mode: every labels layer, each file re-read identically
    ex.all_layers.value = True
    ex.fmt.value = "TIFF (Fiji)"
    written = ex.export(tmp_path / "all")
    labels_layers = [lyr for lyr in viewer.layers if lyr._type_string == "labels"]
    tiffs = sorted(p for p in written if p.suffix == ".tif")
    assert len(tiffs) == len(labels_layers) >= 1
    for layer in labels_layers:
        (path,) = [p for p in tiffs if p.stem == _safe(layer.name)]
        np.testing.assert_array_equal(read_labels(path), layer.data)


def test_screenshot_of_whole_window(viewer_with_plugin, qtbot, tmp_path):
    """Saves a PNG of the whole window with a segmentation result (used in the docs)."""
    viewer, seg, _, _ = viewer_with_plugin
    seg.image.value = viewer.layers["nuclei"]
    seg.run()
    _wait_worker(qtbot, seg)
    path = tmp_path / "window.png"
    img = viewer.screenshot(str(path), canvas_only=False)
    assert path.exists() and img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 5  # a real picture, not a black frame


def test_segment_3d_stack_and_rgb(viewer_with_plugin, qtbot):
    """Stacks are labelled in 3-D (one row of 3-D morphology per object); RGB goes to a
    1-channel model as gray."""
    from benchmarks.fetch_data import load_nuclei3d

    viewer, seg, _, _ = viewer_with_plugin
    stack, _ = load_nuclei3d()
    layer = viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    seg.image.value = layer
    seg.run()
    # 3-D labelling + 3-D morphology of ~120 objects: ~30 s alone, ~60 s on a busy 2-core machine
    _wait_worker(qtbot, seg, timeout=240_000)
    out = viewer.layers[-1]
    assert out.data.shape == stack.shape
    np.testing.assert_allclose(out.scale, (2.0, 0.5, 0.5))
    assert len(out.features) == len(np.unique(out.data)) - 1

    assert "volume_vox" in out.features and out.features["z_planes"].max() > 1  # 3-D objects
    # A correction refreshes the rows of the touched ids only (debounced).
    out.visible = True
    new_id = int(out.data.max()) + 1
    yy, xx = np.mgrid[10:20, 10:25]
    zz = np.full(yy.size, 20)
    out.data_setitem((zz, yy.ravel(), xx.ravel()), new_id)
    qtbot.waitUntil(lambda: new_id in set(out.features["label"]), timeout=5000)
    row = out.features.set_index("label").loc[new_id]
    assert row["z_planes"] == 1 and row["volume_vox"] == int((out.data == new_id).sum())
    assert len(out.features) == len(np.unique(out.data)) - 1

    rgb = np.random.default_rng(1).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    layer = viewer.add_image(rgb, name="rgb", rgb=True)
    seg.image.value = layer
    seg.run()
    _wait_worker(qtbot, seg)
    assert viewer.layers[-1].data.shape == (96, 80)


def test_model_picker_lists_all_architectures(viewer_with_plugin):
    viewer, seg, _, _ = viewer_with_plugin
    from napari_s2mnet._qt._session import get_session

    archs = {c for c in seg.new_arch.choices}
    assert {"s2mnet", "unet", "dssau"} <= archs
    seg.new_arch.value = "dssau"
    seg.start_new_model()
    assert get_session(viewer).active().config.arch == "dssau"
    assert "dssau" in seg.model_label.text()


def test_segment_multichannel_layer_with_channel_axis(viewer_with_plugin, qtbot):
    """A (C, Y, X) layer with the channel axis chosen goes to a 2-channel model as channels."""
    import torch

    from napari_s2mnet._qt._session import get_session
    from napari_s2mnet.checkpoint import new_model
    from napari_s2mnet.model import ModelConfig

    viewer, seg, _, _ = viewer_with_plugin
    torch.manual_seed(0)
    two = new_model(ModelConfig(arch="unet", in_channels=2, options={"base": 4, "depth": 2}))
    data = np.random.default_rng(0).integers(0, 4000, (2, 70, 90), dtype=np.uint16)
    layer = viewer.add_image(
        data, name="two channels", scale=(1.0, 0.3, 0.4), axis_labels=("c", "y", "x")
    )
    seg.image.value = layer
    assert list(seg.channel_axis.choices) == [-1, 0]
    assert seg.channel_axis.value == -1  # a 1-channel model: 'none' (planes)
    get_session(viewer).set_active(two, "test")
    assert seg.channel_axis.value == 0  # suggested: the axis as long as the model's inputs
    n_before = len(viewer.layers)
    seg.run()
    _wait_worker(qtbot, seg)
    assert len(viewer.layers) == n_before + 1, seg.status.text()
    out = viewer.layers[-1]
    assert out.data.shape == (70, 90)  # channels consumed, not segmented as 2 slices
    np.testing.assert_allclose(out.scale, (0.3, 0.4))
    assert tuple(out.axis_labels) == ("y", "x")


def test_segment_one_channel_of_a_multichannel_layer(viewer_with_plugin, qtbot):
    """'model input' feeds one chosen channel to the (1-channel) bundled model."""
    viewer, seg, _, _ = viewer_with_plugin
    nuclei = viewer.layers["nuclei"]
    seg.image.value = nuclei
    seg.run()
    _wait_worker(qtbot, seg)
    reference = np.asarray(viewer.layers[-1].data)
    noise = np.random.default_rng(0).integers(0, 4000, nuclei.data.shape).astype(nuclei.data.dtype)
    layer = viewer.add_image(np.stack([noise, nuclei.data]), name="stain + nuclei")
    seg.image.value = layer
    assert not seg.input_channel.enabled  # no channel axis yet: nothing to choose
    seg.channel_axis.value = 0
    assert list(seg.input_channel.choices) == [-1, 0, 1] and seg.input_channel.enabled
    seg.input_channel.value = 1
    seg.run()
    _wait_worker(qtbot, seg)
    out = viewer.layers[-1]
    assert out.name == "stain + nuclei S2M-Net", seg.status.text()
    np.testing.assert_array_equal(np.asarray(out.data), reference)
