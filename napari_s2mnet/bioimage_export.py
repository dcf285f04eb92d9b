"""bioimage.io model packages (spec 0.5) of napari-s2mnet models; core module, no Qt.

The package holds:

* ONNX weights: the BatchNorm-folded padded core on a fixed tile (:func:`export_onnx`);
* PyTorch state-dict weights with the architecture imported from this package
  (:func:`build_network`), so bioimage.io tools with napari-s2mnet installed can run them too;
* a test input (a crop of the bundled DSB2018 sample, raw intensities) and the expected output
  computed here with the model's own normalisation and the eager network;
* preprocessing = the model's normalisation (``scale_range`` on the 1st / 99.8th percentiles
  per channel, then ``clip``), postprocessing = sigmoid (binary) or softmax (classes);
* the S2M-Net citation, a 2:1 cover image (input | probability) and a README.

Nothing here reaches the network: every file is written locally, and validation runs without
I/O checks of remote links.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.export import S2MNET_CITATION, S2MNET_DOI, check_tile, export_onnx

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from napari_s2mnet.checkpoint import ModelBundle

__all__ = ["build_network", "export_bioimageio", "test_image"]


def build_network(
    arch: str, in_channels: int, num_classes: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """The network of a napari-s2mnet model (random weights): the package's architecture."""
    from napari_s2mnet.model import ModelConfig, build_model

    config = ModelConfig(arch, int(in_channels), int(num_classes), dict(options or {}))
    return build_model(config).eval()


