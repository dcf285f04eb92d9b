"""Issue 18 in the GUI: 'Export model...' writes a valid ONNX file; Segment names its backend."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui

TINY = {
    "widths": [8, 8],
    "stem": 8,
    "head_widths": [8, 8],
    "expansion": 2,
    "sstm_use_spatial": [False, True],
    "sstm_use_spectral": [True, True],
    "K": 8,
}


@pytest.fixture
def tiny_bundle():
    """An S2M-Net of a few thousand parameters (exports and compiles in about a second)."""
    from napari_s2mnet.checkpoint import new_model
    from napari_s2mnet.model import ModelConfig

    torch.manual_seed(0)
    bundle = new_model(ModelConfig("s2mnet", 1, 1, TINY), name="tiny export model")
    bundle.metadata["tile_size"] = 64
    bundle.model.eval()
    return bundle


@pytest.fixture
def viewer(make_napari_viewer, tiny_bundle, tmp_path, monkeypatch):
    from napari_s2mnet._qt._session import get_session

    monkeypatch.setenv("NAPARI_S2MNET_CACHE_DIR", str(tmp_path / "compiled"))
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-s2mnet", "dsb2018_nuclei")
    get_session(viewer).set_active(tiny_bundle, "test")
    return viewer


def _wait_worker(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs onnx")
def test_export_model_button_writes_a_valid_onnx(
    viewer, tiny_bundle, qtbot, tmp_path, monkeypatch
) -> None:
    import onnx
    from qtpy.QtWidgets import QFileDialog

    _, ex = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Export")
    target = tmp_path / "tiny.onnx"
    asked = []

    def fake_dialog(*args, **kwargs):
        asked.append(args)
        return str(target), "ONNX (*.onnx)"

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(fake_dialog))
    ex.model_button.native.click()
    assert asked, "the button opens the save dialog"
    qtbot.waitUntil(
        lambda: "Model exported to" in ex.status.text() or "failed" in ex.status.text(),
        timeout=60_000,
    )
    assert "Model exported to" in ex.status.text(), ex.status.text()

    graph = onnx.load(str(target))
    onnx.checker.check_model(graph)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 64, 64]  # channels, the model's tile
    # The file computes the active model's logits (the runtime the app itself would use).
    from napari_s2mnet.inference.backends import CompiledRunner, available_backends

    found = available_backends()
    if not found:
        return
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = tiny_bundle.model(x).numpy()
    out = CompiledRunner(found[0], target, threads=1)(x.numpy())
    assert np.abs(out - expected).max() < 1e-3


def _compiled() -> str:
    from napari_s2mnet.inference.backends import available_backends

    found = available_backends()
    return found[0] if found else "none installed"


@pytest.mark.parametrize("backend", ["torch", _compiled()])
def test_segment_status_names_the_backend_that_ran(viewer, qtbot, monkeypatch, backend) -> None:
    if backend == "none installed":
        pytest.skip("no compiled backend installed")
    _, seg = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Segment")
    layer = viewer.layers["nuclei"]
    layer.data = layer.data[:128, :128]  # a small crop keeps the test fast
    seg.image.value = layer
    config = seg.config
    monkeypatch.setattr(
        seg, "config", lambda: dataclasses.replace(config(), device="cpu", backend=backend)
    )
    seg.run_button.native.click()
    _wait_worker(qtbot, seg)
    # e.g. "Done: 12 objects in 'nuclei S2M-Net' (CPU (1 thread), openvino)."
    assert f", {backend})" in seg.status.text(), seg.status.text()
