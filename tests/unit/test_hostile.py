"""Hostile and careless input (issue 17): crafted model files, permissions, value ranges, ..."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
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
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _craft(
    src: Path,
    dst: Path,
    *,
    config: Any = None,
    normalization: Any = None,
    metadata: Any = None,
    raw: dict[str, str] | None = None,
) -> Path:
    """``src`` with parts of its header replaced (the tensors are kept byte for byte)."""
    header, data = _split(src)
    meta = header["__metadata__"]
    for key, value in (
        ("config", config),
        ("normalization", normalization),
        ("metadata", metadata),
    ):
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


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
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
    ],
)
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
    bad = _craft(
        tiny_file, tmp_path / "big.safetensors", config=_set("in_channels", 1024), raw=None
    )
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


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set("low", 99.9), "0 <= low < high <= 100"),
        (_set("high", 150.0), "0 <= low < high <= 100"),
        (_set("clip", -1.0), "clip must be >= 0"),
        (_set("clip", "3"), "clip must be a finite number"),
        (_set("low", float("nan")), "low must be a finite number"),
        (_set("method", "zscore"), "method must be one of"),
        (_set("per_channel", "yes"), "per_channel must be true or false"),
        (_set("bogus", 1), "unknown normalisation settings"),
        (5, "must be a JSON object"),
    ],
)
def test_bad_normalization_is_refused(
    tiny_file: Path, tmp_path: Path, change: Any, words: str
) -> None:
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


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set("tile_size", -512), "tile_size must be in"),
        (_set("tile_size", "big"), "tile_size must be an integer"),
        (_set("threshold", "x"), "threshold must be a finite number"),
        (_set("threshold", 2.0), "threshold must be in"),
        (_set("history", [{"config": {"crop_size": -3}}]), "crop_size must be in"),
        (_set("history", 5), "history must be a list"),
        (_set("name", ["a"]), "name must be a string"),
    ],
)
def test_bad_metadata_values_are_refused(
    tiny_file: Path, tmp_path: Path, change: Any, words: str
) -> None:
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


# --------------------------------------------------------------------------------------------
# items 3 and 8: permissions, symlinks and non-regular targets


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_exports_follow_the_umask(tmp_path: Path, umask_022: None) -> None:
    import pandas as pd

    from napari_s2mnet import _writer
    from napari_s2mnet.io import write_features_csv, write_labels

    labels = np.zeros((8, 8), np.uint16)
    labels[2:4, 2:4] = 1
    written = [
        write_labels(tmp_path / "a.tif", labels),
        write_labels(tmp_path / "a.png", labels),
        write_labels(tmp_path / "a.npy", labels),
        write_features_csv(pd.DataFrame({"label": [1]}), tmp_path / "a.csv"),
        Path(_writer.write_labels_tiff(str(tmp_path / "w.tif"), labels, {})[0]),
        Path(
            _writer.write_features_csv(
                str(tmp_path / "w.csv"), labels, {"features": {"label": [1]}}
            )[0]
        ),
    ]
    assert [_mode(p) for p in written] == [0o644] * len(written)
    os.umask(0o077)
    assert _mode(write_labels(tmp_path / "private.tif", labels)) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_overwritten_exports_keep_their_mode(tmp_path: Path, umask_022: None) -> None:
    from napari_s2mnet.io import write_labels

    out = write_labels(tmp_path / "keep.tif", np.ones((4, 4), np.uint8))
    os.chmod(out, 0o640)
    write_labels(out, np.zeros((4, 4), np.uint8))
    assert _mode(out) == 0o640


def test_labels_are_written_through_a_symlink(tmp_path: Path) -> None:
    from napari_s2mnet.io import read_labels, write_labels

    target = tmp_path / "shared" / "labels.tif"
    target.parent.mkdir()
    write_labels(target, np.ones((4, 4), np.uint8))
    link = tmp_path / "link.tif"
    link.symlink_to(target)
    write_labels(link, np.full((4, 4), 2, np.uint8))
    assert link.is_symlink()
    assert (read_labels(target) == 2).all()


@pytest.fixture(scope="module")
def small_bundle() -> ck.ModelBundle:
    return ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET))


def test_save_model_writes_through_a_symlink(
    tmp_path: Path, small_bundle: ck.ModelBundle, umask_022: None
) -> None:
    target = tmp_path / "shared.safetensors"
    ck.save_model(ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET)), target)
    os.chmod(target, 0o664)
    link = tmp_path / "mine.safetensors"
    link.symlink_to(target)
    ck.save_model(small_bundle, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert ck.model_hash(ck.load_model(target)) == ck.model_hash(small_bundle)
    assert _mode(target) == 0o664
    fresh = ck.save_model(small_bundle, tmp_path / "fresh.safetensors")
    assert _mode(fresh) == 0o644


def test_save_model_refuses_non_regular_targets(
    tmp_path: Path, small_bundle: ck.ModelBundle
) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        ck.save_model(small_bundle, fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    link = tmp_path / "to_pipe.safetensors"
    link.symlink_to(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        ck.save_model(small_bundle, link)
    if Path("/dev/full").exists():
        with pytest.raises(ValueError, match="not a regular file"):
            ck.save_model(small_bundle, "/dev/full")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


# --------------------------------------------------------------------------------------------
# item 5: value ranges


def _value_range_variants(img: np.ndarray) -> dict[str, np.ndarray]:
    base = img.astype(np.int64)
    return {
        "float64 + 1e9": img.astype(np.float64) + 1e9,
        "int64 + 2**62": base + np.int64(2**62),
        "int64 near min": base + np.int64(-(2**63) + 7),
        "uint64 near max": img.astype(np.uint64) + np.uint64(2**64 - 1 - int(img.max())),
        "x 1e-15": img.astype(np.float64) * 1e-15,
        "beyond float32": img.astype(np.float64) * 1e39,
        "int32 offset": (base * 1000 - 2**31 + 5000).astype(np.int32),
    }


def test_normalisation_is_invariant_to_offsets_and_scales() -> None:
    from napari_s2mnet.preprocess import normalize

    rng = np.random.default_rng(0)
    img = (rng.random((64, 48)) * 200).astype(np.uint8)
    ref = normalize(img, NormalizationConfig(), None)
    for name, variant in _value_range_variants(img).items():
        out = normalize(variant, NormalizationConfig(), None)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=1e-6, err_msg=name)
    # per channel, with channels last
    rgb = (rng.random((16, 16, 3)) * 4000).astype(np.uint16)
    wide = rgb.astype(np.uint64) + np.uint64(2**63)
    np.testing.assert_allclose(
        normalize(wide, NormalizationConfig(), -1),
        normalize(rgb, NormalizationConfig(), -1),
        atol=1e-6,
    )
    # a constant image (up to float rounding) is still all zeros
    assert not normalize(
        np.full((8, 8), 1e9) + rng.random((8, 8)) * 1e-10, NormalizationConfig(), None
    ).any()


def test_values_spanning_more_than_float64_are_refused() -> None:
    from napari_s2mnet.preprocess import normalize

    img = np.zeros((8, 8))
    img[:4] = -1.7e308
    img[4:] = 1.7e308
    with pytest.raises(ValueError, match="rescale the image"):
        normalize(img, NormalizationConfig(low=0.0, high=100.0), None)


def test_segment_gives_the_same_labels_for_badly_scaled_images() -> None:
    from napari_s2mnet._sample_data import load_nuclei
    from napari_s2mnet.inference import segment

    image = load_nuclei()[0][:128, :128]
    bundle = ck.load_default_model()
    ref, _ = segment(image, bundle)
    assert ref.max() > 5
    variants = _value_range_variants(image)
    for name in ("uint64 near max", "x 1e-15", "beyond float32"):
        labels, _ = segment(variants[name], bundle)
        assert np.array_equal(labels, ref), name


# --------------------------------------------------------------------------------------------
# item 7: the MASL shape term is bounded


def test_masl_is_bounded_on_all_foreground_crops() -> None:
    import math

    import torch

    from napari_s2mnet.losses import components as C
    from napari_s2mnet.losses.masl import MASL

    torch.manual_seed(0)
    full = torch.ones(4, 1, 64, 64)  # no boundary anywhere: an object larger than the crop
    logits = torch.randn(4, 1, 64, 64, requires_grad=True)
    crit = MASL(1, learned_weights=False)
    total = crit(logits, full)
    total.backward()
    assert torch.isfinite(total) and 0 <= float(total) < 2.0
    assert crit.last_components["str"] <= 1 / (4 * math.pi) + 1e-6
    assert torch.isfinite(logits.grad).all()
    # perfect all-foreground prediction: the shape term vanishes, no 1e9 spike
    perfect = C.loss_str(torch.ones(2, 1, 32, 32), torch.ones(2, 1, 32, 32), torch.ones(2))
    assert float(perfect.max()) < 1e-6
    # the worst case, a boundary-free target against an empty prediction, stays below c / (4 pi)
    worst = C.loss_str(torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32), torch.ones(2))
    assert float(worst.max()) <= 1 / (4 * math.pi)


def test_masl_mixed_batches_stay_in_the_usual_range() -> None:
    import torch

    from napari_s2mnet.losses.masl import MASL

    torch.manual_seed(1)
    y = torch.zeros(4, 1, 64, 64)
    y[0] = 1.0  # all foreground
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for k, (cy, cx) in enumerate([(20, 20), (40, 44), (12, 50)]):
        y[k + 1, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) < 100).float()
    losses = [float(MASL(1)(torch.randn(4, 1, 64, 64) * s, y)) for s in (0.1, 1.0, 5.0)]
    assert all(0.0 < v < 5.0 for v in losses), losses


# --------------------------------------------------------------------------------------------
# item 9: minor


def test_png_export_on_a_full_disk_fails_once_without_a_second_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full to simulate a full disk")
    script = f"""
