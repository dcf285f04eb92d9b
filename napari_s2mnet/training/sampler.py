"""Random training crops, weighted toward labelled pixels, with augmentation.

Flips / 90-degree rotations, scale jitter and intensity jitter (gain, offset, gamma). Crop ``g``
of step ``k`` depends only on (seed, k, g), so a resumed or data-parallel run sees the same crops.
"""

from __future__ import annotations

import math

import numpy as np

from napari_s2mnet.training.config import FinetuneConfig
from napari_s2mnet.training.data import _Data


def _window(plane: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``plane[..., y0:y0+h, x0:x0+w]`` with mirror padding where the window leaves the image."""
    ny, nx = plane.shape[-2:]
    ys, ye, xs, xe = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    out = plane[..., ys:ye, xs:xe]
    pad = ((ys - y0, y0 + h - ye), (xs - x0, x0 + w - xe))
    if any(p for pp in pad for p in pp):
        mode = "symmetric" if min(out.shape[-2:]) > 1 else "edge"
        out = np.pad(out, ((0, 0),) * (out.ndim - 2) + pad, mode=mode)
    return out


def _resize(arr: np.ndarray, size: int, labels: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    if labels:
        t = F.interpolate(t[:, None], size=(size, size), mode="nearest-exact")[0, 0]
        return t.numpy().astype(arr.dtype)
    down = t.shape[-1] > size
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return t[0].numpy()


class _Sampler:
    """Random training crops; crop ``g`` of step ``k`` depends only on (seed, k, g)."""

    def __init__(self, data: _Data, config: FinetuneConfig) -> None:
        self.items = data.train
        self.cfg = config
        fg = np.array([it.fg.size for it in self.items], dtype=np.float64)
        area = np.array([it.target.size for it in self.items], dtype=np.float64)
        self.p_fg = fg / fg.sum() if fg.sum() else None
        self.p_area = area / area.sum()
        # Learning from corrections: crops centred on corrected pixels, with loss weights.
        self.weighted = bool(data.corrected)
        if self.weighted:
            cen = np.array(
                [it.regions.centres.size if it.regions is not None else 0 for it in self.items],
                dtype=np.float64,
            )
            self.p_fg = cen / cen.sum()
            # Uncorrected pixels that count a little are worth some uniform crops too.
            self.p_centre = 1.0 if config.uncorrected_weight == 0 else config.foreground_fraction

    def crop(self, step: int, index: int) -> tuple[np.ndarray, ...]:
        """Crop number ``index`` (global index within the step) of step ``step``: image and
        target, plus the loss weights when training from corrections."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, index])
        size = cfg.crop_size
        scale = 1.0
        if cfg.augment and cfg.scale_jitter > 0:
            scale = math.exp(rng.uniform(-1, 1) * math.log1p(cfg.scale_jitter))
        win = max(8, round(size / scale))
        p_centre = self.p_centre if self.weighted else cfg.foreground_fraction
        if self.p_fg is not None and rng.random() < p_centre:
            item = self.items[rng.choice(len(self.items), p=self.p_fg)]
            pool = item.regions.centres if self.weighted else item.fg
            flat = int(pool[rng.integers(pool.size)])
            s, y, x = np.unravel_index(flat, item.target.shape)
            jitter = rng.integers(-(win // 4), win // 4 + 1, size=2)
            cy, cx = int(y) + int(jitter[0]), int(x) + int(jitter[1])
        else:
            item = self.items[rng.choice(len(self.items), p=self.p_area)]
            s = rng.integers(item.target.shape[0])
            cy = int(rng.integers(item.target.shape[1]))
            cx = int(rng.integers(item.target.shape[2]))
        y0, x0 = cy - win // 2, cx - win // 2
        img = _window(item.image[s], y0, x0, win, win)
        tgt = _window(item.target[s], y0, x0, win, win)
        wgt = _window(item.regions.weight[s], y0, x0, win, win) if self.weighted else None
        if win != size:
            img = _resize(img, size, labels=False)
            tgt = _resize(tgt, size, labels=True)
            if wgt is not None:
                wgt = _resize(wgt, size, labels=True)
        if cfg.augment:
            k = int(rng.integers(4))
            img, tgt = np.rot90(img, k, axes=(-2, -1)), np.rot90(tgt, k, axes=(-2, -1))
            flip = rng.random() < 0.5
            if flip:
                img, tgt = img[..., ::-1], tgt[..., ::-1]
            if wgt is not None:
                wgt = np.rot90(wgt, k, axes=(-2, -1))
                wgt = wgt[..., ::-1] if flip else wgt
            img = self._intensity(np.array(img, dtype=np.float32), rng)
        out = (np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(tgt))
        if wgt is not None:
            out += (np.ascontiguousarray(wgt, dtype=np.float32),)
        return out

    def _intensity(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = self.cfg.intensity_jitter
        if j <= 0:
            return img
        lj = math.log1p(j)
        gamma = math.exp(rng.uniform(-lj, lj))
        gain = math.exp(rng.uniform(-lj, lj))
        offset = rng.uniform(-j / 2, j / 2)
        lo, hi = float(img.min()), float(img.max())
        if hi > lo:  # gamma on the crop's own range keeps negative values meaningful
            img = lo + (hi - lo) * ((img - lo) / (hi - lo)) ** gamma
        return (img * gain + offset).astype(np.float32)

    def batch(self, step: int, start: int, count: int) -> tuple[np.ndarray, ...]:
        """Stacked crops: images, targets (and weights when training from corrections)."""
        crops = [self.crop(step, start + i) for i in range(count)]
        return tuple(np.stack([c[j] for c in crops]) for j in range(len(crops[0])))
