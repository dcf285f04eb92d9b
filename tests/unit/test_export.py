"""Model export (issue 18): DFT-basis spectral filter, BN folding, torch.export, ONNX, bioimage.io."""

from __future__ import annotations

import importlib.util
import zipfile

import numpy as np
import pytest
import torch

from napari_s2mnet.checkpoint import ModelBundle, save_model
from napari_s2mnet.export import export_onnx, fold_batchnorm, padded_core
from napari_s2mnet.model import ModelConfig, build_model
from napari_s2mnet.model.blocks import SpectralFilter
from napari_s2mnet.preprocess import NormalizationConfig

TINY = {
    "widths": [8, 8],
    "stem": 8,
    "head_widths": [8, 8],
    "expansion": 2,
    "sstm_use_spatial": [False, True],
    "sstm_use_spectral": [True, True],
    "K": 8,
}


def _tiny(in_channels: int = 1, num_classes: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig("s2mnet", in_channels, num_classes, TINY))
    model.train()
    with torch.no_grad():  # non-trivial BN statistics, so folding is really tested
        for _ in range(3):
            model(torch.rand(2, in_channels, 32, 32))
    return model.eval()


@pytest.mark.parametrize(("h", "w", "k"), [(44, 44, 32), (22, 22, 32), (11, 11, 32), (33, 18, 8)])
def test_dft_basis_filter_equals_torch_fft(h: int, w: int, k: int) -> None:
    torch.manual_seed(1)
    sf = SpectralFilter(5, k)
    with torch.no_grad():
        sf.weight.normal_()
    x = torch.randn(2, 5, h, w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = torch.fft.irfft2(torch.fft.rfft2(x) * sf.half_plane_filter(h, w), s=(h, w))
        out = sf(x)
    assert torch.allclose(out, ref, atol=1e-5 * float(ref.abs().max()) + 1e-6)


def test_fold_batchnorm_same_outputs_fewer_modules() -> None:
    model = _tiny()
    folded = fold_batchnorm(model)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert n_bn < sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original intact


def test_torch_export_of_the_padded_core() -> None:
    core = padded_core(_tiny())
    x = torch.rand(1, 1, 32, 32)
    ep = torch.export.export(core, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), core(x), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_onnx_export_runs_in_onnxruntime_with_any_batch(tmp_path) -> None:
    import onnxruntime as ort

    model = _tiny(num_classes=3)
    path = export_onnx(model, tmp_path / "m.onnx", (64, 32), batch=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 1, 64, 32)
        with torch.no_grad():
            ref = model(x).numpy()
        out = session.run(None, {"input": x.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-3
    with pytest.raises(ValueError, match="multiples of the model's stride"):
        export_onnx(model, tmp_path / "bad.onnx", (50, 32))
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_export_onnx(tmp_path) -> None:
    from napari_s2mnet.cli import main

    model = _tiny()
    src = save_model(
        ModelBundle(
            model,
            ModelConfig("s2mnet", 1, 1, TINY),
            NormalizationConfig(),
            {"name": "tiny", "tile_size": 64},
        ),
        tmp_path / "tiny.safetensors",
    )
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(src), "--format", "onnx", "-o", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["export", str(src), "-o", str(tmp_path / "x.bin")]) == 2  # unknown suffix


@pytest.mark.skipif(
    importlib.util.find_spec("bioimageio") is None
    or importlib.util.find_spec("bioimageio.core") is None,
    reason="needs bioimageio.core",
)
def test_bioimageio_package_passes_bioimageio_core(tmp_path) -> None:
    from bioimageio.core import test_model

    from napari_s2mnet.bioimage_export import export_bioimageio

    bundle = ModelBundle(
        _tiny(),
        ModelConfig("s2mnet", 1, 1, TINY),
        NormalizationConfig(),
        {"name": "tiny S2M-Net", "tile_size": 64},
    )
    path = export_bioimageio(bundle, tmp_path / "tiny.zip")
    names = zipfile.ZipFile(path).namelist()
    for expected in ("rdf.yaml", "weights.onnx", "weights.pt", "cover.png", "test_input.npy"):
        assert expected in names
    rdf = zipfile.ZipFile(path).read("rdf.yaml").decode()
    assert "2601.01285" in rdf and "scale_range" in rdf and "sigmoid" in rdf
    summary = test_model(str(path))
    assert summary.status == "passed", summary.format()