import gc, os
from pathlib import Path
import numpy as np
from napari_s2mnet import _atomic
from napari_s2mnet.io import write_labels

def full_disk_temp(target):  # the temporary file lies on a full disk
    tmp = target.parent / ".full.tmp.png"
    tmp.symlink_to("/dev/full")
    return tmp

_atomic.new_temp_file = full_disk_temp
out = Path({str(tmp_path)!r}) / "labels.png"
try:
    write_labels(out, np.ones((64, 64), np.uint8))
except OSError as exc:
    print("refused:", exc.errno)
gc.collect()
print("exists:", out.exists(), sorted(p.name for p in out.parent.iterdir()))
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "refused: 28" in run.stdout
    assert "exists: False []" in run.stdout
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr


def test_float_label_1e30_is_called_too_large(tmp_path: Path) -> None:
    from napari_s2mnet.io import write_labels
    from napari_s2mnet.training import FinetuneConfig, finetune

    labels = np.zeros((32, 32))
    labels[4:12, 4:12] = 1e30
    with pytest.raises(ValueError, match="too large for a label id"):
        write_labels(tmp_path / "x.tif", labels)
    bundle = ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET))
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="too large for a label id") as info:
        next(finetune([(image, labels)], bundle, FinetuneConfig(epochs=1, device="cpu")))
    assert "negative" not in str(info.value)