def test_image(tile: int, in_channels: int) -> np.ndarray:
    """A ``(tile, tile, in_channels)`` float32 crop of the bundled sample image (raw values)."""
    from napari_s2mnet._sample_data import load_nuclei

    image = np.asarray(load_nuclei()[0], dtype=np.float32)
    if image.ndim == 3:  # colour sample: average to gray first
        image = image.mean(axis=-1)
    reps = (-(-tile // image.shape[0]), -(-tile // image.shape[1]))
    image = np.tile(image, reps)[:tile, :tile]  # tiles larger than the sample repeat it
    return np.repeat(image[..., None], in_channels, axis=-1)


def _preprocess(x: np.ndarray, bundle: ModelBundle) -> np.ndarray:
    """What the package's preprocessing does to a ``(1, C, H, W)`` input (numpy reference)."""
    norm = bundle.normalization
    if norm.method == "none":
        return x.astype(np.float32)
    out = np.empty_like(x, dtype=np.float32)
    for c in range(x.shape[1]):
        chan = x[0, c] if norm.per_channel else x[0]
        lo, hi = np.percentile(chan, [norm.low, norm.high])
        out[0, c] = (x[0, c] - lo) / (hi - lo + 1e-6)
    if norm.clip:
        np.clip(out, -norm.clip, 1.0 + norm.clip, out=out)
    return out


def export_bioimageio(
    bundle: ModelBundle, path: str | os.PathLike, tile: int | None = None
) -> Path:
    """Write a bioimage.io model package (``.zip``, spec 0.5) for ``bundle``.

    Args:
        bundle: The model (network, config, normalisation, metadata).
        path: Output ``.zip``.
        tile: Square tile side of the ONNX graph and the test tensors (multiple of the stride);
            default the model's tile size.

    Returns:
        The written path (replaced atomically).
    """
    import torch

    try:
        from bioimageio.spec import save_bioimageio_package
        from bioimageio.spec.model import v0_5 as bio
    except ImportError as exc:
        raise RuntimeError(
            "bioimage.io export needs the bioimageio.spec package: "
            "pip install 'napari-s2mnet[bioimageio]'."
        ) from exc

    path = Path(path)
    model = bundle.model
    stride = int(getattr(model, "stride", 1))
    side = int(tile or -(-bundle.tile_size // stride) * stride)
    check_tile((side, side), stride)
    c_in, c_out = int(model.in_channels), int(getattr(model, "out_channels", model.num_classes))
    binary = int(bundle.config.num_classes) == 1

    with tempfile.TemporaryDirectory(prefix="s2mnet-bioimageio-") as tmp_name:
        tmp = Path(tmp_name)
        raw = test_image(side, c_in).transpose(2, 0, 1)[None]  # (1, C, Y, X)
        x = torch.from_numpy(_preprocess(raw, bundle))
        with torch.inference_mode():
            logits = model.eval()(x).float()
            prob = logits.sigmoid() if binary else logits.softmax(dim=1)
        np.save(tmp / "test_input.npy", raw.astype(np.float32))
        np.save(tmp / "test_output.npy", prob.numpy().astype(np.float32))
        export_onnx(model, tmp / "weights.onnx", (side, side))
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        _cover(tmp / "cover.png", raw[0, 0], prob.numpy()[0, 0])
        (tmp / "README.md").write_text(_readme(bundle, side), encoding="utf-8")
        descr = _description(bio, bundle, tmp, side, c_in, c_out, binary)
        out_tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_bioimageio_package(descr, output_path=out_tmp)
            os.replace(out_tmp, path)
        finally:
            out_tmp.unlink(missing_ok=True)
    return path


def _description(
    bio: Any, bundle: ModelBundle, tmp: Path, side: int, c_in: int, c_out: int, binary: bool
) -> Any:
    """The ``ModelDescr`` (spec 0.5) of the files in ``tmp``."""
    import torch
    from bioimageio.spec import ValidationContext

    norm = bundle.normalization
    pre: list[Any] = [bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))]
    if norm.method == "percentile":
        pre.append(
            bio.ScaleRangeDescr(
                kwargs=bio.ScaleRangeKwargs(
                    axes=("y", "x") if norm.per_channel else ("channel", "y", "x"),
                    min_percentile=float(norm.low),
                    max_percentile=float(norm.high),
                )
            )
        )
        if norm.clip:
            pre.append(
                bio.ClipDescr(
                    kwargs=bio.ClipKwargs(min=-float(norm.clip), max=1.0 + float(norm.clip))
                )
            )
    post = (
        [bio.SigmoidDescr()]
        if binary
        else [bio.SoftmaxDescr(kwargs=bio.SoftmaxKwargs(axis="channel"))]
    )

    def axes(n_channels: int, prefix: str, out: bool) -> list[Any]:
        space = bio.SpaceOutputAxis if out else bio.SpaceInputAxis
        return [
            bio.BatchAxis(),
            bio.ChannelAxis(
                channel_names=[bio.Identifier(f"{prefix}{i}") for i in range(n_channels)]
            ),
            space(id=bio.AxisId("y"), size=side),
            space(id=bio.AxisId("x"), size=side),
        ]

    inputs = [
        bio.InputTensorDescr(
            id=bio.TensorId("input"),
            axes=axes(c_in, "c", False),
            test_tensor=bio.FileDescr(source=tmp / "test_input.npy"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=pre,
            description="raw image intensities; the package normalises them",
        )
    ]
    outputs = [
        bio.OutputTensorDescr(
            id=bio.TensorId("output"),
            axes=axes(c_out, "p", True),
            test_tensor=bio.FileDescr(source=tmp / "test_output.npy"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            postprocessing=post,
            description="foreground probability" if binary else "class probabilities",
        )
    ]
    arch = bio.ArchitectureFromLibraryDescr(
        import_from="napari_s2mnet.bioimage_export",
        callable=bio.Identifier("build_network"),
        kwargs=bundle.config.to_dict(),
    )
    weights = bio.WeightsDescr(
        onnx=bio.OnnxWeightsDescr(source=tmp / "weights.onnx", opset_version=17),
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt",
            architecture=arch,
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
        ),
    )
    with ValidationContext(perform_io_checks=False):
        return bio.ModelDescr(
            name=_safe_name(bundle.name),
            description=str(
                bundle.metadata.get("description")
                or f"{bundle.config.arch} segmentation model from napari-s2mnet."
            ),
            authors=[bio.Author(name="napari-s2mnet developers")],
            cite=[bio.CiteEntry(text=S2MNET_CITATION, doi=bio.Doi(S2MNET_DOI))],
            license=bio.LicenseId("BSD-3-Clause"),
            documentation=bio.FileDescr(source=tmp / "README.md"),
            covers=[bio.FileDescr(source=tmp / "cover.png")],
            tags=["segmentation", "2d", "nuclei", "s2m-net", "napari-s2mnet"],
            inputs=inputs,
            outputs=outputs,
            weights=weights,
            version="0.1.0",
        )


def _safe_name(name: str) -> str:
    """bioimage.io names allow letters, digits, spaces and a few marks."""
    keep = "".join(ch if ch.isalnum() or ch in " _-()+." else " " for ch in name)
    return " ".join(keep.split())[:128] or "napari-s2mnet model"


def _cover(path: Path, image: np.ndarray, prob: np.ndarray) -> None:
    """A 2:1 PNG: the test input (contrast-stretched) beside the predicted probability."""
    import imageio.v3 as iio

    lo, hi = np.percentile(image, [1, 99.8])
    left = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    both = np.concatenate([left, np.clip(prob, 0, 1)], axis=1)
    iio.imwrite(path, (both * 255).astype(np.uint8))


def _readme(bundle: ModelBundle, side: int) -> str:
    held = bundle.metadata.get("held_out_dice") or {}
    scores = "\n".join(f"- {k}: {float(v):.3f}" for k, v in held.items()) or "- not recorded"
    return f"""# {bundle.name}

Exported by napari-s2mnet on {_dt.date.today().isoformat()}.

Architecture: `{bundle.config.arch}` ({bundle.config.in_channels} input channel(s),
{bundle.config.num_classes} output class(es)); S2M-Net (Chowdhury & Sabrin, ICML 2026).

Input: raw intensities of a {side} x {side} tile; the package normalises them as the model was
trained (percentile scale-range, then clip). Output: probabilities (sigmoid / softmax). For
larger images tile the image (napari-s2mnet blends overlapping tiles).

Held-out Dice recorded with the model:
{scores}

{S2MNET_CITATION}
"""
