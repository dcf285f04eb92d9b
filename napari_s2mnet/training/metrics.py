"""Dice on training batches and on validation tiles; :func:`evaluate_dice` for a whole set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.checkpoint import ModelBundle
from napari_s2mnet.training.config import FinetuneConfig
from napari_s2mnet.training.data import _Item, _prepare

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from napari_s2mnet._ddp import DistContext

_VAL_MAX_PIXELS = 4_000_000  # validation runs on at most this many pixels (a subset of tiles)
# Corrected-region scoring (validation, before / after) forwards at most this many pixels, an
# evenly spread subset of the tiles when there are more (~1.5 s on one CPU thread): it must
# stay a small share of an interactive budget however much the user corrected.
REGION_MAX_PIXELS = 262_144


def _dice_stats(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per foreground class (intersection, predicted, true) pixel counts, float64 ``(K, 3)``."""
    import torch

    classes = [1] if num_classes == 1 else list(range(1, num_classes))
    rows = []
    for c in classes:
        p, t = pred == c, target == c
        rows.append(torch.stack([(p & t).sum(), p.sum(), t.sum()]).to(torch.float64))
    return torch.stack(rows)


def _dice_from_stats(stats: torch.Tensor) -> float:
    """Mean Dice over classes present in the prediction or the ground truth (1.0 if none)."""
    denom = stats[:, 1] + stats[:, 2]
    present = denom > 0
    if not bool(present.any()):
        return 1.0
    return float((2 * stats[present, 0] / denom[present]).mean())


def _predict_classes(logits: torch.Tensor, num_classes: int, threshold: float) -> torch.Tensor:
    """Class map ``(B, H, W)``: thresholded sigmoid (binary) or argmax (multi-class)."""
    if num_classes == 1:
        return (logits[:, 0].float().sigmoid() > threshold).long()
    return logits.argmax(dim=1)


def _val_tiles(items: list[_Item], tile: int) -> list[tuple[int, int, int, int, int, int]]:
    """Non-overlapping tiles (item, plane, y0, x0, h, w) of side ``tile`` covering the data."""
    tiles = []
    for i, it in enumerate(items):
        ns, ny, nx = it.target.shape
        for s in range(ns):
            for y0 in range(0, ny, tile):
                for x0 in range(0, nx, tile):
                    tiles.append((i, s, y0, x0, min(tile, ny - y0), min(tile, nx - x0)))
    return _spread_subset(tiles, _VAL_MAX_PIXELS)  # keeps validation cheap


def _evaluate(
    net: nn.Module,
    items: list[_Item],
    tiles: list[tuple[int, int, int, int, int, int]],
    num_classes: int,
    threshold: float,
    device: torch.device,
    ctx: DistContext | None = None,
    amp: bool = False,
    masks: Sequence[np.ndarray] | None = None,
) -> float:
    """Dice of ``net`` on validation tiles (pixels pooled over all tiles; ranks share the work).

    With ``masks`` (one bool ``(S, Y, X)`` per item), only the masked pixels of each tile count
    (corrected regions: the tile around them gives the network its context), and binary models
    score the mean of the foreground and the background Dice there: a corrected region may hold
    no foreground at all (a deleted false object), where foreground Dice alone says nothing.
    """
    return _evaluate_sets(
        net, items, tiles, num_classes, threshold, device, ctx, amp, mask_sets=[masks]
    )[0]