def test_uint64_ids_above_2_63_keep_their_value_in_features() -> None:
    from napari_s2mnet.morphology import object_features, update_features

    big, bigger = 2**63 + 5, 2**64 - 1
    lab = np.zeros((24, 24), np.uint64)
    lab[2:6, 2:6] = np.uint64(bigger)
    lab[10:14, 10:14] = np.uint64(big)
    lab[18:21, 1:4] = 3
    df = object_features(lab)
    assert [int(v) for v in df["label"]] == [3, big, bigger]
    assert [int(v) for v in df["index"]] == [3, big, bigger]
    lab[18:21, 1:4] = 4  # an edit of a small id keeps the big ones exact
    df2 = update_features(df, lab, [3, 4])
    assert [int(v) for v in df2["label"]] == [4, big, bigger]
    assert [int(v) for v in object_features(lab, label_ids=[bigger])["label"]] == [bigger]
    small = object_features(np.array([[0, 1], [2, 2]], np.uint64))
    assert small["label"].dtype == np.int64  # the usual case keeps napari's int64 ids


def test_split_min_distance_has_an_upper_bound() -> None:
    from napari_s2mnet.inference import InferenceConfig

    with pytest.raises(ValueError, match="split_min_distance must be an integer from 1 to"):
        InferenceConfig(split_min_distance=10**9).validate()
    InferenceConfig(split_min_distance=1000).validate()


