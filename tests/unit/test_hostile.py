"""Hostile and careless input (issue 17): crafted model files, permissions, value ranges, ..."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from napari_s2mnet import checkpoint as ck
from napari_s2mnet.cli import main as cli_main
from napari_s2mnet.header_checks import check_json_depth, guarded_build
from napari_s2mnet.model.registry import ModelConfig
from napari_s2mnet.preprocess import NormalizationConfig

TINY_UNET = {"base": 2, "depth": 2}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, small (a few KB) model file to craft hostile variants from."""
    path = tmp_path_factory.mktemp("hostile") / "tiny.safetensors"
    bundle = ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET))
    bundle.metadata["threshold"] = 0.5
    ck.save_model(bundle, path)
    return path


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _craft(src: Path, dst: Path, *, config: Any = None, normalization: Any = None,
           metadata: Any = None, raw: dict[str, str] | None = None) -> Path:
    """``src`` with parts of its header replaced (the tensors are kept byte for byte)."""
    header, data = _split(src)
    meta = header["__metadata__"]
    for key, value in (("config", config), ("normalization", normalization), ("metadata", metadata)):
        if value is not None:
            old = json.loads(meta[key])
            meta[key] = json.dumps(value(old) if callable(value) else value)
    meta.update(raw or {})
    return _write(dst, header, data)


