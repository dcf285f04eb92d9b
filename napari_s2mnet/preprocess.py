"""Intensity normalisation shared by training and inference.

The normalisation settings are stored in every model file, so an image is normalised the same way
when the model is trained and when it is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class NormalizationConfig:
    """Robust percentile normalisation to roughly [0, 1].

    Attributes:
        method: ``"percentile"`` maps the ``low``/``high`` percentiles to 0/1 (values outside are
            kept, not clipped, up to ``clip``); ``"none"`` only casts to float32.
        low: Lower percentile.
        high: Upper percentile.
        per_channel: Normalise each channel separately.
        clip: Clip the normalised values to ``[-clip, 1 + clip]`` (protects against outliers).
    """

    method: str = "percentile"
    low: float = 1.0
    high: float = 99.8
    per_channel: bool = True
    clip: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def normalize(image: np.ndarray, config: NormalizationConfig, channel_axis: int | None = 0) -> np.ndarray:
    """Normalise ``image`` to float32 following ``config``.

    Args:
        image: Array of any numeric or bool dtype; must be finite (check before calling).
        config: Normalisation settings.
        channel_axis: Axis holding channels when ``config.per_channel``; ``None`` for one channel.

    Returns:
        float32 array of the same shape.
    """
    img = np.asarray(image)
    if img.dtype == bool:
        img = img.astype(np.float32)
    if config.method == "none":
        return img.astype(np.float32, copy=False)
    if config.method != "percentile":
        raise ValueError(f"Unknown normalisation method {config.method!r}; use 'percentile' or 'none'.")
    img = img.astype(np.float32, copy=False)
    if config.per_channel and channel_axis is not None and img.ndim > 1:
        moved = np.moveaxis(img, channel_axis, 0)
        out = np.stack([_percentile_norm(c, config) for c in moved])
        return np.moveaxis(out, 0, channel_axis)
    return _percentile_norm(img, config)


def _percentile_norm(x: np.ndarray, config: NormalizationConfig) -> np.ndarray:
    # Percentiles on a strided subsample keep this O(1) in memory and fast on huge images.
    flat = x.reshape(-1)
    step = max(1, flat.size // 1_000_000)
    lo, hi = np.percentile(flat[::step], [config.low, config.high])
    scale = hi - lo
    if scale <= 1e-12:  # constant image: map to zeros instead of dividing by zero
        return np.zeros_like(x, dtype=np.float32)
    out = (x - lo) / scale
    if config.clip:
        np.clip(out, -config.clip, 1.0 + config.clip, out=out)
    return out.astype(np.float32, copy=False)
