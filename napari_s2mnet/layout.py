"""How an image array is read: axes, channels, and the checks every image passes first.

Used by inference (:func:`napari_s2mnet.inference.segment_iter`) and by training (the same plan
normalises the training images, so a model sees the same values in training and in use).

* :class:`ImageLayout`: which axis holds channels (or RGB(A) colour), names of the leading axes,
  and which channels feed the model; :func:`guess_layout` guesses it as napari does.
* :func:`plan_image` turns an image and its layout into an :class:`ImagePlan`: a view
  ``(*lead, Y, X, C_img)`` of the input (no copy) plus the channel mapping to the model
  (alpha dropped, RGB averaged to gray for a 1-channel model, gray replicated, or an explicit
  channel selection).
* The input checks (:func:`check_array`, :func:`resolve_layout`, :func:`check_channels`,
  :func:`check_finite`, :func:`check_spacing`) raise ``ValueError``/``TypeError`` saying what
  was wrong and what to do, before torch sees the image.

numpy only: no torch, no Qt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ImageLayout",
    "ImagePlan",
    "check_array",
    "check_channels",
    "check_finite",
    "check_spacing",
    "guess_layout",
    "plan_image",
    "resolve_layout",
    "squeeze_singletons",
]


@dataclass
class ImageLayout:
    """How the axes of an image array are to be read.

    Attributes:
        channel_axis: Axis holding channels (any position, negative allowed), or ``None``.
        rgb: The last axis holds RGB or RGBA colour (as napari's ``layer.rgb``); implies
            ``channel_axis = -1``. Alpha is dropped.
        axis_names: Names of the leading axes before ``(Y, X)`` (e.g. ``("t", "z")``), used as
            feature-table columns; default ``("z",)`` for one and ``("t", "z")`` for two.
        channels: Which image channels feed the model, in the model's input order (indices
            along the channel / colour axis, e.g. ``(2,)`` for the nuclear stain of a 3-channel
            image and a 1-channel model). ``None``: all of them, mapped automatically (equal
            counts as they are, RGB averaged to gray for a 1-channel model, gray repeated).
    """

    channel_axis: int | None = None
    rgb: bool = False
    axis_names: tuple[str, ...] | None = None
    channels: tuple[int, ...] | None = None


def guess_layout(
    shape: Sequence[int], *, rgb: bool | None = None, min_side: int = 30
) -> ImageLayout:
    """Guess the layout of an image array as napari does.

    The last axis is RGB(A) when it has 3 or 4 entries and the two axes before it are longer than
    ``min_side`` (napari's rule); ``rgb`` overrides the guess (pass ``layer.rgb``). Other channel
    axes cannot be told apart from a short stack, so they are never guessed: set
    :attr:`ImageLayout.channel_axis` yourself.

    Args:
        shape: Array shape.
        rgb: Force (``True``) or forbid (``False``) reading the last axis as colour.
        min_side: Minimum length of the two axes before a colour axis.
    """
    shape = tuple(int(s) for s in shape)
    if rgb is None:
        rgb = len(shape) > 2 and shape[-1] in (3, 4) and all(s > min_side for s in shape[-3:-1])
    if rgb:
        if len(shape) < 3 or shape[-1] not in (3, 4):
            raise ValueError(
                f"An RGB(A) image needs a last axis of length 3 or 4; got shape {shape}."
            )
        return ImageLayout(channel_axis=len(shape) - 1, rgb=True)
    return ImageLayout()


# --------------------------------------------------------------------------------------------
# Planning and input checks


@dataclass
class ImagePlan:
    """A validated image with its channel handling, ready to be cut into tiles.

    Attributes:
        view: ``(*lead, Y, X, C_img)``, a view of the input (no copy).
        lead: Shape of the leading (slice) axes, ``()`` for a 2-D image.
        lead_names: Names of the leading axes (feature-table columns).
        select: ``(..., C_img) -> (..., C)``: the channels that are normalised.
        post: Normalised ``(..., C) -> (..., C_model)`` (RGB to gray, gray replicated).
        layout: The layout the plan was made for.
    """

    view: np.ndarray  # (*lead, Y, X, C_img), a view of the input (no copy)
    lead: tuple[int, ...]  # leading (slice) shape
    lead_names: tuple[str, ...]
    select: Callable[[np.ndarray], np.ndarray]  # (..., C_img) -> (..., C) before normalising
    post: Callable[[np.ndarray], np.ndarray]  # normalised (..., C) -> (..., C_model)
    layout: ImageLayout

    @property
    def spatial(self) -> tuple[int, int]:
        return self.view.shape[-3], self.view.shape[-2]

    @property
    def n_slices(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64))


def check_array(image: Any) -> np.ndarray:
    """``image`` as a numpy array of at least 2 dimensions with bool, integer or float pixels."""
    if image is None:
        raise TypeError("image is None; pass a numpy array (e.g. layer.data).")
    try:
        arr = np.asarray(image)
    except Exception as exc:  # ragged lists, strange objects
        raise TypeError(f"Cannot read the image as an array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"Unsupported image dtype {arr.dtype}; use bool, integer or floating point pixels."
        )
    if arr.size == 0:
        raise ValueError(f"The image is empty (shape {arr.shape}); nothing to segment.")
    if arr.ndim < 2:
        raise ValueError(
            f"The image must have at least 2 dimensions (Y, X); got shape {arr.shape}."
        )
    return arr


def resolve_layout(arr: np.ndarray, layout: ImageLayout | None) -> ImageLayout:
    """Validate ``layout`` for ``arr`` (``None``: :func:`guess_layout`); channel axis made >= 0."""
    if layout is None:
        return guess_layout(arr.shape)
    if not isinstance(layout, ImageLayout):
        raise TypeError(f"layout must be an ImageLayout, got {type(layout).__name__}.")
    ndim = arr.ndim
    ax = layout.channel_axis
    if layout.rgb:
        if arr.shape[-1] not in (3, 4) or ndim < 3:
            raise ValueError(
                f"The layout says RGB but the last axis has length {arr.shape[-1]} (shape "
                f"{arr.shape}); RGB(A) images end with an axis of 3 or 4. Set rgb=False."
            )
        if ax is not None and ax % ndim != ndim - 1:
            raise ValueError(
                f"RGB images have their colour on the last axis; channel_axis={ax} contradicts "
                "rgb=True. Use one or the other."
            )
        return dataclasses.replace(layout, channel_axis=ndim - 1)
    if ax is not None:
        if not isinstance(ax, int | np.integer) or not -ndim <= ax < ndim:
            raise ValueError(
                f"channel_axis={ax!r} is not an axis of an image with shape {arr.shape} "
                f"(valid: {-ndim}..{ndim - 1}, or None)."
            )
        ax = int(ax) % ndim
        if ax >= ndim - 2 and ndim - 1 < 2:
            raise ValueError(f"An image of shape {arr.shape} has no room for a channel axis.")
        return dataclasses.replace(layout, channel_axis=ax)
    return layout


@dataclass(frozen=True)
class Squeezed:
    """Length-1 axes :func:`squeeze_singletons` dropped, to put back on the results.

    Attributes:
        axes: Dropped axes of the original array (sorted).
        spatial_shape: The original shape without its channel axis (the labels' shape).
    """

    axes: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    channel_axis: int | None = None

    def _dropped_spatial(self) -> list[int]:
        """Positions of the dropped axes among the non-channel axes."""
        ndim = len(self.spatial_shape) + (self.channel_axis is not None)
        plain = [i for i in range(ndim) if i != self.channel_axis]
        return [k for k, i in enumerate(plain) if i in self.axes]

    def restore(self, result: np.ndarray | None) -> np.ndarray | None:
        """``result`` (labels, probability ...) reshaped to :attr:`spatial_shape`."""
        if result is None or not self.axes or result.size != int(np.prod(self.spatial_shape)):
            return result
        return result.reshape(self.spatial_shape)

    def squeeze_spacing(self, spacing: Any) -> Any:
        """Drop the entries of the dropped axes from a per-axis spacing (napari's scale)."""
        if spacing is None or not self.axes:
            return spacing
        values = list(spacing)
        ndim = len(self.spatial_shape) + (self.channel_axis is not None)
        if len(values) == ndim and self.channel_axis is not None:
            values = [v for i, v in enumerate(values) if i not in self.axes]
        elif len(values) == len(self.spatial_shape):
            dropped = self._dropped_spatial()
            values = [v for k, v in enumerate(values) if k not in dropped]
        return values

    def restore_spacing(self, spacing: tuple[float, ...]) -> tuple[float, ...]:
        """Spacing per axis of the restored labels (1.0 for a dropped axis)."""
        if not self.axes:
            return spacing
        dropped = set(self._dropped_spatial())
        it = iter(spacing)
        return tuple(1.0 if k in dropped else next(it) for k in range(len(self.spatial_shape)))


def squeeze_singletons(
    arr: np.ndarray, layout: ImageLayout, notes: list[str]
) -> tuple[np.ndarray, ImageLayout, Squeezed]:
    """Drop length-1 axes (other than the channel axis) so they are not read as spatial axes.

    Without this, ``(Y, X, 1)`` is a stack of ``Y`` one-pixel-wide ``(X, 1)`` slices and
    ``(Y, 1, X)`` a stack of ``Y`` one-row images: hundreds of wrong objects, very slowly. A
    length-1 axis carries no spatial extent, so dropping it changes nothing else; results are
    reshaped back with :meth:`Squeezed.restore`. A warning note is added when one of the two
    last axes (where Y and X are expected) was dropped.

    Args:
        arr: The checked image.
        layout: Its resolved layout (channel axis >= 0).
        notes: Messages for the user (warnings).

    Returns:
        The squeezed view, its layout (channel axis renumbered), and what to restore.

    Raises:
        ValueError: The layout names leading axes (``axis_names``) and a dropped axis makes those
            names ambiguous.
    """
    ax = layout.channel_axis
    spatial_shape = tuple(n for i, n in enumerate(arr.shape) if i != ax)
    plain = [i for i in range(arr.ndim) if i != ax]
    drop_set = {i for i in plain if arr.shape[i] == 1}
    # Y and X stay: a (1, 7) or (1, 1, 7) image is one row, not nothing.
    while len(plain) - len(drop_set) < 2:
        drop_set.discard(max(drop_set))
    drop = tuple(sorted(drop_set))
    if not drop:
        return arr, layout, Squeezed((), spatial_shape, ax)
    if layout.axis_names is not None:
        raise ValueError(
            f"Axes {list(drop)} of shape {arr.shape} have length 1 but axis_names="
            f"{layout.axis_names} names the leading axes; squeeze the array (image.squeeze()) "
            "and give the names of the remaining leading axes, or set channel_axis="
            f"{drop[-1]} if that axis holds the (single) channel."
        )
    new_ax = None if ax is None else ax - sum(1 for i in drop if i < ax)
    out = arr.reshape([n for i, n in enumerate(arr.shape) if i not in drop])
    trailing = [i for i in drop if i >= arr.ndim - 2]
    if trailing:
        notes.append(
            f"Axis {trailing[-1]} of shape {arr.shape} has length 1 and was dropped, so the image "
            f"is segmented as shape {out.shape} (a length-1 axis is read as a single channel "
            "plane, not as slices of one pixel); the labels keep the original shape. If that is "
            "not what you meant, reshape the array or set channel_axis."
        )
    return out, dataclasses.replace(layout, channel_axis=new_ax), Squeezed(drop, spatial_shape, ax)


def plan_image(
    arr: np.ndarray, layout: ImageLayout, in_channels: int, notes: list[str]
) -> ImagePlan:
    """Plan ``arr`` (checked, with a resolved layout) for a model with ``in_channels`` inputs.

    Notes for the user (channel conversions, suspicious axes) are appended to ``notes``.

    Raises:
        ValueError: Too few / too many axes, bad ``axis_names`` or channels that do not match
            the model, with what to change.
    """
    ax = layout.channel_axis
    view = np.moveaxis(arr, ax, -1) if ax is not None else arr[..., None]
    n_plain = view.ndim - 1
    if n_plain < 2:
        raise ValueError(
            f"After taking axis {ax} as channels, shape {arr.shape} has fewer than 2 spatial axes."
        )
    if n_plain > 4:
        raise ValueError(
            f"{n_plain}-D image data (shape {arr.shape}, channel axis {ax}) is not supported: "
            "use (Y, X), (Z or T, Y, X) or (T, Z, Y, X), each with an optional channel axis. "
            "Select a sub-volume first (e.g. image[0]) or set the channel axis if one axis holds "
            "channels."
        )
    lead = tuple(view.shape[:-3])
    if ax is None and lead and min(view.shape[-3:-1]) <= 8:
        short = int(np.argmin(view.shape[-3:-1])) + len(lead)
        notes.append(
            f"Axis {short} of shape {arr.shape} has only {arr.shape[short]} pixels and is "
            "read as a spatial axis (slices along the leading axes); if it holds "
            f"channels, set channel_axis={short}."
        )
    names = layout.axis_names
    if names is None:
        names = {0: (), 1: ("z",), 2: ("t", "z")}[len(lead)]
    names = tuple(str(n) for n in names)
    if len(names) != len(lead):
        raise ValueError(
            f"axis_names {names} must name the {len(lead)} leading axes of shape {arr.shape}."
        )

    # Channel mapping, shared by inference and training (both plan through here): the
    # channels are normalised first, then averaged (RGB -> 1-channel model) or replicated.
    c_img = view.shape[-1]
    c_model = int(in_channels)
    select: Callable[[np.ndarray], np.ndarray] = _identity
    post: Callable[[np.ndarray], np.ndarray] = _identity
    c_eff = c_img
    rgb = layout.rgb
    if layout.channels is not None:
        picked = check_channels(layout.channels, c_img, arr.shape, ax)
        select, c_eff, rgb = _Take(picked), len(picked), False  # explicit: no colour rules
    elif layout.rgb and c_img == 4:
        select, c_eff = _drop_alpha, 3
        notes.append("The alpha channel of the RGBA image is ignored.")
    if c_eff == c_model:
        pass
    elif c_model == 1 and rgb:
        post = _channel_mean
        notes.append(
            "RGB image converted to gray (mean of the normalised channels) for a 1-channel model."
        )
    elif c_eff == 1 and c_model > 1:
        post = _Repeat(c_model)
        notes.append(f"Gray image replicated to the model's {c_model} input channels.")
    else:
        where = "colour axis" if layout.rgb else f"channel axis {ax}"
        what = f"{c_eff} selected" if layout.channels is not None else f"{c_eff}"
        raise ValueError(
            f"The model expects {c_model} input channel(s) but the image has {what} "
            f"(shape {arr.shape}, {where}). Choose a model trained on {c_eff}-channel images, "
            f"pick {c_model} channel(s) with ImageLayout(channels=...) (CLI: --channels), or "
            "check the channel axis (None = no channels)."
        )
    return ImagePlan(view, lead, names, select, post, layout)


def check_channels(
    channels: Sequence[int], c_img: int, shape: tuple[int, ...], ax: int | None
) -> tuple[int, ...]:
    """Validated channel indices (negative allowed) for an image with ``c_img`` channels."""
    if ax is None:
        raise ValueError(
            f"channels={tuple(channels)} needs a channel axis, but the image of shape "
            f"{shape} has none; set channel_axis (or rgb) as well."
        )
    picked = []
    for c in channels:
        if not isinstance(c, int | np.integer) or isinstance(c, bool) or not -c_img <= c < c_img:
            raise ValueError(
                f"channels={tuple(channels)}: {c!r} is not a channel of the image "
                f"(shape {shape}, {c_img} channels on axis {ax}; valid 0..{c_img - 1})."
            )
        picked.append(int(c) % c_img)
    if not picked:
        raise ValueError("channels=() selects nothing; pass None for all channels.")
    return tuple(picked)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class _Take:
    """Select channels (last axis) in the given order."""

    index: tuple[int, ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x[..., list(self.index)]


def _drop_alpha(x: np.ndarray) -> np.ndarray:
    return x[..., :3]


def _channel_mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1, keepdims=True, dtype=np.float32)


@dataclass(frozen=True)
class _Repeat:
    times: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.repeat(x, self.times, axis=-1)


def check_finite(plan: ImagePlan) -> None:
    """Raise ``ValueError`` when a float image holds NaN or Inf (checked slice by slice)."""
    if plan.view.dtype.kind != "f":
        return
    for idx in np.ndindex(*plan.lead):
        sl = plan.view[idx]
        finite = np.isfinite(sl)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            where = f" in slice {idx}" if idx else ""
            raise ValueError(
                f"The image contains {bad} NaN/Inf value(s){where}. Replace them before "
                "segmenting, e.g. image = numpy.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)."
            )


def check_spacing(spacing: Any, arr: np.ndarray, plan: ImagePlan) -> tuple[float, ...]:
    """Pixel size per non-channel axis (``None``: all 1; ``(dy, dx)`` padded with 1s)."""
    n = len(plan.lead) + 2
    if spacing is None:
        return (1.0,) * n
    try:
        values = [float(s) for s in spacing]
    except TypeError:
        raise TypeError(f"spacing must be a sequence of numbers, got {spacing!r}.") from None
    if len(values) == arr.ndim and plan.layout.channel_axis is not None and arr.ndim == n + 1:
        values.pop(plan.layout.channel_axis)  # a scale that includes the channel axis
    if len(values) == 2 and n > 2:
        values = [1.0] * (n - 2) + values
    if len(values) != n:
        raise ValueError(
            f"spacing needs one value per non-channel axis ({n} for shape {arr.shape}) or just "
            f"(dy, dx); got {tuple(spacing)}."
        )
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing values must be positive and finite, got {tuple(spacing)}.")
    return tuple(values)
