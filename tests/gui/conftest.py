"""GUI fixtures: a real napari viewer (pytest-xvfb provides the display) with the plugin docked."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path, monkeypatch):
    """The model picker's recent-files list goes to a temporary folder, not the user's."""
    monkeypatch.setenv("S2MNET_CONFIG_DIR", str(tmp_path / "s2mnet-config"))


@pytest.fixture
def tiny_model():
    """A small randomly initialised S2M-Net (1 channel) so GUI tests run fast on CPU."""
    from napari_s2mnet.checkpoint import new_model
    from napari_s2mnet.model import ModelConfig

    cfg = ModelConfig(arch="s2mnet", in_channels=1, num_classes=1)
    bundle = new_model(cfg, name="tiny test model")
    bundle.model.eval()
    return bundle


@pytest.fixture
def viewer_with_plugin(make_napari_viewer, tiny_model):
    """A viewer with the sample image open, all three widgets docked and a tiny active model."""
    from napari_s2mnet._qt._session import get_session

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-s2mnet", "dsb2018_nuclei")
    _, seg = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Fine-tune", tabify=True)
    _, ex = viewer.window.add_plugin_dock_widget("napari-s2mnet", "Export", tabify=True)
    get_session(viewer).set_active(tiny_model, "test")
    return viewer, seg, ft, ex
