"""Intensity normalisation shared by training and inference.

The normalisation settings are stored in every model file, so an image is normalised the same way
when the model is trained and when it is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

NORMALIZATION_METHODS = ("percentile", "none")


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

    def __post_init__(self) -> None:
        """Check types and ranges: settings that load fine but segment into nothing are refused."""
        if self.method not in NORMALIZATION_METHODS:
            raise ValueError(
                f"normalisation method must be one of {NORMALIZATION_METHODS}, got {self.method!r}."
            )
        for name in ("low", "high", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                    or not np.isfinite(value):
                raise ValueError(f"normalisation {name} must be a finite number, got {value!r}.")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(
                f"normalisation percentiles must satisfy 0 <= low < high <= 100, got low={self.low}, "
                f"high={self.high}."
            )
        if self.clip < 0:
            raise ValueError(f"normalisation clip must be >= 0 (0: no clipping), got {self.clip}.")
        if not isinstance(self.per_channel, bool | np.bool_):
            raise ValueError(f"normalisation per_channel must be true or false, got {self.per_channel!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown keys or bad values."""
        if not isinstance(data, dict):
            raise ValueError(f"normalisation settings must be a JSON object, got {data!r}.")
        unknown = sorted(set(data) - set(fields_of(cls)))
        if unknown:
            raise ValueError(f"unknown normalisation settings {unknown}; expected {fields_of(cls)}.")
        return cls(**data)


def fields_of(cls: type) -> list[str]:
    """Field names of a dataclass, in order."""
    return [f.name for f in fields(cls)]


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


# --- Streaming normalisation (inference on large images) -----------------------------------------
# ``normalize`` returns a full float copy of the image. For tiled inference the statistics are
# computed once over the whole image (so that every tile is scaled alike, and exactly as
# ``normalize`` would) and applied tile by tile, which keeps memory at the size of a tile.


@dataclass(frozen=True)
class NormalizationStats:
    """Offsets and scales computed by :func:`stats_from_samples`.

    Attributes:
        method: ``"percentile"`` or ``"none"``.
        lows: One offset per channel (or a single one shared by all channels).
        scales: Matching ``high - low`` values; ``0`` marks a constant channel (mapped to zeros).
        clip: Clip bound as in :class:`NormalizationConfig`.
    """

    method: str
    lows: tuple[float, ...]
    scales: tuple[float, ...]
    clip: float


def pixel_samples(image: np.ndarray, n_spatial: int) -> np.ndarray:
    """Pixels at the positions :func:`normalize` samples, as an ``(N, C)`` array.

    Args:
        image: ``(*spatial, C)`` array (channels last, any strides; not copied).
        n_spatial: Number of leading (non-channel) axes.

    Returns:
        ``image``'s values at every ``step``-th pixel in C order (``step = pixels // 10**6``).
    """
    spatial = image.shape[:n_spatial]
    channels = int(np.prod(image.shape[n_spatial:], dtype=np.int64))
    size = int(np.prod(spatial))
    step = max(1, size // 1_000_000)
    if image.flags.c_contiguous:  # a strided view, no index arrays
        return image.reshape(size, channels)[::step]
    chunk = 1 << 16  # positions per gather: bounds the index arrays
    parts = []
    for start in range(0, size, chunk * step):
        pos = np.arange(start, min(size, start + chunk * step), step)
        parts.append(image[np.unravel_index(pos, spatial)].reshape(-1, channels))
    return np.concatenate(parts)


def stats_from_samples(samples: np.ndarray, config: NormalizationConfig) -> NormalizationStats:
    """Normalisation statistics from pixel samples ``(N, C)`` (per column when per-channel).

    With ``config.per_channel`` false (or one column) all samples are pooled into one statistic.
    """
    if config.method == "none":
        return NormalizationStats("none", (), (), 0.0)
    if config.method != "percentile":
        raise ValueError(
            f"Unknown normalisation method {config.method!r}; use 'percentile' or 'none'."
        )
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty (N, C) array, got shape {samples.shape}.")
    columns = samples.T if (config.per_channel and samples.shape[1] > 1) else samples.reshape(1, -1)
    lows, scales = [], []
    for col in columns:
        values = col.astype(np.float32)  # normalize() takes percentiles of float32 values
        lo, hi = np.percentile(values, [config.low, config.high])
        scale = hi - lo
        lows.append(float(lo))
        scales.append(float(scale) if scale > 1e-12 else 0.0)
    return NormalizationStats("percentile", tuple(lows), tuple(scales), float(config.clip))


def apply_normalization(
    x: np.ndarray, stats: NormalizationStats, channel_axis: int | None = 0
) -> np.ndarray:
    """Normalise a region ``x`` of an image with statistics from :func:`stats_from_samples`.

    Args:
        x: Region of the image (same channel layout as the image the stats came from).
        stats: Statistics of the whole image.
        channel_axis: Channel axis of ``x`` when the stats are per channel.

    Returns:
        float32 array shaped like ``x``.
    """
    arr = np.asarray(x)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    arr = arr.astype(np.float32, copy=False)
    if stats.method == "none":
        return arr
    if len(stats.lows) == 1:
        return _apply_one(arr, stats.lows[0], stats.scales[0], stats.clip)
    if channel_axis is None:
        raise ValueError("Per-channel statistics need the channel_axis of the region.")
    moved = np.moveaxis(arr, channel_axis, 0)
    if moved.shape[0] != len(stats.lows):
        raise ValueError(
            f"Region has {moved.shape[0]} channels but the statistics have {len(stats.lows)}."
        )
    pairs = zip(moved, stats.lows, stats.scales, strict=True)
    out = np.stack([_apply_one(c, lo, s, stats.clip) for c, lo, s in pairs])
    return np.moveaxis(out, 0, channel_axis)


def _apply_one(x: np.ndarray, lo: float, scale: float, clip: float) -> np.ndarray:
    # Same arithmetic as _percentile_norm (float64 intermediate, then float32) so values agree.
    if scale == 0.0:
        return np.zeros_like(x, dtype=np.float32)
    out = (x - np.float64(lo)) / np.float64(scale)
    if clip:
        np.clip(out, -clip, 1.0 + clip, out=out)
    return out.astype(np.float32, copy=False)
