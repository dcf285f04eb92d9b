"""The inference engine: image -> normalise -> tiles -> model -> blend -> labels + features.

What the Segment widget, the CLI (``python -m napari_s2mnet predict``) and the Python API
(:func:`segment`) call. The work is a generator (:func:`segment_iter`) that yields
:class:`Progress` after every batch of tiles and returns a :class:`SegmentationResult`; closing the
generator at any ``yield`` stops it without side effects (the model is left as it was, no file or
global setting is changed).

How an image is processed:

1. **Layout.** ``(Y, X)`` gray, ``(Y, X, 3|4)`` RGB(A) (alpha dropped), a channel axis anywhere
   (:class:`ImageLayout`), and up to two leading axes (``(Z|T, Y, X)``, ``(T, Z, Y, X)``) that
   are segmented slice by slice. Channels are matched to the model as in training: a 1-channel
   model on RGB sees the mean of the normalised colour channels, a multi-channel model on gray
   sees the gray replicated; any other mismatch is an error that says what to choose.
2. **Normalisation** with the model's :class:`~napari_s2mnet.preprocess.NormalizationConfig`;
   the statistics come from the whole image (or stack, or each slice with
   ``normalize_per_slice``), never from a tile, so all tiles are scaled alike and exactly as
   :func:`~napari_s2mnet.preprocess.normalize` scales the whole image. Tiles are normalised when
   they are cut out, so no full-size float copy of the image is ever made.
3. **Tiles.** Square tiles (a multiple of the network's stride, shrunk to the image when the
   image is smaller) on a grid whose starts are multiples of the stride, overlapping by
   ``overlap`` of a tile; the last row/column of tiles reaches past the image by less than one
   stride and is filled by mirroring. Each tile's probabilities are weighted by a separable
   Hann window (``sin^2``, positive everywhere) and accumulated; the sum of the weights is
   separable too (one vector per axis), so memory is one float32 map per output channel.
4. **Post-processing.** Binary models: threshold (model's own unless set), optional hole
   filling, 8-connected components (``scipy.ndimage.label``, what ``skimage.measure.label`` does,
   but writing int32 instead of int64), optional split of touching objects (distance transform
   + ``peak_local_max`` + watershed), removal of objects smaller than ``min_size`` and sequential
   ids. Multi-class models: semantic labels (label = argmax class id). Stacks get ids that are
   unique across slices (each slice's ids are offset by the objects before it). Labels use the
   smallest unsigned dtype (:func:`napari_s2mnet.io.smallest_uint_dtype`).
5. **Features** from :func:`napari_s2mnet.morphology.object_features` per 2-D slice, with the
   physical pixel size from ``spacing`` and the mean probability per object.

Bad input raises ``ValueError``/``TypeError`` with what was wrong and what to do, before torch
sees it. Images with NaN or Inf values are refused (replace them first, e.g.
``np.nan_to_num(image)``): silently replacing them would hide a problem with the data.

GPU memory: a CUDA/MPS out-of-memory error is retried with one tile per batch, then smaller tiles,
then on the CPU; each step is recorded in :attr:`SegmentationResult.messages`. Mixed precision
(float16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.layout import (
    ImageLayout,
    ImagePlan,
    check_array,
    check_finite,
    check_spacing,
    guess_layout,
    plan_image,
    resolve_layout,
)
from napari_s2mnet.tiling import ROW_BLOCK, Grid, blend_iter, grid, pad_to, round_up

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

    from napari_s2mnet.checkpoint import ModelBundle
    from napari_s2mnet.preprocess import NormalizationStats

__all__ = [
    "ImageLayout",
    "InferenceConfig",
    "Progress",
    "SegmentationResult",
    "guess_layout",
    "predict_paths",
    "run_to_end",
    "segment",
    "segment_iter",
]

log = logging.getLogger(__name__)

_ROW_BLOCK = ROW_BLOCK

# Old private names, kept while training.py and the tests move to napari_s2mnet.layout / tiling.
_check_array = check_array
_resolve_layout = resolve_layout
_plan = plan_image
_check_finite = check_finite
_check_spacing = check_spacing
_grid = grid


# --------------------------------------------------------------------------------------------
# Public dataclasses


@dataclass
class InferenceConfig:
    """Settings of one segmentation run (the single source of the widget's defaults).

    Attributes:
        tile_size: Tile side in pixels (rounded up to a multiple of the network's stride; tiles
            shrink to the image when it is smaller). ``None``: the model's own
            (:attr:`~napari_s2mnet.checkpoint.ModelBundle.tile_size`, the crop size it was
            trained with: S2M-Net's truncated spectrum makes it most accurate at that size).
        overlap: Overlap of neighbouring tiles as a fraction of the tile side, in ``[0, 0.75]``.
        batch_size: Tiles per forward pass.
        threshold: Probability threshold for binary models; ``None`` uses the model's own
            (stored in the model file, default 0.5).
        device: ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        min_size: Objects smaller than this many pixels are removed (binary models).
        fill_holes: Fill holes inside objects (binary models).
        split_touching: Split touching objects with a distance-transform watershed.
        split_min_distance: Minimum distance in pixels between the centres of split objects.
        tta: Test-time augmentation: average the probabilities over horizontal/vertical flips
            (4 passes, 4x slower).
        amp: Mixed precision (float16) on CUDA GPUs; ignored on CPU and MPS.
        uncertainty: Also return a per-pixel uncertainty map (normalised entropy, in ``[0, 1]``).
        return_probability: Also return the foreground probability map (float32).
        compute_features: Compute the morphology features table.
        normalize_per_slice: Stacks / time series: normalise every slice with its own statistics
            instead of the whole stack's (the default keeps empty slices dark).
        z_context: Stacks: 2.5-D smoothing. Each slice's probabilities are averaged with those of
            its ``z_context`` neighbours on either side along the last stack axis (z; never
            across time points) before thresholding, so objects stay consistent from slice to
            slice. No extra network passes; memory for ``2 * z_context + 1`` probability maps.
            0 (default): every slice on its own.
    """

    tile_size: int | None = None
    overlap: float = 0.125
    batch_size: int = 4
    threshold: float | None = None
    device: str = "auto"
    min_size: int = 10
    fill_holes: bool = False
    split_touching: bool = False
    split_min_distance: int = 5
    tta: bool = False
    amp: bool = True
    uncertainty: bool = False
    return_probability: bool = False
    compute_features: bool = True
    normalize_per_slice: bool = False
    z_context: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` with an actionable message for impossible settings."""
        if self.tile_size is not None and (
            not isinstance(self.tile_size, int | np.integer) or self.tile_size < 16
        ):
            raise ValueError(
                f"tile_size must be an integer >= 16 pixels (or None for the model's own), got "
                f"{self.tile_size!r}."
            )
        if not 0.0 <= float(self.overlap) <= 0.75:
            raise ValueError(
                f"overlap is a fraction of the tile size in [0, 0.75], got {self.overlap!r} "
                "(0.25 = a quarter of a tile)."
            )
        if not isinstance(self.batch_size, int | np.integer) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}.")
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(
                f"threshold must be a probability strictly between 0 and 1 (or None for the "
                f"model's own), got {self.threshold!r}."
            )
        if not isinstance(self.min_size, int | np.integer) or self.min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0 pixels, got {self.min_size!r}.")
        if not isinstance(self.split_min_distance, int | np.integer) or self.split_min_distance < 1:
            raise ValueError(
                "split_min_distance must be an integer >= 1 pixel, got "
                f"{self.split_min_distance!r}."
            )
        if not isinstance(self.z_context, int | np.integer) or self.z_context < 0:
            raise ValueError(
                f"z_context must be an integer >= 0 slices (0 = no 2.5-D smoothing), got "
                f"{self.z_context!r}."
            )
        if not isinstance(self.device, str):
            raise TypeError(
                f"device must be a string such as 'auto' or 'cpu', got {self.device!r}."
            )


@dataclass(frozen=True)
class Progress:
    """One progress report of :func:`segment_iter`.

    Attributes:
        done: Work units finished (tiles, plus one post-processing step per slice).
        total: Work units in all (may grow after an out-of-memory fallback to smaller tiles).
        stage: ``"prepare"``, ``"predict"``, ``"postprocess"`` or ``"done"``.
        message: Human-readable detail, e.g. ``"slice 2/5: tile 12/48"``.
    """

    done: int
    total: int
    stage: str
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` in ``[0, 1]``."""
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass
class SegmentationResult:
    """What :func:`segment_iter` returns.

    Attributes:
        labels: Label image shaped like the image without its channel axis; smallest unsigned
            dtype. Instance ids (binary models, unique across slices) or class ids (multi-class).
        features: One row per label id (:func:`napari_s2mnet.morphology.object_features`
            columns, plus one column per leading axis of a stack giving the object's slice).
        probability: Foreground probability (float32, labels' shape) when requested:
            ``p`` for binary models, ``1 - p(background)`` for multi-class models.
        uncertainty: Normalised entropy in ``[0, 1]`` (float32, labels' shape) when requested.
        device: Description of the device that did the work (e.g. ``"CPU (2 threads)"``).
        messages: Notes for the user (channel conversions, out-of-memory fallbacks ...).
        threshold: Threshold used (binary models), else ``None``.
        semantic: True for multi-class (class-id) labels.
        layout: The layout that was used.
        spacing: Physical pixel size per labels axis.
        n_tiles: Tiles run through the model (all slices, all fallbacks).
        timings: Seconds per stage (``prepare``, ``predict``, ``postprocess``, ``features``).
    """

    labels: np.ndarray
    features: pd.DataFrame
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    device: str = ""
    messages: list[str] = field(default_factory=list)
    threshold: float | None = None
    semantic: bool = False
    layout: ImageLayout | None = None
    spacing: tuple[float, ...] | None = None
    n_tiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Input checks and planning


def _resolve_model(model: Any) -> ModelBundle:
    from napari_s2mnet import checkpoint

    if model is None:
        return checkpoint.load_default_model()
    if isinstance(model, str | os.PathLike):
        return checkpoint.load_model(model)
    if all(hasattr(model, a) for a in ("model", "config", "normalization")):
        return model
    raise TypeError(
        f"model must be a ModelBundle (network + config + normalisation), a path to a "
        f".safetensors model file, or None for the bundled model; got {type(model).__name__}. "
        "Wrap a bare network with napari_s2mnet.checkpoint.ModelBundle(network, config)."
    )


# --------------------------------------------------------------------------------------------
# Tiling


# --------------------------------------------------------------------------------------------
# The engine: model on a device, tiles in, blended probabilities out


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move a tensor or module (one place, so tests can simulate a GPU)."""
    return obj.to(device)


def _model_device(model: Any) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


class _Engine:
    """Runs tiles through the network; owns the device state and the out-of-memory fallback."""

    def __init__(self, bundle: ModelBundle, config: InferenceConfig, notes: list[str]) -> None:
        from napari_s2mnet import devices

        self.bundle = bundle
        self.config = config
        self.notes = notes
        self.binary = int(bundle.config.num_classes) == 1
        self.out_channels = 1 if self.binary else int(bundle.config.num_classes)
        self.stride = max(1, int(getattr(bundle.model, "stride", 1) or 1))
        device = devices.resolve_device(config.device)
        tile = round_up(int(config.tile_size or bundle.tile_size), self.stride)
        self.min_tile = max(self.stride, round_up(64, self.stride))
        self.state = devices.FallbackState(str(device), tile, int(config.batch_size))
        # Per-module flags: eval() below must not leave a trace on the caller's model.
        self.original_modes = [(m, m.training) for m in bundle.model.modules()]
        self.net: Any = None
        self.device: Any = None
        self.n_tiles = 0
        self._set_device(device)

    # -- device handling -----------------------------------------------------------------
    def _set_device(self, device: torch.device) -> None:
        from napari_s2mnet import devices

        model = self.bundle.model
        current = _model_device(model)
        if current is None or current == device:
            net = model  # already there: use it in place (eval mode restored in close())
        else:
            # Work on a copy so the caller's model stays on its device.
            net = _to_device(copy.deepcopy(model), device)
        net.eval()
        self.net = net
        self.device = device
        self.description = devices.describe_device(device)
        self.amp = bool(self.config.amp) and devices.supports_amp(device)

    def close(self) -> None:
        """Restore the caller's model (training flag) and free the device copy."""
        from napari_s2mnet import devices

        for module, mode in self.original_modes:
            module.training = mode
        copied = self.net is not None and self.net is not self.bundle.model
        self.net = None
        if copied:
            devices.empty_cache(self.device)

    def _fallback(self, exc: BaseException) -> None:
        import torch

        from napari_s2mnet import devices

        step = devices.next_fallback(self.state, min_tile=self.min_tile, multiple=self.stride)
        devices.empty_cache(self.device)
        if step is None:
            raise RuntimeError(
                f"Out of memory even on the CPU with {self.state.tile_size} px tiles. Close other "
                "programs, or segment a smaller image / crop."
            ) from exc
        new, message = step
        log.warning(message)
        self.notes.append(message)
        if new.device != self.state.device:
            if self.net is not self.bundle.model:
                self.net = None
            self._set_device(torch.device(new.device))
        self.state = new

    # -- prediction ------------------------------------------------------------------------
    def grid(self, shape: tuple[int, int]) -> Grid:
        return grid(shape, self.state.tile_size, float(self.config.overlap), self.stride)

    def predict(
        self, region: np.ndarray, plan: ImagePlan, stats: NormalizationStats, counter: _Counter
    ) -> Generator[Progress, None, np.ndarray]:
        """Blended probabilities ``(C_out, Y, X)`` of one 2-D slice ``(Y, X, C_img)``."""
        from napari_s2mnet import devices

        start = counter.done
        while True:
            try:
                return (yield from self._predict_once(region, plan, stats, counter))
            except RuntimeError as exc:
                if not devices.is_oom_error(exc):
                    raise
                counter.done = start  # this slice starts again with the new settings
                old_tiles = counter.tiles_per_slice
                self._fallback(exc)
                counter.tiles_per_slice = self.grid(region.shape[:2]).n_tiles
                counter.total += (counter.tiles_per_slice - old_tiles) * counter.slices_left
            # The failed batch's tensors are only garbage once the exception is gone.
            devices.empty_cache(self.device)

    def _predict_once(
        self, region: np.ndarray, plan: ImagePlan, stats: NormalizationStats, counter: _Counter
    ) -> Generator[Progress, None, np.ndarray]:
        from napari_s2mnet.preprocess import apply_normalization

        height, width = region.shape[:2]
        g = self.grid((height, width))

        def predict_batch(batch: list[tuple[int, int]]) -> np.ndarray:
            xs = []
            for sy, sx in batch:
                part = plan.select(region[sy : sy + g.tile_y, sx : sx + g.tile_x])
                part = apply_normalization(part, stats, channel_axis=-1)
                part = pad_to(plan.post(part), g.tile_y, g.tile_x)
                xs.append(part.transpose(2, 0, 1))
            return self._forward(np.ascontiguousarray(np.stack(xs)))

        blending = blend_iter((height, width), g, self.out_channels, predict_batch,
                              self.state.batch_size)
        done_before = 0
        while True:
            try:
                done = next(blending)
            except StopIteration as stop:
                acc = stop.value
                break
            self.n_tiles += done - done_before
            counter.done += done - done_before
            done_before = done
            yield counter.progress("predict", f"{counter.slice_text()}tile {done}/{g.n_tiles}")
        np.clip(acc, 0.0, 1.0, out=acc)
        return acc

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = _to_device(torch.from_numpy(batch), self.device)
        flips: list[tuple[int, ...]] = [()]
        if self.config.tta:
            flips += [(-1,), (-2,), (-2, -1)]
        total = None
        with torch.inference_mode():
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    logits = self.net(xi)
                self._check_output(logits, xi)
                logits = logits.float()
                p = torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)
                if dims:
                    p = torch.flip(p, dims)
                total = p if total is None else total + p
            assert total is not None
            if len(flips) > 1:
                total = total / len(flips)
            out = total.cpu().numpy()
        if not np.isfinite(out).all():
            note = "The model produced NaN/Inf outputs for some pixels (treated as background)."
            if note not in self.notes:
                self.notes.append(note)
                log.warning(note)
            np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        return out

    def _check_output(self, logits: Any, x: Any) -> None:
        expected = (x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        if tuple(logits.shape) != expected:
            raise RuntimeError(
                f"The model returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; "
                f"expected {expected}. The model file's config (num_classes="
                f"{self.bundle.config.num_classes}) may not match its network."
            )


@dataclass
class _Counter:
    """Progress bookkeeping shared by the slice loop and the engine."""

    total: int
    tiles_per_slice: int
    n_slices: int
    done: int = 0
    slice_index: int = 0

    @property
    def slices_left(self) -> int:
        return self.n_slices - self.slice_index

    def slice_text(self) -> str:
        return f"slice {self.slice_index + 1}/{self.n_slices}: " if self.n_slices > 1 else ""

    def progress(self, stage: str, message: str) -> Progress:
        return Progress(self.done, self.total, stage, message)


# --------------------------------------------------------------------------------------------
# Post-processing


def _instances(
    prob: np.ndarray, threshold: float, config: InferenceConfig
) -> tuple[np.ndarray, int]:
    """Instance labels (smallest uint dtype) and their count from a probability map."""
    from scipy import ndimage as ndi

    from napari_s2mnet.io import smallest_uint_dtype

    mask = prob > threshold
    if config.fill_holes:
        mask = ndi.binary_fill_holes(mask)
    lab = np.zeros(mask.shape, dtype=np.int32)
    n = int(ndi.label(mask, structure=np.ones((3, 3), dtype=bool), output=lab))
    if n and config.split_touching:
        lab, n = _split_touching(mask, lab, n, config.split_min_distance)
    del mask
    if n == 0:
        return np.zeros(prob.shape, dtype=np.uint8), 0
    sizes = np.zeros(n + 1, dtype=np.int64)
    for r0 in range(0, lab.shape[0], _ROW_BLOCK):  # bincount makes an int64 copy: go by blocks
        sizes += np.bincount(lab[r0 : r0 + _ROW_BLOCK].ravel(), minlength=n + 1)
    keep = sizes >= max(1, int(config.min_size))
    keep[0] = False
    count = int(keep.sum())
    dtype = smallest_uint_dtype(count)
    lut = np.zeros(sizes.size, dtype=dtype)
    lut[keep] = np.arange(1, count + 1, dtype=dtype)
    return lut[lab], count


def _split_touching(
    mask: np.ndarray, lab: np.ndarray, n: int, min_distance: int
) -> tuple[np.ndarray, int]:
    """Split touching objects: watershed of the distance transform from its local maxima."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=int(min_distance), labels=lab, exclude_border=False)
    marker_mask = np.zeros(mask.shape, dtype=bool)
    marker_mask[tuple(peaks.T)] = True
    # Neighbouring peak pixels (plateaus) form one marker, not several.
    markers = np.zeros(mask.shape, dtype=np.int32)
    m = int(ndi.label(marker_mask, structure=np.ones((3, 3), dtype=bool), output=markers))
    split = watershed(-dist, markers, mask=mask).astype(np.int32, copy=False)
    # Objects that got no marker (too small for a peak) keep their connected component.
    missed = mask & (split == 0)
    if missed.any():
        extra = np.zeros(mask.shape, dtype=np.int32)
        k = int(ndi.label(missed, structure=np.ones((3, 3), dtype=bool), output=extra))
        split[missed] = extra[missed] + m
        m += k
    return split, m


def _semantic(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-id labels, confidence (max probability) and foreground probability, in row blocks."""
    from napari_s2mnet.io import smallest_uint_dtype

    c, height, width = acc.shape
    labels = np.empty((height, width), dtype=smallest_uint_dtype(c - 1))
    conf = np.empty((height, width), dtype=np.float32)
    fg = np.empty((height, width), dtype=np.float32)
    for r0 in range(0, height, _ROW_BLOCK):
        block = acc[:, r0 : r0 + _ROW_BLOCK]
        labels[r0 : r0 + _ROW_BLOCK] = block.argmax(axis=0)
        conf[r0 : r0 + _ROW_BLOCK] = block.max(axis=0)
        fg[r0 : r0 + _ROW_BLOCK] = 1.0 - block[0]
    return labels, conf, fg


def _entropy(acc: np.ndarray) -> np.ndarray:
    """Normalised entropy in ``[0, 1]`` per pixel (binary: of ``p``; else over the classes)."""
    c, height, width = acc.shape
    out = np.empty((height, width), dtype=np.float32)
    eps = 1e-7
    for r0 in range(0, height, _ROW_BLOCK):
        block = np.clip(acc[:, r0 : r0 + _ROW_BLOCK], eps, 1.0).astype(np.float64)
        if c == 1:
            p = block[0]
            q = np.clip(1.0 - p, eps, 1.0)
            h = -(p * np.log2(p) + q * np.log2(q))
        else:
            h = -(block * np.log(block)).sum(axis=0) / np.log(c)
        out[r0 : r0 + _ROW_BLOCK] = np.clip(h, 0.0, 1.0)
    return out


def _empty_features() -> pd.DataFrame:
    from napari_s2mnet.morphology import object_features

    return object_features(np.zeros((1, 1), dtype=np.uint8))


def _aggregate_semantic(df: pd.DataFrame, n_slices: int, slice_area: float) -> pd.DataFrame:
    """One row per class over all slices of a stack.

    Areas add up; ``scale`` is the class's share of the whole stack; the shape descriptors and
    the mean probability are area-weighted means over the slices (the convention
    :func:`napari_s2mnet.morphology.mask_descriptors` uses for several objects).
    """
    import pandas as pd

    from napari_s2mnet.morphology import FEATURE_COLUMNS

    rows = []
    for lid, g in df.groupby("label", sort=True):
        w = g["area_px"].to_numpy(dtype=np.float64)
        wsum = w.sum() or 1.0
        row: dict[str, Any] = {
            "index": int(lid),
            "label": int(lid),
            "area_px": int(w.sum()),
            "area": float(g["area"].sum()),
            "scale": float(w.sum() / (n_slices * slice_area)),
            "class": int(g["class"].iloc[0]),
        }
        for col in ("compactness", "tubularity", "irregularity", "mean_probability"):
            row[col] = float((g[col].to_numpy(dtype=np.float64) * w).sum() / wsum)
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))
    return out.astype({"index": "int64", "label": "int64", "area_px": "int64", "class": "int64"})


# --------------------------------------------------------------------------------------------
# The generator


def segment_iter(
    image: Any,
    model: Any = None,
    config: InferenceConfig | None = None,
    layout: ImageLayout | None = None,
    spacing: Sequence[float] | None = None,
) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image``, yielding :class:`Progress`; returns a :class:`SegmentationResult`.

    Closing the generator (``gen.close()``, or napari's worker quit) at any ``yield`` stops the
    work cleanly: nothing is returned, the model is left as it was.

    Args:
        image: Array as napari holds it (see the module docstring for layouts); bool, integer or
            float pixels (finite).
        model: A :class:`~napari_s2mnet.checkpoint.ModelBundle`, a path to a ``.safetensors``
            model file, or ``None`` for the bundled default model.
        config: Run settings (default :class:`InferenceConfig`).
        layout: How to read the axes (default :func:`guess_layout`).
        spacing: Physical pixel size per non-channel axis (napari's ``layer.scale``) or
            ``(dy, dx)``; used for the ``area`` feature.

    Raises:
        ValueError / TypeError: Bad input, with what to change.
        RuntimeError: Out of memory even on the CPU, or a model that breaks its contract.
    """
    from napari_s2mnet.io import smallest_uint_dtype
    from napari_s2mnet.morphology import object_features
    from napari_s2mnet.preprocess import pixel_samples, stats_from_samples

    t_start = time.perf_counter()
    timings = {"prepare": 0.0, "predict": 0.0, "postprocess": 0.0, "features": 0.0}
    cfg = config if config is not None else InferenceConfig()
    if not isinstance(cfg, InferenceConfig):
        raise TypeError(f"config must be an InferenceConfig, got {type(cfg).__name__}.")
    cfg.validate()
    arr = check_array(image)
    lay = resolve_layout(arr, layout)
    bundle = _resolve_model(model)
    notes: list[str] = []
    plan = plan_image(arr, lay, int(bundle.config.in_channels), notes)
    spacing_t = check_spacing(spacing, arr, plan)
    check_finite(plan)
    binary = int(bundle.config.num_classes) == 1
    threshold = float(cfg.threshold if cfg.threshold is not None else bundle.threshold)
    if binary and not 0.0 < threshold < 1.0:
        raise ValueError(f"The model's stored threshold {threshold} is not in (0, 1); set one.")
    for note in notes:
        log.info(note)

    n_slices = plan.n_slices
    height, width = plan.spatial
    engine = _Engine(bundle, cfg, notes)
    try:
        tiles = engine.grid((height, width)).n_tiles
        counter = _Counter(total=n_slices * (tiles + 1), tiles_per_slice=tiles, n_slices=n_slices)
        timings["prepare"] += time.perf_counter() - t_start
        yield counter.progress("prepare", f"{n_slices * tiles} tiles on {engine.description}")

        def stats_for(region: np.ndarray, n_spatial: int) -> NormalizationStats:
            samples = plan.select(pixel_samples(region, n_spatial))
            return stats_from_samples(samples, bundle.normalization)

        t0 = time.perf_counter()
        stats = None if cfg.normalize_per_slice else stats_for(plan.view, plan.view.ndim - 1)
        timings["prepare"] += time.perf_counter() - t0

        slice_labels: list[np.ndarray] = []
        offsets: list[int] = []
        frames: list[pd.DataFrame] = []
        prob_out: np.ndarray | None = None
        unc_out: np.ndarray | None = None
        total_objects = 0
        def predictions() -> Generator[Progress | _Predicted, None, None]:
            for k, idx in enumerate(np.ndindex(*plan.lead)):
                counter.slice_index = k
                region = plan.view[idx]
                t0 = time.perf_counter()
                slice_stats = stats if stats is not None else stats_for(region, 2)
                acc = yield from engine.predict(region, plan, slice_stats, counter)
                timings["predict"] += time.perf_counter() - t0
                yield _Predicted(idx, acc)

        stream = predictions()
        if cfg.z_context and plan.lead:
            stream = _z_smoothed(stream, int(cfg.z_context), plan.lead)
        for item in stream:
            if isinstance(item, Progress):
                yield item
                continue
            idx, acc = item.idx, item.acc
            t1 = time.perf_counter()
            unc = _entropy(acc) if cfg.uncertainty else None
            if binary:
                prob = acc[0]
                lab, count = _instances(prob, threshold, cfg)
                conf = prob
                classes = None
            else:
                lab, conf, prob = _semantic(acc)
                count = int(lab.max()) if lab.size else 0
                classes = lab
            del acc
            if cfg.return_probability:
                if not plan.lead:
                    prob_out = prob
                else:
                    if prob_out is None:
                        prob_out = np.empty((*plan.lead, height, width), dtype=np.float32)
                    prob_out[idx] = prob
            if unc is not None:
                if not plan.lead:
                    unc_out = unc
                else:
                    if unc_out is None:
                        unc_out = np.empty((*plan.lead, height, width), dtype=np.float32)
                    unc_out[idx] = unc
            t2 = time.perf_counter()
            timings["postprocess"] += t2 - t1

            offset = total_objects if binary else 0
            if cfg.compute_features:
                df = object_features(
                    lab, spacing=spacing_t[-2:], probability=conf, classes=classes
                )
                if offset:
                    df["index"] += offset
                    df["label"] += offset
                for name, i in zip(plan.lead_names, idx, strict=True):
                    df[name] = i
                frames.append(df)
            timings["features"] += time.perf_counter() - t2
            del prob, conf, classes
            slice_labels.append(lab)
            offsets.append(offset)
            total_objects = total_objects + count if binary else max(total_objects, count)
            counter.done += 1
            yield counter.progress("postprocess", f"{counter.slice_text()}post-processed")

        labels = _assemble(slice_labels, offsets, plan, total_objects, smallest_uint_dtype)
        del slice_labels
        features = _combine_features(frames, plan, binary, cfg.compute_features)
        timings["total"] = time.perf_counter() - t_start
        result = SegmentationResult(
            labels=labels,
            features=features,
            probability=prob_out,
            uncertainty=unc_out,
            device=engine.description,
            messages=list(notes),
            threshold=threshold if binary else None,
            semantic=not binary,
            layout=lay,
            spacing=spacing_t,
            n_tiles=engine.n_tiles,
            timings=timings,
        )
        yield Progress(counter.total, counter.total, "done", f"{total_objects} objects")
        return result
    finally:
        engine.close()


@dataclass
class _Predicted:
    """The blended class probabilities ``(C, H, W)`` of the slice at leading index ``idx``."""

    idx: tuple[int, ...]
    acc: np.ndarray


def _z_smoothed(
    stream: Generator[Progress | _Predicted, None, None], n: int, lead: tuple[int, ...]
) -> Generator[Progress | _Predicted, None, None]:
    """Average every slice's probabilities over its +-``n`` neighbours along the last lead axis.

    Progress passes through; slices come out in the order they went in, each as soon as its
    last neighbour has arrived (so at most ``2n + 1`` maps are held). Windows are clipped at the
    ends of the axis and never cross the other lead axes (time points).
    """
    depth = lead[-1]
    window: dict[int, np.ndarray] = {}  # z -> probabilities of the current z-run
    pending: deque[tuple[int, ...]] = deque()

    def emit(idx: tuple[int, ...]) -> _Predicted:
        z = idx[-1]
        neighbours = [window[j] for j in range(max(0, z - n), min(depth, z + n + 1))]
        out = np.mean(neighbours, axis=0, dtype=np.float64).astype(np.float32)
        for j in [j for j in window if j < z - n + 1]:  # no later slice needs these
            del window[j]
        return _Predicted(idx, out)

    for item in stream:
        if isinstance(item, Progress):
            yield item
            continue
        window[item.idx[-1]] = item.acc
        pending.append(item.idx)
        # The oldest pending slice is ready when its window's last slice is in.
        while pending and min(depth - 1, pending[0][-1] + n) <= item.idx[-1]:
            yield emit(pending.popleft())
        if not pending:  # only at the end of a z-run (n >= 1): the next time point starts afresh
            window.clear()
    while pending:
        yield emit(pending.popleft())


def _assemble(
    slices: list[np.ndarray],
    offsets: list[int],
    plan: ImagePlan,
    max_id: int,
    smallest: Callable[[int], np.dtype],
) -> np.ndarray:
    dtype = smallest(max_id)
    if not plan.lead:
        return slices[0].astype(dtype, copy=False)
    out = np.zeros((*plan.lead, *plan.spatial), dtype=dtype)
    for idx, lab, off in zip(np.ndindex(*plan.lead), slices, offsets, strict=True):
        if off:
            fg = lab > 0
            out[idx][fg] = lab[fg].astype(dtype) + dtype.type(off)
        else:
            out[idx] = lab
    return out


def _combine_features(
    frames: list[pd.DataFrame], plan: ImagePlan, binary: bool, wanted: bool
) -> pd.DataFrame:
    import pandas as pd

    if not wanted:
        return _empty_features()
    parts = [f for f in frames if len(f)]
    if not parts:
        df = _empty_features()
        if binary:
            for name in plan.lead_names:
                df[name] = pd.Series(dtype="int64")
        return df
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if not binary and plan.lead:
        df = _aggregate_semantic(df, plan.n_slices, float(plan.spatial[0] * plan.spatial[1]))
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Convenience API


def run_to_end(
    gen: Generator[Progress, None, Any], callback: Callable[[Progress], Any] | None = None
) -> Any:
    """Drive a progress generator to its end and return its return value."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(p)


def segment(
    image: Any,
    model: Any = None,
    config: InferenceConfig | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment ``image``; returns ``(labels, features)``.

    Args:
        image: Image array (see :func:`segment_iter`).
        model: ModelBundle, path to a ``.safetensors`` file, or ``None`` for the bundled model.
        config: Run settings.
        **kwargs: ``layout=``, ``spacing=`` (as in :func:`segment_iter`) and/or any
            :class:`InferenceConfig` field to override, e.g. ``tile_size=256, device="cpu"``.

    Example:
        >>> labels, features = segment(image, load_model("nuclei.safetensors"), min_size=20)
    """
    layout = kwargs.pop("layout", None)
    spacing = kwargs.pop("spacing", None)
    if kwargs:
        names = {f.name for f in dataclasses.fields(InferenceConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"segment() got unknown option(s) {unknown}; valid: layout, spacing, "
                f"{', '.join(sorted(names))}."
            )
        config = dataclasses.replace(config or InferenceConfig(), **kwargs)
    result: SegmentationResult = run_to_end(segment_iter(image, model, config, layout, spacing))
    for note in result.messages:
        log.info(note)
    return result.labels, result.features


# --------------------------------------------------------------------------------------------
# Files (the CLI's ``predict``)


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Image files from files and folders; also the named paths that do not exist."""
    from napari_s2mnet.io import IMAGE_SUFFIXES

    files: list[Path] = []
    missing: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in IMAGE_SUFFIXES and p.suffix.lower() != ".npy"
            )
            ignored = [p.name for p in path.iterdir() if p.is_file() and p not in found]
            if ignored:
                log.info("%s: ignoring %d non-image file(s): %s", path, len(ignored),
                         ", ".join(sorted(ignored)[:5]))
            if not found:
                log.warning("%s: no image files (TIFF, PNG, JPG) in this folder.", path)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(path)
    return files, missing


class _TextProgress:
    """A one-line text progress bar on stderr (rewritten in place on a terminal)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = 0.0

    def update(self, head: str, p: Progress) -> None:
        now = time.monotonic()
        if self.tty and now - self.last < 0.1 and p.done < p.total:
            return
        self.last = now
        width = 24
        filled = round(width * p.fraction)
        bar = "#" * filled + "." * (width - filled)
        line = f"{head} [{bar}] {100 * p.fraction:5.1f}% {p.message}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        elif p.stage == "done":
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def predict_paths(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    device: str = "auto",
    tile_size: int | None = None,
    threshold: float | None = None,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    config: InferenceConfig | None = None,
    stream: Any = None,
) -> int:
    """Segment image files and folders; write ``<stem>_labels.tif`` and ``<stem>_features.csv``.

    Unreadable files are logged and skipped; the others are still processed.

    Args:
        inputs: Image files (TIFF, PNG, JPG) or folders of them (not recursive).
        output: Output folder (created when missing).
        model_path: ``.safetensors`` model; ``None`` for the bundled default model.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        tile_size: Tile side in pixels (default: :class:`InferenceConfig`'s).
        threshold: Probability threshold (default: the model's).
        channel_axis: Axis holding channels, if any (RGB(A) files and TIFFs whose axes name a
            ``C`` axis are recognised by themselves).
        channels: Channels that feed the model, in order (see :attr:`ImageLayout.channels`).
        config: Base settings (the arguments above override it).
        stream: Where the progress line goes (default ``sys.stderr``).

    Returns:
        Exit code: 0 when every image was segmented, 1 when some were skipped.

    Raises:
        FileNotFoundError / ValueError: No model, no input image at all, or a bad setting.
    """
    from napari_s2mnet import checkpoint
    from napari_s2mnet.io import load_image, write_features_csv, write_labels

    cfg = dataclasses.replace(config or InferenceConfig(), device=device)
    if tile_size is not None:
        cfg.tile_size = int(tile_size)
    if threshold is not None:
        cfg.threshold = float(threshold)
    cfg.validate()
    files, missing = _expand_inputs(inputs)
    for path in missing:
        log.error("%s: no such file or folder; skipped.", path)
    if not files:
        raise FileNotFoundError(
            "No input images found in " + ", ".join(str(p) for p in inputs)
            + " (supported: .tif, .tiff, .png, .jpg, .jpeg, .bmp)."
        )
    if model_path is not None:
        bundle = checkpoint.load_model(model_path)
    else:
        bundle = checkpoint.load_default_model()
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"Output {out_dir} exists and is not a folder; choose a folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("model: %s; %d image(s) -> %s", bundle.name, len(files), out_dir)

    bar = _TextProgress(stream)
    skipped = len(missing)
    used: set[str] = set()
    for n, path in enumerate(files, start=1):
        head = f"[{n}/{len(files)}] {path.name}"
        try:
            img = load_image(path)
            if channel_axis is not None:
                layout = ImageLayout(channel_axis=channel_axis)
            elif "C" in img.axes and len(img.axes) == img.data.ndim:  # a TIFF that says so
                layout = ImageLayout(channel_axis=img.axes.index("C"))
            else:  # colour as the file declares it, else napari's guess
                layout = guess_layout(img.data.shape, rgb=True if img.rgb else None)
            if channels is not None:
                layout = dataclasses.replace(layout, channels=tuple(channels))
            spacing = img.spacing
            n_plain = img.data.ndim - (layout.channel_axis is not None)
            if spacing is not None and len(spacing) != n_plain:
                spacing = spacing[-2:]  # Y and X are the last axes of every TIFF series
            result = run_to_end(
                segment_iter(img.data, bundle, cfg, layout, spacing),
                lambda p, head=head: bar.update(head, p),
            )
        except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as exc:
            bar.finish()
            log.error("%s: skipped: %s", path, exc)
            skipped += 1
            continue
        bar.finish()
        for note in result.messages:
            log.info("%s: %s", path.name, note)
        stem = path.stem
        if stem in used:  # same name from two folders: keep both
            i = 2
            while f"{path.stem}_{i}" in used:
                i += 1
            stem = f"{path.stem}_{i}"
            log.warning("%s: another input has the same name; writing %s_*", path, stem)
        used.add(stem)
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}[result.labels.ndim]
        write_labels(out_dir / f"{stem}_labels.tif", result.labels,
                     spacing=result.spacing if img.spacing is not None else None,
                     unit=img.unit, axes=axes)
        write_features_csv(result.features, out_dir / f"{stem}_features.csv")
        log.info("%s: %d objects, %.1f s on %s", path.name, len(result.features),
                 result.timings.get("total", math.nan), result.device)
    if skipped:
        log.warning("%d of %d input(s) skipped (see the errors above).", skipped,
                    len(files) + len(missing))
        return 1
    return 0

