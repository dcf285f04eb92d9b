"""Learning from corrections: corrected regions, their validation split, region-weighted loss,
and the fine-tune scope (which weights train).

A *corrected* mask marks the pixels the user painted, filled or erased (the Fine-tune widget
records them from napari's paint events; :mod:`benchmarks.hitl_annotator` makes them for a
simulated annotator). Only those pixels are known to be right: the rest of a labels layer is the
model's own output. So, when masks are given,

* crops are centred on corrected pixels;
* the loss is BCE + soft Dice averaged over the corrected pixels, plus
  :attr:`FinetuneConfig.uncorrected_weight` times the same averaged over the other pixels of the
  crop (docs/methods.md); pixels around held-out regions are ignored;
* validation, when asked for (``val_fraction`` > 0; the interactive presets set 0), uses
  held-out corrected regions only (connected components of the mask), when there are at least
  :data:`MIN_VAL_REGIONS` of them; otherwise there is no validation and the final state is
  returned;
* :func:`scoring_tiles` are where a model is scored on the corrected regions (before / after,
  for the user; validation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from napari_s2mnet.training.config import FinetuneConfig

# Fewer corrected regions: all train, no validation, the final state is returned. With 5
# regions (one held out) validation lowered instance F1 on all three annotator sets and once
# ended 4.8 points below zero-shot; with 10 and 20 it still did, which is why the interactive
# presets do not validate at all (docs/benchmarks.md, "Validation in a 60-s fine-tune").
MIN_VAL_REGIONS = 10
# With 1-2 corrected objects single fine-tunes moved Dice on unseen data by -6.4 to +3.4 points
# and no check on the corrections or around them tells which (docs/benchmarks.md, "The capped
# GPU preset"), so the summary says so; at 5 every run gained.
FEW_REGIONS = 2
CORRECTED, UNCORRECTED = 1.0, 0.5  # codes of the training weight map (0: ignored)
_JOIN = 2  # strokes closer than this many pixels belong to one region
_GUARD = 8  # pixels around a held-out region that training ignores (no leak through the crop)
_CONTEXT = 32  # pixels of image context around a region when it is scored
_MIN_TILE = 64
_MAX_CENTRES = 200_000
_GRID = 256  # scoring tile side where corrections are dense (a multiple of the model stride)

_ENCODER = {"stem", "encoders", "encoder", "down"}
_HEAD = {"head", "classifier"}


@dataclass
class Regions:
    """Corrected regions of one prepared item ``(S, Y, X)``.

    Attributes:
        weight: Training loss weight per pixel (float32).
        centres: Flat indices of corrected training pixels (crop centres).
        val: Held-out corrected pixels (bool) or ``None``.
        val_boxes: Scoring tiles ``(plane, y0, x0, h, w)`` around the held-out regions.
        all_mask: Every corrected pixel (bool).
        all_boxes: Scoring tiles around every corrected region.
        n_regions: Connected corrected regions.
        n_val: Held-out regions.
    """

    weight: np.ndarray
    centres: np.ndarray
    val: np.ndarray | None
    val_boxes: list[tuple[int, int, int, int, int]]
    all_mask: np.ndarray
    all_boxes: list[tuple[int, int, int, int, int]]
    n_regions: int
    n_val: int


def grow_corrected(labels: np.ndarray, painted: np.ndarray, margin: int = 2) -> np.ndarray:
    """The corrected region of a labels layer from the pixels the user painted.

    Painted pixels, plus the whole objects a stroke now belongs to (painting over part of an
    object says its label is right), plus ``margin`` pixels around (where the boundary was set).
    Dilation is per 2-D plane of a stack.
    """
    from scipy import ndimage

    labels, painted = np.asarray(labels), np.asarray(painted, bool)
    if labels.shape != painted.shape:
        raise ValueError(
            f"painted mask shape {painted.shape} differs from the labels' {labels.shape}."
        )
    ids = np.unique(labels[painted])
    out = painted | np.isin(labels, ids[ids > 0])
    if margin > 0 and out.any():
        flat = out.reshape(-1, *out.shape[-2:])
        for k in range(flat.shape[0]):
            if flat[k].any():
                flat[k] = ndimage.binary_dilation(flat[k], iterations=margin)
    return out


def check_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    """``mask`` as bool ``shape`` (or ``None``); a clear error when it does not fit."""
    if mask is None:
        return None
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"{name}: the corrected mask has shape {arr.shape} but the labels have "
            f"{tuple(shape)}; it must mark pixels of the labels."
        )
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: the corrected mask must be boolean or numeric, got {arr.dtype}.")
    return arr != 0


def _components(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(plane, component mask) of every corrected region of ``mask`` ``(S, Y, X)``."""
    from scipy import ndimage

    out = []
    for s, plane in enumerate(mask):
        if not plane.any():
            continue
        joined = ndimage.binary_dilation(plane, iterations=_JOIN)
        lab, n = ndimage.label(joined, structure=np.ones((3, 3), bool))
        for k in range(1, n + 1):
            out.append((s, (lab == k) & plane))
    return out


