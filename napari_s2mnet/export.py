"""Model export: ONNX files and bioimage.io model packages (core module, no Qt).

* :func:`fold_batchnorm`: a copy of a network with every ``Conv2d -> BatchNorm2d`` pair folded
  into one convolution (inference only; the same outputs to float rounding).
* :func:`export_onnx`: the network's padded core (:meth:`SegmentationNet.forward_padded`) on a
  fixed tile ``H x W`` (multiples of the model's stride) as an ONNX file; the batch axis stays
  dynamic. Padding to the stride and cropping back happen outside the graph, as in the engine.
* :func:`export_bioimageio`: a bioimage.io model package (spec 0.5, a ``.zip``) with ONNX and
  PyTorch state-dict weights, test input/output, the model's normalisation as preprocessing,
  sigmoid / softmax as postprocessing, the S2M-Net citation and a cover image.
* :func:`export_model`: what ``python -m napari_s2mnet export`` and the Export widget call.

S2M-Net exports because its spectral filter is computed as matrix products with a fixed DFT
basis (:mod:`napari_s2mnet.model.dft`) rather than with complex FFTs.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from napari_s2mnet.checkpoint import ModelBundle

FORMATS = ("onnx", "bioimageio")
ONNX_OPSET = 17
S2MNET_CITATION = (
    "Chowdhury, S. A. & Sabrin, K. M. S2M-Net: Spectral-Spatial Mixing for Medical Image "
    "Segmentation with Morphology-Aware Adaptive Loss. ICML 2026 (PMLR v306); arXiv:2601.01285."
)
S2MNET_DOI = "10.48550/arXiv.2601.01285"


# --------------------------------------------------------------------------------------------
# BatchNorm folding


def _foldable_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """``(sequential, conv name, bn name)`` of every ``Conv2d -> BatchNorm2d`` pair with stats."""
    from torch import nn

    pairs = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for a, b in itertools.pairwise(list(seq._modules)):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue  # no running statistics: nothing to fold
            pairs.append((seq, a, b))
    return pairs


def count_foldable(model: nn.Module) -> int:
    """How many ``Conv2d -> BatchNorm2d`` pairs :func:`fold_batchnorm` would fold."""
    return len(_foldable_pairs(model))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with ``Conv2d -> BatchNorm2d`` pairs folded.

    Every ``BatchNorm2d`` that directly follows a ``Conv2d`` inside an ``nn.Sequential`` (as in
    :class:`~napari_s2mnet.model.blocks.ConvBNAct`) is merged into the convolution's weight and
    bias and replaced by ``nn.Identity``. ``model`` itself is not changed. For inference only:
    the folded copy uses the running statistics.
    """
    import torch
    from torch import nn

    folded = copy.deepcopy(model).eval()
    for seq, a, b in _foldable_pairs(folded):
        conv, bn = seq._modules[a], seq._modules[b]
        with torch.no_grad():
            scale = bn.running_var.double().add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            shift = -bn.running_mean.double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.double()
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
            weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
            conv.weight.copy_(weight.to(conv.weight.dtype))
            new_bias = (bias * scale + shift).to(conv.weight.dtype)
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
        seq._modules[b] = nn.Identity()
    return folded


# --------------------------------------------------------------------------------------------
# ONNX


def padded_core(model: nn.Module, fold_bn: bool = True, activation: str | None = None) -> nn.Module:
    """``model.forward_padded`` as a module (optionally BN-folded, with a final activation).

    Args:
        model: A registered network (:class:`~napari_s2mnet.model.base.SegmentationNet`).
        fold_bn: Fold BatchNorm into the convolutions (:func:`fold_batchnorm`).
        activation: ``None`` (logits), ``"sigmoid"`` or ``"softmax"`` (over channels).
    """
    from torch import Tensor, nn

    if not hasattr(model, "forward_padded"):
        raise TypeError(
            f"{type(model).__name__} has no forward_padded(); only networks built on "
            "napari_s2mnet.model.base.SegmentationNet can be exported."
        )
    if activation not in (None, "sigmoid", "softmax"):
        raise ValueError(f"activation must be None, 'sigmoid' or 'softmax', got {activation!r}.")
    net = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()

    class PaddedCore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            y = self.net.forward_padded(x)
            if activation == "sigmoid":
                return y.sigmoid()
            if activation == "softmax":
                return y.softmax(dim=1)
            return y

    return PaddedCore().eval()