def test_a_finetune_control_reused_after_a_stopped_run_does_not_stop_the_next() -> None:
    from napari_s2mnet.training import FinetuneConfig, FinetuneControl, finetune

    rng = np.random.default_rng(0)
    image = rng.random((32, 32)).astype(np.float32)
    labels = np.zeros((32, 32), np.uint8)
    labels[4:12, 4:12] = 1
    labels[18:28, 16:26] = 2
    image[labels > 0] += 1.0
    bundle = ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET))
    config = FinetuneConfig(
        epochs=1, steps_per_epoch=3, batch_size=2, crop_size=32, val_fraction=0.0, device="cpu"
    )
    control = FinetuneControl()

    def run() -> Any:
        gen = finetune([(image, labels)], bundle, config, control=control)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    control.stop()  # Stop before the first run: that run ends at once
    first = run()
    assert first.stopped_reason == "cancelled" and first.steps == 0
    second = run()  # same control: the old stop no longer applies
    assert second.steps == 3 and second.stopped_reason != "cancelled"
    assert not control.stop_requested


# --------------------------------------------------------------------------------------------
# item 1: batch predict goes on after a failed write


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("batch") / "tiny.safetensors"
    ck.save_model(ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET)), path)
    return path


def test_batch_predict_reports_a_failed_write_and_goes_on(
    tmp_path: Path, tiny_model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import io as _io

    import tifffile

    from napari_s2mnet import io as s2io
    from napari_s2mnet._sample_data import load_nuclei
    from napari_s2mnet.batch import predict_paths

    image = load_nuclei()[0]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        tifffile.imwrite(folder / f"{name}.tif", image[i * 64 : (i + 1) * 64, :64])
    real = s2io.write_labels

    def full_disk_for_b(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name.startswith("b_"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(s2io, "write_labels", full_disk_for_b)
    out, stream = tmp_path / "out", _io.StringIO()
    rc = predict_paths([folder], out, model_path=tiny_model_file, device="cpu", stream=stream)
    assert rc == 1  # some failed
    produced = sorted(p.name for p in out.iterdir())
    assert produced == ["a_features.csv", "a_labels.tif", "c_features.csv", "c_labels.tif"]
    summary = stream.getvalue()
    assert "1 of 3 input(s) failed:" in summary
    assert "b.tif: OSError: [Errno 28] No space left on device" in summary

    monkeypatch.setattr(s2io, "write_labels", real)
    stream = _io.StringIO()
    assert (
        predict_paths([folder], out, model_path=tiny_model_file, device="cpu", stream=stream) == 0
    )
    assert "All 3 image(s) segmented" in stream.getvalue()


def test_cli_predict_into_an_unusable_output_is_a_message_not_a_traceback(
    tmp_path: Path, tiny_model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli_main(
        [
            "predict",
            str(tmp_path / "a.tif"),
            "-o",
            str(blocker / "sub"),
            "--model",
            str(tiny_model_file),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# item 4: train pairs files by name


def _touch(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        (folder / name).write_bytes(b"")
        out.append(folder / name)
    return out


def test_pairs_by_name_with_the_usual_label_suffixes(tmp_path: Path) -> None:
    from napari_s2mnet.batch import pair_files

    images = _touch(tmp_path / "img", "a.tif", "B.tif", "c.ome.tif", "d.png", "e_seg.tif")
    labels = _touch(
        tmp_path / "lab", "a_labels.tif", "b_masks.TIF", "c_mask.tif", "d-seg.png", "e_seg.tif"
    )
    pairs = pair_files(images, labels)
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("a.tif", "a_labels.tif"),
        ("B.tif", "b_masks.TIF"),
        ("c.ome.tif", "c_mask.tif"),
        ("d.png", "d-seg.png"),
        ("e_seg.tif", "e_seg.tif"),
    ]
    # one folder holding both
    both = _touch(tmp_path / "both", "x.tif", "x_labels.tif", "y.tif", "y_labels.tif")
    assert [(i.name, lab.name) for i, lab in pair_files(both, both)] == [
        ("x.tif", "x_labels.tif"),
        ("y.tif", "y_labels.tif"),
    ]


def test_unpaired_files_are_refused_with_a_list(tmp_path: Path) -> None:
    from napari_s2mnet.batch import pair_files

    images = _touch(tmp_path / "img", "day1.tif", "day2.tif")
    labels = _touch(tmp_path / "lab", "day2_labels.tif", "day3_labels.tif")
    with pytest.raises(ValueError) as info:
        pair_files(images, labels)
    msg = str(info.value)
    assert "images without labels: day1.tif" in msg
    assert "labels without images: day3_labels.tif" in msg
    assert "--pair-by-order" in msg
    dup = _touch(tmp_path / "lab2", "day1_labels.tif", "day1_masks.tif", "day2_seg.tif")
    with pytest.raises(ValueError, match=r"day1_labels\.tif, day1_masks\.tif all fit"):
        pair_files(images, dup)


def test_cli_train_refuses_wrong_pairs_unless_told_to_pair_by_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tifffile

    from napari_s2mnet import batch

    img = np.zeros((32, 32), np.uint8)
    lab = np.zeros((32, 32), np.uint8)
    lab[4:12, 4:12] = 1
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name in ("day1", "day2"):
        tifffile.imwrite(tmp_path / "img" / f"{name}.tif", img)
    for name in ("day2", "day3"):
        tifffile.imwrite(tmp_path / "lab" / f"{name}_labels.tif", lab)
    args = [
        "train",
        "--images",
        str(tmp_path / "img"),
        "--labels",
        str(tmp_path / "lab"),
        "-o",
        str(tmp_path / "m.safetensors"),
        "--model",
        "new",
        "--arch",
        "unet",
        "--device",
        "cpu",
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "images without labels: day1.tif" in err and "day3_labels.tif" in err
    assert not (tmp_path / "m.safetensors").exists()

    seen: list[list[str]] = []

    def fake_train(pairs: Any, *a: Any, **k: Any) -> Any:
        seen.append([p[2] for p in pairs])
        raise ValueError("stop here")

    monkeypatch.setattr("napari_s2mnet.training.train", fake_train)
    assert cli_main([*args, "--pair-by-order"]) == 2
    assert seen == [["day1.tif", "day2.tif"]]
    assert batch.LABEL_SUFFIXES[0] == "_labels"


# --------------------------------------------------------------------------------------------
# item 6: (Y, X, 1) and (Y, 1, X)


def test_length_one_axes_are_dropped_not_read_as_one_pixel_slices(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from napari_s2mnet._sample_data import load_nuclei
    from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
    from napari_s2mnet.layout import ImageLayout

    image = load_nuclei()[0][:96, :96]
    bundle = ck.new_model(ModelConfig(arch="unet", in_channels=1, options=TINY_UNET))
    cfg = InferenceConfig(device="cpu", threshold=0.5)
    ref = run_to_end(segment_iter(image, bundle, cfg))
    for variant in (image[:, :, None], image[:, None, :], image[None]):
        with caplog.at_level(logging.WARNING):
            res = run_to_end(segment_iter(variant, bundle, cfg, spacing=(0.5,) * 3))
        assert res.labels.shape == variant.shape
        assert np.array_equal(res.labels.reshape(ref.labels.shape), ref.labels)
        assert len(res.features) == len(ref.features)
        assert res.spacing is not None and len(res.spacing) == 3
    assert any("has length 1 and was dropped" in m for m in res.messages) is False  # leading
    res = run_to_end(segment_iter(image[:, :, None], bundle, cfg))
    assert any("Axis 2 of shape (96, 96, 1) has length 1" in m for m in res.messages)
    assert "has length 1 and was dropped" in caplog.text  # a warning, not an INFO line
    row = run_to_end(segment_iter(np.arange(50.0).reshape(1, 1, 50), bundle, cfg))
    assert row.labels.shape == (1, 1, 50)  # one row of pixels, not an error
    with pytest.raises(ValueError, match="axis_names"):
        run_to_end(
            segment_iter(image[None, :, :, None], bundle, cfg, ImageLayout(axis_names=("t", "z")))
        )


@pytest.mark.parametrize("shape", [(40, 30, 1), (40, 1, 30), (1, 40, 30), (3, 1, 40, 30)])
def test_tiff_labels_round_trip_length_one_axes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    import tifffile

    from napari_s2mnet.io import read_labels, write_labels

    labels = np.zeros(shape, np.uint16)
    labels.reshape(-1)[::7] = 3
    path = write_labels(tmp_path / "l.tif", labels, spacing=(0.5,) * len(shape), unit="micron")
    back = read_labels(path)
    assert back.shape == shape and np.array_equal(back, labels)
    with tifffile.TiffFile(path) as tif:  # still a clean ImageJ file for Fiji
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "micron"
        xres = tif.pages[0].tags["XResolution"].value
        assert xres[1] / xres[0] == pytest.approx(0.5)
    big = np.zeros(shape, np.uint32)
    big.reshape(-1)[0] = 2**31  # plain (non-ImageJ) TIFF: the shape survives too
    assert read_labels(write_labels(tmp_path / "b.tif", big)).shape == shape
