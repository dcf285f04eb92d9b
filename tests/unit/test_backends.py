"""Compiled CPU backends (issue 18): parity with eager PyTorch on the real sample image."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from napari_s2mnet._sample_data import load_nuclei
from napari_s2mnet.checkpoint import load_default_model
from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
from napari_s2mnet.inference.backends import available_backends, resolve_backend


def _tiny_s2mnet():
    """A two-stage S2M-Net small enough to export and compile in a second."""
    from napari_s2mnet.model import ModelConfig, build_model

    opts = {
        "widths": [8, 8],
        "stem": 8,
        "head_widths": [8, 8],
        "expansion": 2,
        "sstm_use_spatial": [False, True],
        "sstm_use_spectral": [True, True],
    }
    return build_model(ModelConfig("s2mnet", 1, 1, opts)).eval()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def eager_and_image():
    image = load_nuclei()[0][:320, :320]  # real DSB2018 nuclei (the bundled sample)
    bundle = load_default_model()
    cfg = InferenceConfig(backend="torch", return_probability=True, compute_features=False)
    return bundle, image, run_to_end(segment_iter(image, bundle, cfg))


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_compiled_backend_matches_eager(backend, eager_and_image, tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec(backend) is None or importlib.util.find_spec("onnx") is None:
        pytest.skip(f"{backend} is not installed")
    monkeypatch.setenv("NAPARI_S2MNET_CACHE_DIR", str(tmp_path))
    bundle, image, eager = eager_and_image
    cfg = InferenceConfig(backend=backend, return_probability=True, compute_features=False)
    result = run_to_end(segment_iter(image, bundle, cfg))
    assert result.backend == backend, result.messages
    assert eager.backend == "torch"
    assert np.abs(result.probability - eager.probability).max() <= 0.02
    assert _dice(result.labels > 0, eager.labels > 0) >= 0.99
    assert list(tmp_path.glob("*.onnx")), "the compiled graph is cached on disk"


def test_cache_key_changes_with_the_model(tmp_path, monkeypatch) -> None:
    found = available_backends()
    if not found:
        pytest.skip("no compiled backend installed")
    import torch

    from napari_s2mnet.checkpoint import model_hash
    from napari_s2mnet.inference.backends import get_runner

    monkeypatch.setenv("NAPARI_S2MNET_CACHE_DIR", str(tmp_path))
    model = _tiny_s2mnet()
    x = torch.rand(2, 1, 32, 32)
    r1 = get_runner(model, model_hash(model), found[0], (32, 32), 1)
    with torch.no_grad():
        model.head.classifier.bias.add_(1.0)  # a "fine-tuned" model
        expected = model(x).numpy()
    r2 = get_runner(model, model_hash(model), found[0], (32, 32), 1)
    assert r2.onnx_path != r1.onnx_path
    assert np.abs(r2(x.numpy()) - expected).max() < 1e-3  # not the stale graph
    assert len(list(tmp_path.glob("*.onnx"))) == 2


def test_cache_is_capped_least_recently_used_first(tmp_path, monkeypatch) -> None:
    """Every fine-tuned model adds a graph: the folder is pruned to its cap, oldest use first,
    and the graph just written (or just used) stays."""
    import os

    from napari_s2mnet.inference import backends

    found = available_backends()
    if not found:
        pytest.skip("no compiled backend installed")
    import torch

    from napari_s2mnet.checkpoint import model_hash

    monkeypatch.setenv("NAPARI_S2MNET_CACHE_DIR", str(tmp_path))
    (tmp_path / "openvino").mkdir()
    old = [tmp_path / "aaaa_32x32.onnx", tmp_path / "openvino" / "blob1", tmp_path / "bbbb.onnx"]
    for age, f in enumerate(old):  # 300 kB each, the first the least recently used
        f.write_bytes(b"x" * 300_000)
        os.utime(f, (1_000_000 + age, 1_000_000 + age))
    monkeypatch.setattr(backends, "CACHE_LIMIT_BYTES", 700_000)
    model = _tiny_s2mnet()
    runner = backends.get_runner(model, model_hash(model), found[0], (32, 32), 1)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert np.abs(runner(x.numpy()) - model(x).numpy()).max() < 1e-3
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert runner.onnx_path in files
    assert sum(f.stat().st_size for f in files) <= 700_000 + runner.onnx_path.stat().st_size
    assert not old[0].exists(), "the least recently used file goes first"
    assert old[2].exists(), "the most recent old file stays while the cap allows"
    # With a cap of 0 everything else goes, but never the graph in use.
    assert backends.prune_cache(tmp_path, keep=runner.onnx_path, limit=0) > 0
    assert runner.onnx_path.is_file()


def test_backend_resolution() -> None:
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "torch"
    found = available_backends()
    assert resolve_backend("auto", "cpu") == (found[0] if found else "torch")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        InferenceConfig(backend="fast").validate()


def test_eager_inference_runs_a_folded_copy(eager_and_image, monkeypatch) -> None:
    """Eager torch runs a BN-folded copy: same output as the unfolded model, user model untouched."""
    import copy

    import torch

    from napari_s2mnet.inference import engine

    bundle, image, folded = eager_and_image
    model = bundle.model
    model.train()  # as during fine-tuning
    before = {k: v.clone() for k, v in model.state_dict().items()}
    made = []
    real_copy = engine._inference_copy

    def spy(m):
        made.append(real_copy(m))
        return made[-1]

    monkeypatch.setattr(engine, "_inference_copy", spy)
    cfg = InferenceConfig(backend="torch", return_probability=True, compute_features=False)
    again = run_to_end(segment_iter(image, bundle, cfg))
    net = made[-1]
    assert net is not model
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) < n_bn
    assert model.training, "the caller's training flag is kept"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.array_equal(again.probability, folded.probability)

    monkeypatch.setattr(engine, "_inference_copy", lambda m: copy.deepcopy(m).eval())
    unfolded = run_to_end(segment_iter(image, bundle, cfg))
    model.eval()
    assert np.abs(unfolded.probability - folded.probability).max() <= 1e-4
    assert _dice(unfolded.labels > 0, folded.labels > 0) >= 0.999


def test_auto_compiles_only_when_it_pays(eager_and_image, tmp_path, monkeypatch) -> None:
    """A small job runs eager under "auto" (no export); once the graph is cached, auto uses it."""
    found = available_backends()
    if not found:
        pytest.skip("no compiled backend installed")
    from napari_s2mnet.inference import backends

    monkeypatch.setenv("NAPARI_S2MNET_CACHE_DIR", str(tmp_path))
    bundle, image, _ = eager_and_image
    small = image[:224, :224]  # one tile: far below AUTO_MIN_TILES
    cfg = InferenceConfig(backend="auto", return_probability=True, compute_features=False)
    result = run_to_end(segment_iter(small, bundle, cfg))
    assert result.backend == "torch"
    assert not list(tmp_path.glob("*.onnx")), "nothing compiled for a one-tile job"
    # The same model compiled earlier (e.g. by a big image): auto takes the cached graph.
    explicit = InferenceConfig(backend=found[0], compute_features=False)
    run_to_end(segment_iter(small, bundle, explicit))
    assert list(tmp_path.glob("*.onnx"))
    backends._RUNNERS.clear()  # only the disk cache remains, as in a new session
    again = run_to_end(segment_iter(small, bundle, cfg))
    assert again.backend == found[0], again.messages