def _set(key: str, value: Any) -> Any:
    def change(d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        if key.startswith("options."):
            d["options"] = {**d.get("options", {}), key.split(".", 1)[1]: value}
        else:
            d[key] = value
        return d
    return change


# --------------------------------------------------------------------------------------------
# item 2: crafted model files are refused before anything large is built


@pytest.mark.parametrize(("key", "value", "words"), [
    ("in_channels", 2_000_000, "in_channels must be in 1..1024"),
    ("in_channels", 10**9, "in_channels must be in"),
    ("in_channels", "1", "in_channels must be an integer"),
    ("in_channels", None, "in_channels must be an integer"),
    ("in_channels", True, "in_channels must be an integer"),
    ("num_classes", 0, "num_classes must be in"),
    ("options", 5, "options must be a JSON object"),
    ("arch", 7, "arch must be an architecture name"),
    ("arch", "resnet9000", "Unknown architecture"),
    ("extra", 1, "unknown model config keys"),
    ("options.base", "2", "options.base must be an integer"),
    ("options.base", 1e9, "options.base must be an integer"),
    ("options.base", 10**6, "options.base must be in"),
    ("options.up", 3, "options.up must be a string"),
    ("options.bn_eps", -1.0, "options.bn_eps must be in"),
    ("options.nonsense", 1, "unknown option 'nonsense'"),
])
def test_bad_config_fields_are_refused_with_the_field_named(
    tiny_file: Path, tmp_path: Path, key: str, value: Any, words: str
) -> None:
    bad = _craft(tiny_file, tmp_path / "bad.safetensors", config=_set(key, value))
    with pytest.raises(ValueError, match="invalid model config") as info:
        ck.load_model(bad)
    assert words in str(info.value)


def test_a_config_larger_than_its_weights_is_refused_before_allocating(
    tiny_file: Path, tmp_path: Path
) -> None:
    # In range field by field, but 1024 x 8192-wide levels would be billions of parameters; the
    # file holds a few hundred. The budget stops the build at the first oversized tensor.
    bad = _craft(tiny_file, tmp_path / "big.safetensors",
                 config=_set("in_channels", 1024), raw=None)
    bad = _craft(bad, tmp_path / "big2.safetensors", config=_set("options.base", 8192))
    with pytest.raises(ValueError, match="larger than the weights stored in the file"):
        ck.load_model(bad)


def test_the_build_budget_counts_before_the_allocation() -> None:
    big = ModelConfig(arch="unet", in_channels=1, options={"base": 4096, "depth": 8})
    with pytest.raises(ValueError, match="more than 1,000 elements"):
        guarded_build(big, max_elements=1000)
    small = ModelConfig(arch="unet", in_channels=1, options=TINY_UNET)
    assert guarded_build(small, max_elements=10**6) is not None


def test_config_that_agrees_in_size_but_not_shape_lists_the_tensors(
    tiny_file: Path, tmp_path: Path
) -> None:
    bad = _craft(tiny_file, tmp_path / "shape.safetensors", config=_set("in_channels", 2))
    with pytest.raises(ValueError, match="wrong shapes"):
        ck.load_model(bad)


@pytest.mark.parametrize(("change", "words"), [
    (_set("low", 99.9), "0 <= low < high <= 100"),
    (_set("high", 150.0), "0 <= low < high <= 100"),
    (_set("clip", -1.0), "clip must be >= 0"),
    (_set("clip", "3"), "clip must be a finite number"),
    (_set("low", float("nan")), "low must be a finite number"),
    (_set("method", "zscore"), "method must be one of"),
    (_set("per_channel", "yes"), "per_channel must be true or false"),
    (_set("bogus", 1), "unknown normalisation settings"),
    (5, "must be a JSON object"),
])
def test_bad_normalization_is_refused(tiny_file: Path, tmp_path: Path, change: Any, words: str) -> None:
    if not callable(change):
        header, data = _split(tiny_file)
        header["__metadata__"]["normalization"] = json.dumps(change)
        bad = _write(tmp_path / "n.safetensors", header, data)
        with pytest.raises(ValueError, match="is not a JSON object"):
            ck.load_model(bad)
        return
    bad = _craft(tiny_file, tmp_path / "n.safetensors", normalization=change)
    with pytest.raises(ValueError, match="invalid normalization settings") as info:
        ck.load_model(bad)
    assert words in str(info.value)


@pytest.mark.parametrize(("change", "words"), [
    (_set("tile_size", -512), "tile_size must be in"),
    (_set("tile_size", "big"), "tile_size must be an integer"),
    (_set("threshold", "x"), "threshold must be a finite number"),
    (_set("threshold", 2.0), "threshold must be in"),
    (_set("history", [{"config": {"crop_size": -3}}]), "crop_size must be in"),
    (_set("history", 5), "history must be a list"),
    (_set("name", ["a"]), "name must be a string"),
])
def test_bad_metadata_values_are_refused(tiny_file: Path, tmp_path: Path, change: Any, words: str) -> None:
    bad = _craft(tiny_file, tmp_path / "m.safetensors", metadata=change)
    with pytest.raises(ValueError, match="invalid metadata") as info:
        ck.read_header(bad)
    assert words in str(info.value)


def test_deeply_nested_json_is_refused_without_recursion(tiny_file: Path, tmp_path: Path) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    header, data = _split(tiny_file)
    header["__metadata__"]["metadata"] = '{"a": ' + deep + "}"
    with pytest.raises(ValueError, match="nested more than"):
        ck.load_model(_write(tmp_path / "deep.safetensors", header, data))
    # the same in the outer safetensors header itself
    outer = json.dumps(header).encode()[:-1] + b', "x": ' + deep.encode() + b"}"
    with pytest.raises(ValueError, match="nested more than"):
        ck.load_model(_write(tmp_path / "deep2.safetensors", outer, data))


def test_json_depth_ignores_brackets_inside_strings() -> None:
    check_json_depth(json.dumps({"a": "[[[[" * 100 + '\\"{{{{' * 100}), "x", limit=3)
    check_json_depth(b'{"a": [1, {"b": [2]}]}', "x", limit=4)
    with pytest.raises(ValueError):
        check_json_depth(b'{"a": [1, {"b": [2]}]}', "x", limit=3)


def test_normalization_config_refuses_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="low < high"):
        NormalizationConfig(low=50.0, high=10.0)
    assert NormalizationConfig(clip=0.0).clip == 0.0


def test_cli_info_prints_the_message_without_a_traceback(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _craft(tiny_file, tmp_path / "info.safetensors", config=_set("options", 5))
    assert cli_main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "options must be a JSON object" in err
    assert "Traceback" not in err