def check_tile(tile: tuple[int, int], stride: int) -> tuple[int, int]:
    """``tile`` as two ints, or a ValueError unless both are positive multiples of ``stride``."""
    h, w = (int(t) for t in tile)
    if h < 1 or w < 1 or h % stride or w % stride:
        raise ValueError(
            f"The export tile must be positive multiples of the model's stride {stride}, got "
            f"{h} x {w}; use e.g. {max(stride, h - h % stride)} x {max(stride, w - w % stride)}."
        )
    return h, w


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    tile: tuple[int, int],
    batch: int = 1,
    fold_bn: bool = True,
    activation: str | None = None,
    opset: int = ONNX_OPSET,
) -> Path:
    """Write ``model``'s padded core on a fixed ``tile`` to an ONNX file (atomically).

    Args:
        model: A registered network (in any mode; exported in eval mode).
        path: Output ``.onnx`` path.
        tile: ``(H, W)``, multiples of ``model.stride``: the input side the graph is built for.
        batch: Batch size of the example input; the batch axis of the graph stays dynamic.
        fold_bn: Fold BatchNorm into the convolutions.
        activation: ``None`` (logits), ``"sigmoid"`` or ``"softmax"``.
        opset: ONNX opset.

    Returns:
        The written path. Input ``"input"`` ``(N, in_channels, H, W)`` float32, output
        ``"output"`` ``(N, num_classes, H, W)``.
    """
    import torch

    path = Path(path)
    h, w = check_tile(tile, int(getattr(model, "stride", 1)))
    core = padded_core(model, fold_bn, activation).cpu()
    x = torch.zeros(batch, int(model.in_channels), h, w)
    tmp = _temp_beside(path)
    try:
        _onnx_export(core, x, tmp, opset)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _onnx_export(core: nn.Module, x: Any, path: Path, opset: int) -> None:
    """TorchScript-based exporter (seconds; S2M-Net has no dynamic control flow), else dynamo."""
    import torch

    names = {"input_names": ["input"], "output_names": ["output"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters are chatty (deprecations, tracer notes)
        try:
            torch.onnx.export(
                core,
                (x,),
                str(path),
                opset_version=opset,
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                **names,
            )
        except (TypeError, RuntimeError, NotImplementedError):  # legacy exporter gone or failed
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                core,
                (x,),
                str(path),
                opset_version=max(opset, 18),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                **names,
            )


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


# --------------------------------------------------------------------------------------------
# CLI / widget entry


def export_model(
    output: str | os.PathLike,
    fmt: str | None = None,
    model_path: str | os.PathLike | None = None,
    tile_size: int | None = None,
) -> Path:
    """Export a model file (default: the bundled model) to ONNX or a bioimage.io package.

    Args:
        output: Output file (``.onnx`` or ``.zip``).
        fmt: ``"onnx"`` or ``"bioimageio"``; ``None`` guesses from the suffix of ``output``.
        model_path: A ``.safetensors`` model file; ``None`` for the bundled model.
        tile_size: Side of the (square) tile the graph is built for; default the model's
            :attr:`~napari_s2mnet.checkpoint.ModelBundle.tile_size`, rounded to its stride.
    """
    from napari_s2mnet.checkpoint import load_default_model, load_model

    fmt = export_format(output, fmt)  # bad names fail before the model is loaded
    bundle = load_default_model() if model_path is None else load_model(model_path)
    return export_bundle(bundle, output, fmt, tile_size)


def export_format(output: str | os.PathLike, fmt: str | None = None) -> str:
    """``fmt`` checked, or guessed from the suffix of ``output`` (``.onnx`` / ``.zip``)."""
    output = Path(output)
    if fmt is None:
        suffix = output.suffix.lower()
        fmt = {".onnx": "onnx", ".zip": "bioimageio"}.get(suffix)
        if fmt is None:
            raise ValueError(
                f"Cannot tell the export format from {output.name!r}; name the file *.onnx or "
                "*.zip, or pass --format onnx|bioimageio."
            )
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    return fmt


def export_bundle(
    bundle: ModelBundle,
    output: str | os.PathLike,
    fmt: str | None = None,
    tile_size: int | None = None,
) -> Path:
    """Export a loaded model (e.g. the one a widget holds); see :func:`export_model`."""
    output = Path(output)
    fmt = export_format(output, fmt)
    tile = default_tile(bundle, tile_size)
    if fmt == "onnx":
        return export_onnx(bundle.model, output, (tile, tile))
    from napari_s2mnet.bioimage_export import export_bioimageio

    return export_bioimageio(bundle, output, tile=tile)


def default_tile(bundle: ModelBundle, tile_size: int | None = None) -> int:
    """The export tile side: ``tile_size`` or the model's tile size, rounded up to its stride."""
    stride = int(getattr(bundle.model, "stride", 1))
    side = int(tile_size or bundle.tile_size)
    if side < 1:
        raise ValueError(f"tile_size must be >= 1, got {side}.")
    return -(-side // stride) * stride


__all__ = [
    "FORMATS",
    "S2MNET_CITATION",
    "S2MNET_DOI",
    "check_tile",
    "count_foldable",
    "default_tile",
    "export_bundle",
    "export_format",
    "export_model",
    "export_onnx",
    "fold_batchnorm",
    "padded_core",
]