def _box(comp: np.ndarray, s: int, stride: int = 32) -> tuple[int, int, int, int, int]:
    """A scoring tile around ``comp`` with context, at least ``_MIN_TILE`` px, inside the plane."""
    ys, xs = np.nonzero(comp)
    ny, nx = comp.shape

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        lo, hi = lo - _CONTEXT, hi + 1 + _CONTEXT
        size = max(hi - lo, _MIN_TILE)
        size = min(-(-size // stride) * stride, n)
        lo = min(max(0, (lo + hi - size) // 2), n - size)
        return lo, size

    y0, h = span(int(ys.min()), int(ys.max()), ny)
    x0, w = span(int(xs.min()), int(xs.max()), nx)
    return (s, y0, x0, h, w)


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two boxes ``(plane, y0, x0, h, w)`` share a pixel."""
    return (
        a[0] == b[0]
        and a[1] < b[1] + b[3]
        and b[1] < a[1] + a[3]
        and a[2] < b[2] + b[4]
        and b[2] < a[2] + a[4]
    )


def _union(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    y0, x0 = min(a[1], b[1]), min(a[2], b[2])
    y1, x1 = max(a[1] + a[3], b[1] + b[3]), max(a[2] + a[4], b[2] + b[4])
    return (a[0], y0, x0, y1 - y0, x1 - x0)


def _grid_in(
    mask: np.ndarray, s: int, y0: int, x0: int, h: int, w: int
) -> list[tuple[int, int, int, int, int]]:
    """Tiles of side :data:`_GRID` over a box of plane ``s`` that hold corrected pixels."""
    out = []
    for ty in range(y0, y0 + h, _GRID):
        for tx in range(x0, x0 + w, _GRID):
            th, tw = min(_GRID, y0 + h - ty), min(_GRID, x0 + w - tx)
            if mask[s, ty : ty + th, tx : tx + tw].any():
                out.append((s, ty, tx, th, tw))
    return out


def _merged(boxes: list[tuple[int, int, int, int, int]]) -> list[tuple[int, int, int, int, int]]:
    """Boxes of one plane with every overlapping pair replaced by their union, until none
    overlap."""
    changed = True
    while changed and len(boxes) > 1:
        changed = False
        done: list[tuple[int, int, int, int, int]] = []
        for box in boxes:
            for j, other in enumerate(done):
                if _overlap(box, other):
                    done[j] = _union(box, other)
                    changed = True
                    break
            else:
                done.append(box)
        boxes = done
    return boxes


def scoring_tiles(
    boxes: list[tuple[int, int, int, int, int]], mask: np.ndarray
) -> list[tuple[int, int, int, int, int]]:
    """Disjoint tiles that score the corrected pixels ``mask`` ``(S, Y, X)`` inside ``boxes``.

    Overlapping boxes (corrections close together) are merged, so no pixel is scored twice.
    Where the boxes of a plane hold more pixels than half the plane (dense corrections: a user
    who corrected a whole image), the plane's grid tiles that hold corrected pixels score them:
    one forward pass per pixel rather than one per nearby region (565 regions on seven 450^2
    planes took 65 s to score box by box). Boxes larger than four grid tiles are split into
    grid tiles, which bounds the memory of one forward pass.
    """
    out: list[tuple[int, int, int, int, int]] = []
    for s in sorted({b[0] for b in boxes}):
        ny, nx = mask.shape[1:]
        mine = [b for b in boxes if b[0] == s]
        if sum(b[3] * b[4] for b in mine) <= ny * nx // 2:
            mine = _merged(mine)
        if sum(b[3] * b[4] for b in mine) > ny * nx // 2:
            out += _grid_in(mask, s, 0, 0, ny, nx)
            continue
        for b in mine:
            out += [b] if b[3] * b[4] <= 4 * _GRID * _GRID else _grid_in(mask, *b)
    return out


def build_regions(
    mask: np.ndarray, config: FinetuneConfig, held: set[int], offset: int
) -> tuple[Regions, int]:
    """The :class:`Regions` of one item; components numbered from ``offset`` are held out when
    their number is in ``held``. Returns the regions and the next number."""
    from scipy import ndimage

    comps = _components(mask)
    weight = np.full(mask.shape, UNCORRECTED, np.float32)
    weight[mask] = CORRECTED
    val = np.zeros_like(mask)
    val_boxes, all_boxes = [], []
    n_val = 0
    for k, (s, comp) in enumerate(comps):
        box = _box(comp, s)
        all_boxes.append(box)
        if offset + k in held:
            n_val += 1
            val[s] |= comp
            val_boxes.append(box)
            guard = ndimage.binary_dilation(comp, iterations=_GUARD)
            weight[s][guard] = 0.0
    train_px = np.flatnonzero((weight == CORRECTED).reshape(-1))
    if train_px.size > _MAX_CENTRES:
        train_px = train_px[:: -(-train_px.size // _MAX_CENTRES)]
    regions = Regions(
        weight=weight,
        centres=train_px,
        val=val if n_val else None,
        val_boxes=scoring_tiles(val_boxes, val),
        all_mask=mask,
        all_boxes=scoring_tiles(all_boxes, mask),
        n_regions=len(comps),
        n_val=n_val,
    )
    return regions, offset + len(comps)


def choose_held_out(n_regions: int, config: FinetuneConfig) -> set[int]:
    """Numbers of the regions held out for validation (none when too few)."""
    if config.val_fraction <= 0 or n_regions < MIN_VAL_REGIONS:
        return set()
    n_val = max(1, round(config.val_fraction * n_regions))
    rng = np.random.default_rng([config.seed, 11])
    return {int(k) for k in rng.permutation(n_regions)[:n_val]}


def count_regions(mask: np.ndarray) -> int:
    """Connected corrected regions of ``mask`` ``(S, Y, X)``."""
    return len(_components(mask))


def region_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    num_classes: int,
    uncorrected_weight: float = 1.0,
) -> torch.Tensor:
    """Loss on the corrected pixels plus ``uncorrected_weight`` times the loss on the others.

    ``weight`` is the ``(B, H, W)`` code map (:data:`CORRECTED`, :data:`UNCORRECTED`, 0 =
    ignored). Each part is a mean over its own pixels (BCE over every output channel + soft Dice
    on the foreground for binary models; cross-entropy for multi-class ones), so a small
    correction weighs as much as the rest of the crop however few pixels it covers. MASL's
    components are image-level (shape, boundary and texture descriptors of the whole crop) and
    cannot be restricted to a region, so corrections train with this loss.
    """
    import torch
    import torch.nn.functional as F

    def part(w: torch.Tensor) -> torch.Tensor:
        total = w.sum().clamp_min(1.0)
        if num_classes != 1:
            ce = F.cross_entropy(logits, target.long(), reduction="none")
            return (ce * w).sum() / total
        wc = w[:, None]
        t = target if target.ndim == 4 else target[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        loss = (bce * wc).sum() / (total * logits.shape[1])
        p, t0 = torch.sigmoid(logits[:, :1]), t[:, :1]
        inter = (wc * p * t0).sum()
        return loss + 1.0 - (2.0 * inter + 1.0) / ((wc * p).sum() + (wc * t0).sum() + 1.0)

    loss = part((weight == CORRECTED).to(logits.dtype))
    rest = (weight == UNCORRECTED).to(logits.dtype)
    if uncorrected_weight > 0 and bool(rest.any()):
        loss = loss + uncorrected_weight * part(rest)
    return loss


def apply_scope(net: nn.Module, scope: str) -> int:
    """Freeze the weights outside ``scope``; returns the number of trainable parameters."""
    if scope not in ("all", "decoder+head", "head+norm"):
        raise ValueError(f"scope must be 'all', 'decoder+head' or 'head+norm', got {scope!r}.")
    for p in net.parameters():
        p.requires_grad_(scope == "all")
    if scope == "decoder+head":
        for name, child in net.named_children():
            if name not in _ENCODER:
                for p in child.parameters():
                    p.requires_grad_(True)
    elif scope == "head+norm":
        for name, child in net.named_children():
            if name in _HEAD:
                for p in child.parameters():
                    p.requires_grad_(True)
        for m in net.modules():
            if "Norm" in type(m).__name__:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(
            f"scope {scope!r} leaves nothing to train in this architecture; use scope='all'."
        )
    return n


def unfreeze(net: nn.Module) -> None:
    """Make every weight trainable again (the returned model must not carry a frozen scope)."""
    for p in net.parameters():
        p.requires_grad_(True)
