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
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float | np.integer | np.floating)
                or not np.isfinite(value)
            ):
                raise ValueError(f"normalisation {name} must be a finite number, got {value!r}.")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(
                f"normalisation percentiles must satisfy 0 <= low < high <= 100, got low={self.low}, "
                f"high={self.high}."
            )
        if self.clip < 0:
            raise ValueError(f"normalisation clip must be >= 0 (0: no clipping), got {self.clip}.")
        if not isinstance(self.per_channel, bool | np.bool_):
            raise ValueError(
                f"normalisation per_channel must be true or false, got {self.per_channel!r}."
            )

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
            raise ValueError(
                f"unknown normalisation settings {unknown}; expected {fields_of(cls)}."
            )
        return cls(**data)


def fields_of(cls: type) -> list[str]:
    """Field names of a dataclass, in order."""
    return [f.name for f in fields(cls)]


def normalize(
    image: np.ndarray, config: NormalizationConfig, channel_axis: int | None = 0
) -> np.ndarray:
    """Normalise ``image`` to float32 following ``config``.

    The statistics and the arithmetic run in float64 whenever float32 cannot hold the input
    exactly (32/64-bit integers, float64), and wide integers are first shifted by an exact integer
    offset, so large offsets (``int64 + 2**62``, ``uint64`` near its maximum, ``float64 + 1e9``),
    tiny ranges (``x 1e-15``) and values beyond float32's range give the same result as the
    well-scaled image. Same values as :func:`normalization_stats` + :func:`apply_normalization`.

    Args:
        image: Array of any numeric or bool dtype; must be finite (check before calling).
        config: Normalisation settings.
        channel_axis: Axis holding channels when ``config.per_channel``; ``None`` for one channel.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: The values span more than float64 can represent as a difference.
    """
    img = np.asarray(image)
    if config.per_channel and channel_axis is not None and img.ndim > 1:
        channels = np.moveaxis(img, channel_axis, -1)
        stats = stats_from_samples(pixel_samples(channels, channels.ndim - 1), config)
        return apply_normalization(img, stats, channel_axis if len(stats.lows) > 1 else None)
    # one statistic over all values (every step-th value in C order)
    stats = stats_from_samples(pixel_samples(img[..., None], img.ndim), config)
    return apply_normalization(img, stats, None)


def work_dtype(dtype: np.dtype | type) -> type:
    """float32 when it holds every value of ``dtype`` exactly, else float64."""
    dt = np.dtype(dtype)
    if (
        dt.kind == "b"
        or (dt.kind in "iu" and dt.itemsize <= 2)
        or (dt.kind == "f" and dt.itemsize <= 4)
    ):
        return np.float32
    return np.float64


def _wide_int(dtype: np.dtype) -> bool:
    # 64-bit integers lose digits in float64 (53-bit mantissa): shift them by an exact offset.
    return dtype.kind in "iu" and dtype.itemsize > 4


def _ordered_u64(x: np.ndarray | int, dtype: np.dtype) -> np.ndarray:
    """A monotone map of int64/uint64 values to uint64 (so differences can be taken exactly)."""
    arr = np.asarray(x, dtype=dtype)
    if dtype.kind == "i":
        return arr.astype(np.int64).view(np.uint64) ^ np.uint64(1 << 63)
    return arr.astype(np.uint64)


def _centered(x: np.ndarray, offset: int) -> np.ndarray:
    """``x - offset`` as float64, exact up to float64 rounding of the difference."""
    if not _wide_int(x.dtype):
        return x.astype(np.float64) - offset if offset else x.astype(np.float64, copy=False)
    u = _ordered_u64(x, x.dtype)
    o = _ordered_u64(offset, x.dtype)
    with np.errstate(over="ignore"):  # the branch np.where discards may wrap around
        up = (u - o).astype(np.float64)
        down = (o - u).astype(np.float64)
    return np.where(u >= o, up, -down)


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
        offsets: Exact integer offsets subtracted before ``lows`` (64-bit integer images, whose
            values float64 cannot hold exactly); empty means 0.
    """

    method: str
    lows: tuple[float, ...]
    scales: tuple[float, ...]
    clip: float
    offsets: tuple[int, ...] = ()


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
    work = work_dtype(samples.dtype)
    lows, scales, offsets = [], [], []
    for col in columns:
        # normalize() takes percentiles of float32 values where float32 is exact, else float64
        # relative to an exact integer offset (wide integers).
        offset = int(col.min()) if _wide_int(col.dtype) else 0
        values = _centered(col, offset) if offset or work is np.float64 else col.astype(work)
        lo, hi = (float(v) for v in np.percentile(values, [config.low, config.high]))
        scale = hi - lo
        if not np.isfinite(scale):
            raise ValueError(
                f"The image values span more than float64 can represent ({lo:g} .. {hi:g}); "
                "rescale the image (e.g. divide it by 1e10) first."
            )
        lows.append(lo)
        offsets.append(offset)
        scales.append(scale if scale > _resolution(lo, hi, work) else 0.0)
    return NormalizationStats(
        "percentile", tuple(lows), tuple(scales), float(config.clip), tuple(offsets)
    )


def _resolution(lo: float, hi: float, work: type) -> float:
    """The smallest meaningful range at this magnitude: a few units in the last place.

    A relative bound (not an absolute one such as 1e-12) so an image scaled by 1e-15 keeps its
    contrast, while a constant image (up to float rounding) maps to zeros.
    """
    return 8 * float(np.finfo(work).eps) * max(abs(lo), abs(hi)) + float(np.finfo(work).tiny)


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
    if stats.method == "none" or arr.dtype == bool:
        arr = arr.astype(np.float32, copy=False)
    if stats.method == "none":
        return arr
    offsets = stats.offsets or (0,) * len(stats.lows)
    if len(stats.lows) == 1:
        return _apply_one(arr, stats.lows[0], stats.scales[0], stats.clip, offsets[0])
    if channel_axis is None:
        raise ValueError("Per-channel statistics need the channel_axis of the region.")
    moved = np.moveaxis(arr, channel_axis, 0)
    if moved.shape[0] != len(stats.lows):
        raise ValueError(
            f"Region has {moved.shape[0]} channels but the statistics have {len(stats.lows)}."
        )
    parts = zip(moved, stats.lows, stats.scales, offsets, strict=True)
    out = np.stack([_apply_one(c, lo, s, stats.clip, off) for c, lo, s, off in parts])
    return np.moveaxis(out, 0, channel_axis)


def _apply_one(x: np.ndarray, lo: float, scale: float, clip: float, offset: int = 0) -> np.ndarray:
    # float64 arithmetic, then float32. Inputs float32 holds exactly are cast to float32 first
    # (as the statistics were taken), wider ones go to float64 relative to their offset.
    if scale == 0.0:
        return np.zeros_like(x, dtype=np.float32)
    if offset or work_dtype(x.dtype) is np.float64:
        base = _centered(x, offset)
    else:
        base = x.astype(np.float32, copy=False)
    out = (base - np.float64(lo)) / np.float64(scale)
    if clip:
        np.clip(out, -clip, 1.0 + clip, out=out)
    return out.astype(np.float32, copy=False)
