"""Model files: round trip, validation of foreign/damaged files, atomic save."""

from __future__ import annotations

import errno
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_s2mnet import checkpoint as ck
from napari_s2mnet.checkpoint import (
    ModelBundle,
    default_model_path,
    load_default_model,
    load_model,
    model_hash,
    new_model,
    read_header,
    save_model,
)
from napari_s2mnet.model.registry import ModelConfig
from napari_s2mnet.preprocess import NormalizationConfig

SMALL_S2M = {"widths": [8, 12, 16, 16, 24], "stem": 8, "expansion": 2}
SMALL_UNET = {"base": 4, "depth": 3}


def _trained_like(config: ModelConfig) -> ModelBundle:
    """A small bundle whose BN running statistics differ from their initial values."""
    torch.manual_seed(0)
    b = new_model(config, NormalizationConfig(low=2.0, high=99.5, clip=2.0), name="test model")
    b.model.train()
    with torch.no_grad():
        for _ in range(3):
            b.model(torch.randn(2, config.in_channels, 64, 64) * 3 + 1)
    b.model.eval()
    b.metadata.update(
        {
            "threshold": 0.4,
            "trained_on": 3,
            "history": [{"date": "2026-01-01T00:00:00+00:00", "steps": 10, "loss": "masl"}],
            "metrics": {"val_dice": np.float32(0.75)},  # numpy scalars are stored as plain numbers
            "data": [{"name": "a.tif", "shape": (64, 64)}],
        }
    )
    return b


@pytest.fixture(scope="module")
def s2m_bundle() -> ModelBundle:
    return _trained_like(ModelConfig(arch="s2mnet", in_channels=1, options=SMALL_S2M))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, s2m_bundle: ModelBundle) -> Path:
    path = tmp_path_factory.mktemp("ck") / "model.safetensors"
    save_model(s2m_bundle, path)
    return path


def test_round_trip_is_bit_exact(s2m_bundle: ModelBundle, saved: Path) -> None:
    loaded = load_model(saved)
    a, b = s2m_bundle.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    bn_keys = [k for k in a if k.endswith("running_var")]
    assert bn_keys, "the test model must have batch-norm statistics"
    # the statistics really moved away from their initial value of 1 and came back intact
    assert any(not torch.allclose(a[k], torch.ones_like(a[k])) for k in bn_keys)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.randn(2, 1, 70, 50)
    with torch.no_grad():
        assert torch.equal(s2m_bundle.model(x), loaded.model(x))
    assert not loaded.model.training
    assert model_hash(loaded) == model_hash(s2m_bundle)


def test_config_and_metadata_round_trip(s2m_bundle: ModelBundle, saved: Path) -> None:
    loaded = load_model(saved)
    assert loaded.config.to_dict() == s2m_bundle.config.to_dict()
    assert loaded.normalization == s2m_bundle.normalization
    meta = loaded.metadata
    assert meta["name"] == "test model" and loaded.name == "test model"
    assert loaded.threshold == pytest.approx(0.4)
    assert meta["history"] == s2m_bundle.metadata["history"]
    assert meta["trained_on"] == 3
    assert meta["metrics"]["val_dice"] == pytest.approx(0.75)
    assert meta["data"] == [{"name": "a.tif", "shape": [64, 64]}]
    assert meta["created"] == s2m_bundle.metadata["created"]
    assert meta["package_version"]
    info = read_header(saved)
    assert info["format_version"] == ck.FORMAT_VERSION
    assert info["weights_sha256"] == model_hash(s2m_bundle)
    assert s2m_bundle.metadata.get("package_version") is None  # save does not touch the bundle


def test_model_hash_tracks_weights(s2m_bundle: ModelBundle) -> None:
    clone = ModelBundle(
        model=__import__("copy").deepcopy(s2m_bundle.model), config=s2m_bundle.config
    )
    assert model_hash(clone) == model_hash(s2m_bundle)
    with torch.no_grad():
        next(iter(clone.model.parameters())).view(-1)[0] += 1e-3
    assert model_hash(clone) != model_hash(s2m_bundle)