def _evaluate_sets(
    net: nn.Module,
    items: list[_Item],
    tiles: list[tuple[int, int, int, int, int, int]],
    num_classes: int,
    threshold: float,
    device: torch.device,
    ctx: DistContext | None,
    amp: bool,
    mask_sets: Sequence[Sequence[np.ndarray] | None],
) -> list[float]:
    """:func:`_evaluate` for several pixel selections at once (one forward pass per tile):
    the Dice of each entry of ``mask_sets`` (``None``: every pixel)."""
    import torch

    was_training = net.training
    net.eval()
    base_k = 1 if num_classes == 1 else num_classes - 1
    ks = [2 if m is not None and num_classes == 1 else base_k for m in mask_sets]
    stats = [torch.zeros(k, 3, dtype=torch.float64) for k in ks]
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    with torch.no_grad():
        for i, s, y0, x0, h, w in tiles[rank::world]:
            it = items[i]
            img = it.image[s, :, y0 : y0 + h, x0 : x0 + w]
            x = torch.from_numpy(np.ascontiguousarray(img))[None].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = net(x)
            pred_all = _predict_classes(logits.float(), num_classes, threshold)[0].cpu()
            tgt_all = torch.from_numpy(np.ascontiguousarray(it.target[s, y0 : y0 + h, x0 : x0 + w]))
            if num_classes == 1:  # instance-head models keep instance ids in the target
                tgt_all = tgt_all > 0
            for masks, st in zip(mask_sets, stats, strict=True):
                pred, tgt = pred_all, tgt_all
                if masks is None:
                    st += _dice_stats(pred.long(), tgt.long(), num_classes)
                    continue
                sel = masks[i][s, y0 : y0 + h, x0 : x0 + w]
                sel = torch.from_numpy(np.ascontiguousarray(sel))
                pred, tgt = pred[sel].long(), tgt[sel].long()
                if num_classes == 1:  # background counts too: a deleted object is all background
                    st += torch.cat([_dice_stats(pred, tgt, 1), _dice_stats(1 - pred, 1 - tgt, 1)])
                else:
                    st += _dice_stats(pred, tgt, num_classes)
    if ctx is not None and ctx.enabled:
        stats = [ctx.all_reduce_sum(st.to(device)).cpu() for st in stats]
    net.train(was_training)
    return [_dice_from_stats(st) for st in stats]


def region_tiles(items: list[_Item], held_out: bool) -> list[tuple[int, int, int, int, int, int]]:
    """Scoring tiles around the corrected regions of ``items`` (held-out ones, or all), at
    most :data:`REGION_MAX_PIXELS` pixels of them."""
    tiles = []
    for i, it in enumerate(items):
        if it.regions is None:
            continue
        for box in it.regions.val_boxes if held_out else it.regions.all_boxes:
            tiles.append((i, *box))
    return _spread_subset(tiles, REGION_MAX_PIXELS)


def _spread_subset(
    tiles: list[tuple[int, int, int, int, int, int]], max_pixels: int
) -> list[tuple[int, int, int, int, int, int]]:
    """An evenly spread, fixed subset of ``tiles`` of at most ``max_pixels`` (all if fewer)."""
    total = sum(t[4] * t[5] for t in tiles)
    if total <= max_pixels:
        return tiles
    keep = max(1, int(len(tiles) * max_pixels / total))
    return [tiles[k] for k in np.linspace(0, len(tiles) - 1, keep).round().astype(int)]


def region_masks(items: list[_Item], held_out: bool) -> list[np.ndarray]:
    """The pixels :func:`region_tiles` score, per item."""
    out = []
    for it in items:
        r = it.regions
        mask = None if r is None else (r.val if held_out else r.all_mask)
        out.append(mask if mask is not None else np.zeros(it.target.shape, bool))
    return out


def evaluate_dice(
    model: ModelBundle,
    pairs: Sequence[Any],
    *,
    device: str = "cpu",
    channel_axis: int | None = None,
) -> float:
    """Foreground Dice of ``model`` on (image, labels) pairs, pooled over all pixels.

    Images are normalised exactly as in training (and inference); binary models use the bundle's
    threshold, multi-class models the mean Dice over foreground classes.
    """
    from napari_s2mnet.devices import resolve_device

    cfg = FinetuneConfig(channel_axis=channel_axis, allow_empty=True)
    items, _ = _prepare(pairs, model, cfg, None, "evaluation")
    dev = resolve_device(device)
    net = model.model
    orig = next(iter(net.parameters())).device
    net.to(dev)
    try:
        return _evaluate(
            net,
            items,
            _val_tiles(items, model.tile_size),
            model.config.num_classes,
            model.threshold,
            dev,
        )
    finally:
        net.to(orig)
