"""Compiled CPU backends (issue 18): parity with eager PyTorch on the real sample image."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from napari_s2mnet._sample_data import load_nuclei
from napari_s2mnet.checkpoint import load_default_model
from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
from napari_s2mnet.inference.backends import available_backends, resolve_backend


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
    from napari_s2mnet.model import ModelConfig, build_model

    monkeypatch.setenv("NAPARI_S2MNET_CACHE_DIR", str(tmp_path))
    opts = {"widths": [8, 8], "stem": 8, "head_widths": [8, 8], "expansion": 2,
            "sstm_use_spatial": [False, True], "sstm_use_spectral": [True, True]}
    model = build_model(ModelConfig("s2mnet", 1, 1, opts)).eval()
    x = torch.rand(2, 1, 32, 32)
    r1 = get_runner(model, model_hash(model), found[0], (32, 32), 1)
    with torch.no_grad():
        model.head.classifier.bias.add_(1.0)  # a "fine-tuned" model
        expected = model(x).numpy()
    r2 = get_runner(model, model_hash(model), found[0], (32, 32), 1)
    assert r2.onnx_path != r1.onnx_path
    assert np.abs(r2(x.numpy()) - expected).max() < 1e-3  # not the stale graph
    assert len(list(tmp_path.glob("*.onnx"))) == 2


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