def test_device_argument(saved: Path) -> None:
    loaded = load_model(saved, device="auto")
    assert next(loaded.model.parameters()).device.type in ("cpu", "cuda", "mps")


def test_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    b = new_model(ModelConfig(arch="unet", in_channels=1, options=SMALL_UNET))
    convs = [m for m in b.model.modules() if isinstance(m, torch.nn.Conv2d)]
    by_shape: dict[tuple, list[torch.nn.Conv2d]] = {}
    for m in convs:
        by_shape.setdefault(tuple(m.weight.shape), []).append(m)
    pair = next(v for v in by_shape.values() if len(v) >= 2)
    pair[1].weight = pair[0].weight  # tie: two state-dict entries share one storage
    other = next(m for m in convs if m.kernel_size == (3, 3) and m not in pair)
    other.weight.data = other.weight.data.transpose(2, 3).contiguous().transpose(2, 3)
    assert not other.weight.is_contiguous()
    path = save_model(b, tmp_path / "tied.safetensors")
    loaded = load_model(path)
    a, c = b.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_metadata_must_be_json(tmp_path: Path) -> None:
    b = new_model(ModelConfig(arch="unet", in_channels=1, options=SMALL_UNET))
    b.metadata["bad"] = object()
    with pytest.raises(TypeError, match=r"JSON"):
        save_model(b, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# refused files


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Payload:
    """Unpickling this would create a marker file: loading must never unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_refuses_empty_and_tiny(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"empty \(0 bytes\).*saved by napari-s2mnet"):
        load_model(_write(tmp_path / "e.safetensors", b""))
    with pytest.raises(ValueError, match=r"too small"):
        load_model(_write(tmp_path / "t.safetensors", b"\x01\x02\x03"))


def test_refuses_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match=r"is a folder"):
        load_model(tmp_path)


def test_refuses_random_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _write(tmp_path / "r.safetensors", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"not a safetensors file.*saved by napari-s2mnet"):
        load_model(path)


def test_refuses_torch_save_zip_without_unpickling(tmp_path: Path, s2m_bundle: ModelBundle) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    torch.save({"state": s2m_bundle.model.state_dict(), "evil": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"ZIP archive.*torch\.save.*saved by napari-s2mnet"):
        load_model(path)
    assert not marker.exists()


def test_refuses_legacy_pickle_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"Python pickle"):
        load_model(path)
    path2 = tmp_path / "legacy_torch.pth"
    torch.save({"w": torch.zeros(3)}, path2, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"Python pickle"):
        load_model(path2)
    assert not marker.exists()


def test_refuses_truncated(tmp_path: Path, saved: Path) -> None:
    data = saved.read_bytes()
    with pytest.raises(ValueError, match=r"truncated"):
        load_model(_write(tmp_path / "half.safetensors", data[: len(data) // 2]))
    (n,) = struct.unpack("<Q", data[:8])
    with pytest.raises(ValueError, match=r"truncated"):
        load_model(_write(tmp_path / "head.safetensors", data[: 8 + n // 2]))


def test_refuses_corrupted_weights(tmp_path: Path, saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data
    with pytest.raises(ValueError, match=r"corrupted.*checksum"):
        load_model(_write(tmp_path / "flip.safetensors", bytes(data)))


def test_refuses_damaged_header(tmp_path: Path, saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[20] = ord("\x00")  # inside the JSON header
    with pytest.raises(ValueError, match=r"header is not valid JSON|damaged"):
        load_model(_write(tmp_path / "hdr.safetensors", bytes(data)))


def test_refuses_foreign_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not one saved by napari-s2mnet"):
        load_model(path)


def _with_header(
    src: Path, dst: Path, state: dict[str, torch.Tensor] | None = None, **overrides: str
) -> Path:
    """Re-write ``src`` with its header entries replaced (and optionally other tensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if state is not None:
        tensors = {k: v.contiguous() for k, v in state.items()}
        meta["weights_sha256"] = ck.state_hash(tensors)
    meta.update(overrides)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_refuses_wrong_architecture_weights(tmp_path: Path, saved: Path) -> None:
    unet = new_model(ModelConfig(arch="unet", in_channels=1, options=SMALL_UNET))
    path = _with_header(saved, tmp_path / "wrong.safetensors", state=unet.model.state_dict())
    with pytest.raises(
        ValueError,
        match=r"do not match architecture 's2mnet'.*missing tensors.*"
        r"unexpected tensors",
    ):
        load_model(path)


def test_refuses_wrong_shapes(tmp_path: Path, saved: Path) -> None:
    other = new_model(ModelConfig(arch="s2mnet", in_channels=3, options=SMALL_S2M))
    path = _with_header(saved, tmp_path / "shape.safetensors", state=other.model.state_dict())
    with pytest.raises(
        ValueError, match=r"wrong shapes: .*\[8, 3, 3, 3\] \(expected \[8, 1, 3, 3\]\)"
    ):
        load_model(path)


def test_refuses_unknown_architecture_and_newer_format(tmp_path: Path, saved: Path) -> None:
    cfg = dict(read_header(saved)["config"])
    cfg["arch"] = "transunet"
    path = _with_header(saved, tmp_path / "arch.safetensors", config=json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'transunet'.*Known architectures"):
        load_model(path)
    path = _with_header(saved, tmp_path / "new.safetensors", format_version="99")
    with pytest.raises(ValueError, match=r"newer napari-s2mnet.*format version 99"):
        load_model(path)


# ------------------------------------------------------------------------------------------
# atomic save


def test_atomic_save_keeps_old_file_on_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s2m_bundle: ModelBundle
) -> None:
    path = tmp_path / "model.safetensors"
    save_model(s2m_bundle, path)
    before = path.read_bytes()

    def full_disk(fh, data):
        fh.write(memoryview(data)[: len(data) // 3])  # part of the file is written ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    other = new_model(ModelConfig(arch="s2mnet", in_channels=1, options=SMALL_S2M))
    monkeypatch.setattr(ck, "_write_bytes", full_disk)
    with pytest.raises(OSError, match=r"No space left"):
        save_model(other, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    monkeypatch.undo()
    assert model_hash(load_model(path)) == model_hash(s2m_bundle)


def test_atomic_save_keeps_old_file_when_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s2m_bundle: ModelBundle
) -> None:
    path = tmp_path / "model.safetensors"
    save_model(s2m_bundle, path)
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ck.os, "fsync", fail)
    with pytest.raises(OSError):
        save_model(new_model(ModelConfig(arch="unet", in_channels=1, options=SMALL_UNET)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_overwrites_and_checks_destination(tmp_path: Path, s2m_bundle: ModelBundle) -> None:
    path = tmp_path / "model.safetensors"
    unet = new_model(ModelConfig(arch="unet", in_channels=1, options=SMALL_UNET))
    save_model(unet, path)
    save_model(s2m_bundle, path)
    assert load_model(path).config.arch == "s2mnet"
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        save_model(s2m_bundle, tmp_path / "missing" / "m.safetensors")
    with pytest.raises(IsADirectoryError):
        save_model(s2m_bundle, tmp_path)


# ------------------------------------------------------------------------------------------
# bundled default model


def test_default_model_path_and_missing_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = default_model_path()
    assert path.name == "s2mnet_default.safetensors"
    assert path.parent.name == "resources"
    monkeypatch.setattr(ck, "default_model_path", lambda: tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"bundled default model is missing.*train"):
        load_default_model()


def test_default_model_loads_when_present() -> None:
    if not default_model_path().is_file():
        pytest.skip("no bundled default model in this checkout yet")
    bundle = load_default_model()
    assert bundle.config.arch and not bundle.model.training
