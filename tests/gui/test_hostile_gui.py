"""Segment widget and a crafted model file (issue 17 item 2): the user sees why it was refused."""

from __future__ import annotations

import json
import struct


def test_segment_widget_shows_why_a_crafted_model_file_is_refused(
    viewer_with_plugin, tmp_path, monkeypatch
):
    from napari_s2mnet._qt import segment as seg_module
    from napari_s2mnet._qt._session import get_session
    from napari_s2mnet.checkpoint import new_model, save_model
    from napari_s2mnet.model import ModelConfig

    viewer, seg, _, _ = viewer_with_plugin
    good = tmp_path / "good.safetensors"
    save_model(
        new_model(ModelConfig(arch="unet", in_channels=1, options={"base": 2, "depth": 2})), good
    )
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    config = json.loads(header["__metadata__"]["config"])
    config["in_channels"] = 2_000_000  # the crafted header
    header["__metadata__"]["config"] = json.dumps(config)
    blob = json.dumps(header).encode()
    bad = tmp_path / "crafted.safetensors"
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])

    shown = []
    monkeypatch.setattr(seg_module, "show_warning", shown.append)
    assert seg.load_model_file(bad) is None
    assert shown and "in_channels must be in 1..1024" in shown[-1]
    assert "crafted" not in str(get_session(viewer)._source)  # not made active
