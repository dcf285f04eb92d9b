"""Cutting a 2-D image into overlapping tiles and blending the tiles' outputs back together.

Square tiles (a multiple of the network's stride, shrunk to the image when the image is smaller)
lie on a grid whose starts are multiples of the stride and overlap by ``overlap`` of a tile; the
last row/column of tiles reaches past the image by less than one stride (the caller fills that
part, e.g. by mirroring with :func:`pad_to`). Each tile's output is weighted by a separable Hann
window (``sin^2``, positive everywhere) and accumulated; the sum of the weights is separable too
(one vector per axis), so memory is one float32 map per output channel.

Used by inference (:mod:`napari_s2mnet.inference.engine`) and by validation during training.
numpy only: the model call is a callback, so this module needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

__all__ = ["ROW_BLOCK", "Grid", "blend", "blend_iter", "grid", "pad_to", "round_up", "window"]

ROW_BLOCK = 512  # rows per block in full-image passes (bounds temporaries)

#: ``predict_batch(starts)``: outputs ``(B, C, tile_y, tile_x)`` of the tiles at ``starts``.
PredictBatch = Callable[[list[tuple[int, int]]], np.ndarray]


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m


def tile_starts(size: int, tile: int, step: int, stride: int) -> list[int]:
    """Tile starts along one axis: multiples of ``stride``, covering ``0 .. size``."""
    if size <= tile:
        return [0]
    last = round_up(size - tile, stride)  # reaches past the end by < stride
    starts = list(range(0, last, step))
    starts.append(last)
    return starts


def window(n: int) -> np.ndarray:
    """Hann window ``sin^2(pi (i + 0.5) / n)``: smooth, peaked in the middle, > 0 everywhere."""
    return (np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2).astype(np.float64)


@dataclass(frozen=True)
class Grid:
    """Tile sizes and the tiles' start rows / columns of one 2-D image."""

    tile_y: int
    tile_x: int
    starts_y: list[int]
    starts_x: list[int]

    @property
    def n_tiles(self) -> int:
        return len(self.starts_y) * len(self.starts_x)

    def starts(self) -> list[tuple[int, int]]:
        """``(y, x)`` start of every tile, row by row."""
        return list(product(self.starts_y, self.starts_x))


def grid(shape: Sequence[int], tile: int, overlap: float, stride: int) -> Grid:
    """The tile grid of an image of ``shape`` ``(Y, X)``.

    Args:
        shape: Image height and width.
        tile: Largest tile side (a multiple of ``stride``).
        overlap: Overlap of neighbouring tiles as a fraction of the tile side.
        stride: Tile sides and starts are multiples of this (the network's stride).
    """
    dims = []
    for size in shape:
        t = min(tile, round_up(size, stride))
        ov = round(overlap * t / stride) * stride
        step = max(stride, t - ov)
        n = len(tile_starts(size, t, step, stride))
        if n > 1:
            # Balance: the smallest stride-aligned tile that still covers the axis with n tiles
            # and at least the requested overlap, so no compute is spent on surplus overlap.
            t = min(t, round_up(-(-(size + (n - 1) * ov) // n), stride))
            step = max(stride, t - ov)
        dims.append((t, tile_starts(size, t, step, stride)))
    (ty, sy), (tx, sx) = dims
    return Grid(ty, tx, sy, sx)


def pad_to(x: np.ndarray, ty: int, tx: int) -> np.ndarray:
    """Mirror-pad an ``(h, w, C)`` region at the bottom/right up to ``(ty, tx, C)``."""
    h, w = x.shape[:2]
    if h == ty and w == tx:
        return x
    mode = "reflect" if min(h, w) > 1 else "edge"  # a 1-pixel line cannot be mirrored
    return np.pad(x, ((0, ty - h), (0, tx - w), (0, 0)), mode=mode)


def blend_iter(
    shape: Sequence[int],
    g: Grid,
    channels: int,
    predict_batch: PredictBatch,
    batch_size: int,
) -> Generator[int, None, list[np.ndarray]]:
    """Window-weighted average of the tiles' outputs, one batch of tiles at a time.

    Yields the number of tiles done after every batch (so a caller can report progress or be
    closed between batches); returns the blended maps, one ``(Y, X)`` float32 array per
    channel (separate arrays, so post-processing can free each once it is used).

    Args:
        shape: Image height and width.
        g: The tile grid (:func:`grid`).
        channels: Output channels of ``predict_batch``.
        predict_batch: Called with the ``(y, x)`` starts of up to ``batch_size`` tiles; returns
            their outputs ``(B, channels, g.tile_y, g.tile_x)``. Parts of a tile outside the
            image are ignored.
        batch_size: Tiles per call.
    """
    height, width = int(shape[0]), int(shape[1])
    wy, wx = window(g.tile_y), window(g.tile_x)
    sum_y = np.zeros(height)
    sum_x = np.zeros(width)
    for s in g.starts_y:
        sum_y[s : s + g.tile_y] += wy[: height - s]
    for s in g.starts_x:
        sum_x[s : s + g.tile_x] += wx[: width - s]
    maps = [np.zeros((height, width), dtype=np.float32) for _ in range(channels)]
    tiles = g.starts()
    for b0 in range(0, len(tiles), batch_size):
        batch = tiles[b0 : b0 + batch_size]
        outputs = predict_batch(batch)
        for (sy, sx), p in zip(batch, outputs, strict=True):
            h, w = min(g.tile_y, height - sy), min(g.tile_x, width - sx)
            weight = (wy[:h, None] * wx[None, :w]).astype(np.float32)
            for plane, out in zip(maps, p, strict=True):
                plane[sy : sy + h, sx : sx + w] += out[:h, :w] * weight
        yield b0 + len(batch)
    for r0 in range(0, height, ROW_BLOCK):
        r1 = min(height, r0 + ROW_BLOCK)
        norm = (sum_y[r0:r1, None] * sum_x[None, :]).astype(np.float32)
        for plane in maps:
            plane[r0:r1] /= norm
    return maps


def blend(
    shape: Sequence[int],
    predict_batch: PredictBatch,
    *,
    channels: int,
    tiles: Grid,
    batch_size: int = 4,
) -> np.ndarray:
    """:func:`blend_iter` run to its end: the blended ``(channels, Y, X)`` map.

    ``tiles`` is the image's :func:`grid`; ``predict_batch`` returns outputs of its tile size.
    """
    gen = blend_iter(shape, tiles, channels, predict_batch, batch_size)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return np.stack(stop.value)
