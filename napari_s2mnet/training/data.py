"""Training data: (image, labels) pairs -> normalised items, the validation split, a fingerprint.

Each image is normalised exactly as :mod:`napari_s2mnet.inference` does (the bundle's
:class:`~napari_s2mnet.preprocess.NormalizationConfig` over the whole image, per channel, with the
same channel handling from :mod:`napari_s2mnet.layout`). Instance labels become a binary
foreground for binary models; multi-class models take semantic labels (class ids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_s2mnet.checkpoint import ModelBundle
from napari_s2mnet.io import check_float_label_range
from napari_s2mnet.layout import ImageLayout, check_array, check_finite, plan_image, resolve_layout
from napari_s2mnet.training.config import FinetuneConfig
from napari_s2mnet.training.region import (
    CORRECTED,
    FEW_REGIONS,
    MIN_VAL_REGIONS,
    Regions,
    build_regions,
    check_mask,
    choose_held_out,
    count_regions,
)

_MIN_VAL_OBJECTS = 3
_MIN_BAND = 32  # smallest held-out band / remaining training strip, in pixels


@dataclass
class _Item:
    """One image of the training or validation set, ready for cropping.

    ``image`` is ``(S, C, Y, X)`` float32 normalised (S planes of a stack, C image channels);
    ``target`` is ``(S, Y, X)`` class ids (binary: 0/1); ``fg`` holds flat indices of foreground
    pixels (subsampled) for crops weighted toward labelled regions.
    """

    image: np.ndarray
    target: np.ndarray
    fg: np.ndarray
    name: str
    regions: Regions | None = None  # corrected regions (training with corrections)


@dataclass
class _Data:
    train: list[_Item]
    val: list[_Item]
    split: str  # how validation was chosen, for the user
    info: list[dict[str, Any]]  # provenance per input image
    n_objects: int
    corrected: bool = False  # trained from corrected regions (region-weighted loss)


def layout_for_pair(
    image: np.ndarray,
    labels: np.ndarray,
    channel_axis: int | None,
    given: ImageLayout | None,
    name: str,
) -> ImageLayout:
    """The :class:`~napari_s2mnet.layout.ImageLayout` of ``image``.

    Given explicitly (per pair or ``config.channel_axis``), or inferred from the labels' shape:
    the channel axis is the image axis whose removal gives the labels' shape (the last axis
    first; a last axis of 3 or 4 is RGB(A), as napari reads it).
    """
    if given is not None:
        return given
    if channel_axis is not None:
        return ImageLayout(channel_axis=channel_axis)
    if image.shape == labels.shape:
        return ImageLayout()
    if image.ndim == labels.ndim + 1:
        for ax in (image.ndim - 1, 0, *range(1, image.ndim - 1)):
            if tuple(np.delete(np.array(image.shape), ax)) == labels.shape:
                if ax == image.ndim - 1 and image.shape[-1] in (3, 4):
                    return ImageLayout(rgb=True)
                return ImageLayout(channel_axis=ax)
    raise ValueError(
        f"{name}: image shape {image.shape} does not match labels shape {labels.shape}. Labels "
        "must cover the image's spatial shape, (Y, X) or a stack (Z, Y, X); a channel axis "
        "(e.g. RGB last) is allowed in the image only. Set channel_axis if it is ambiguous."
    )


def _normalized_planes(
    image: np.ndarray, labels: np.ndarray, layout: ImageLayout, bundle: ModelBundle, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Image planes ``(S, C, Y, X)`` normalised exactly as inference does, labels ``(S, Y, X)``.

    Uses the same layout plan as inference (:func:`napari_s2mnet.layout.plan_image`: alpha
    dropped, RGB to gray for 1-channel models, gray replicated to multi-channel models) and the
    same statistics (whole image / stack, per channel), so a model sees the same values in
    training and in use.
    """
    from napari_s2mnet.preprocess import apply_normalization, pixel_samples, stats_from_samples

    try:
        arr = check_array(image)
        lay = resolve_layout(arr, layout)
        plan = plan_image(arr, lay, int(bundle.config.in_channels), [])
        check_finite(plan)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    spatial = plan.view.shape[:-1]
    if tuple(spatial) != tuple(labels.shape):
        raise ValueError(
            f"{name}: the image's spatial shape {tuple(spatial)} (shape {image.shape}, layout "
            f"{lay}) differs from the labels' shape {labels.shape}; they must match."
        )
    stats = stats_from_samples(
        plan.select(pixel_samples(plan.view, plan.view.ndim - 1)), bundle.normalization
    )
    base = apply_normalization(plan.select(plan.view), stats, channel_axis=-1)
    base = plan.post(base)  # normalised channels -> model channels (gray repeated)
    ny, nx = spatial[-2:]
    planes = np.ascontiguousarray(
        np.moveaxis(base.reshape(-1, ny, nx, base.shape[-1]), -1, 1), dtype=np.float32
    )
    if planes.shape[1] != int(bundle.config.in_channels):  # pragma: no cover - inference contract
        raise ValueError(
            f"{name}: got {planes.shape[1]} channels for a model with {bundle.config.in_channels}."
        )
    return planes, labels.reshape(-1, ny, nx)


def _count_objects(mask: np.ndarray) -> int:
    """Connected foreground components summed over the planes of ``mask`` (S, Y, X)."""
    from scipy import ndimage

    return int(sum(ndimage.label(plane)[1] for plane in mask))


def _unpack(pair: Any, i: int, names: Sequence[str] | None, role: str) -> tuple[Any, Any, str, Any]:
    if not isinstance(pair, tuple | list) or not 2 <= len(pair) <= 4:
        raise TypeError(
            f"{role} pair #{i} must be a tuple (image, labels[, name][, layout]), "
            f"got {type(pair).__name__}."
        )
    name = str(names[i]) if names is not None and i < len(names) else f"image {i}"
    layout = None
    for extra in pair[2:]:
        if isinstance(extra, ImageLayout):
            layout = extra
        elif isinstance(extra, str):
            name = extra
        elif extra is not None:
            raise TypeError(
                f"{role} pair #{i}: extra entries must be a name (str) or an "
                f"ImageLayout, got {type(extra).__name__}."
            )
    return pair[0], pair[1], name, layout


def _prepare(
    pairs: Sequence[Any],
    bundle: ModelBundle,
    config: FinetuneConfig,
    names: Sequence[str] | None,
    role: str,
    corrected: Sequence[Any] | None = None,
) -> tuple[list[_Item], list[dict[str, Any]]]:
    """Normalise and check the pairs; one :class:`_Item` per pair (all planes kept).

    Images and labels are zoomed by the object-diameter factor (``config.diameter``); with
    ``corrected`` masks (one per pair, ``None`` = the whole pair is checked), each item carries
    its mask, zoomed alike, in ``regions.all_mask`` (regions are built by :func:`_prepare_data`).
    """
    from napari_s2mnet.diameter import model_diameter, resize_plane, scale_factor, scaled_shape

    factor = scale_factor(model_diameter(bundle), config.diameter)
    if corrected is not None and len(corrected) != len(pairs):
        raise ValueError(
            f"corrected has {len(corrected)} masks for {len(pairs)} pairs; give one "
            "per pair (None for a pair whose labels are all checked)."
        )
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], np.ndarray):
        pairs = [pairs]  # a single (image, labels) pair
    if not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"No {role} data: give a list of (image, labels) pairs.")
    ncls = bundle.config.num_classes
    items: list[_Item] = []
    info: list[dict[str, Any]] = []
    for i, pair in enumerate(pairs):
        image, labels, name, layout = _unpack(pair, i, names, role)
        if image is None or labels is None:
            raise TypeError(f"{name}: image and labels must be arrays, not None.")
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise ValueError(
                    f"{name}: labels must hold whole numbers (label ids); got "
                    f"fractional or non-finite {labels.dtype} values."
                )
            check_float_label_range(labels, name)  # before the cast wraps 1e30 to a negative
            labels = labels.astype(np.int64)
        elif labels.dtype.kind not in "biu":
            raise TypeError(f"{name}: labels dtype {labels.dtype} is not an integer type.")
        if labels.ndim < 2:
            raise ValueError(
                f"{name}: labels must be 2-D (Y, X) or a stack (..., Y, X), got "
                f"shape {labels.shape}."
            )
        if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
            raise ValueError(
                f"{name}: labels contain negative values; use 0 for background and "
                "positive ids for objects."
            )
        lay = layout_for_pair(image, labels, config.channel_axis, layout, name)
        mask = check_mask(corrected[i], labels.shape, name) if corrected is not None else None
        planes, lab = _normalized_planes(image, labels, lay, bundle, name)
        if mask is not None:
            mask = mask.reshape(lab.shape)
        if factor != 1.0:  # objects reach the network at its training diameter
            shape = scaled_shape(lab.shape[-2:], factor)
            planes = np.ascontiguousarray(resize_plane(planes, shape, 1))
            lab = resize_plane(lab, shape, 0)
            if mask is not None:
                mask = resize_plane(mask, shape, 0)
        if ncls == 1 and bundle.config.instance_head:
            # Instance ids: the instance head's targets are derived per crop (loop._Run.batch).
            target = lab.astype(np.int32)
        elif ncls == 1:
            target = (lab > 0).astype(np.uint8)
        else:
            top = int(lab.max()) if lab.size else 0
            if top >= ncls:
                raise ValueError(
                    f"{name}: labels contain the value {top} but the model has {ncls} classes "
                    f"(0..{ncls - 1}); multi-class models are trained on semantic labels "
                    "(label value = class id)."
                )
            target = lab.astype(np.uint8 if ncls <= 255 else np.int32)
        n_obj = _count_objects(target > 0)
        if n_obj == 0 and role == "training" and not config.allow_empty:
            raise ValueError(
                f"{name} has no labelled objects (its labels are all 0). Label at least one "
                "object, remove this image, or allow images without objects as background-only "
                "examples (allow_empty=True)."
            )
        item = _Item(planes, target, _fg_index(target), name)
        if mask is not None:
            item.regions = Regions(
                weight=np.empty(0, np.float32),
                centres=np.empty(0, np.int64),
                val=None,
                val_boxes=[],
                all_mask=mask,
                all_boxes=[],
                n_regions=0,
                n_val=0,
            )
        items.append(item)
        info.append(
            {
                "name": name,
                "shape": list(image.shape),
                "dtype": str(image.dtype),
                "n_objects": n_obj,
                "planes": int(target.shape[0]),
                "scale": factor,
            }
        )
    if role == "training" and not any(it.fg.size for it in items):
        raise ValueError("None of the training images has a labelled object; label some objects.")
    return items, info


def _fg_index(target: np.ndarray, limit: int = 1_000_000) -> np.ndarray:
    idx = np.flatnonzero(target.reshape(-1) > 0)
    if idx.size > limit:  # a strided subset keeps memory bounded on huge stacks
        idx = idx[:: math.ceil(idx.size / limit)]
    return idx


def _sub_item(item: _Item, rows: slice, cols: slice, suffix: str) -> _Item:
    image = np.ascontiguousarray(item.image[:, :, rows, cols])
    target = np.ascontiguousarray(item.target[:, rows, cols])
    return _Item(image, target, _fg_index(target), f"{item.name} {suffix}")


def _split(items: list[_Item], config: FinetuneConfig) -> tuple[list[_Item], list[_Item], str]:
    """Hold out validation data: whole planes when there are >= 5, else a band of each image."""
    if config.val_fraction <= 0:
        return items, [], "no validation (val_fraction = 0)"
    planes = [(i, s) for i, it in enumerate(items) for s in range(it.target.shape[0])]
    with_obj = [(i, s) for i, s in planes if items[i].target[s].any()]
    if len(planes) >= 5 and len(with_obj) >= 2:
        rng = np.random.default_rng([config.seed, 7])
        n_val = max(1, round(config.val_fraction * len(planes)))
        order = [with_obj[k] for k in rng.permutation(len(with_obj))]
        val_set = set(order[: min(n_val, len(with_obj) - 1)])
        train, val = [], []
        for i, it in enumerate(items):
            keep = [s for s in range(it.target.shape[0]) if (i, s) not in val_set]
            held = [s for s in range(it.target.shape[0]) if (i, s) in val_set]
            for sel, out, tag in ((keep, train, "train"), (held, val, "val")):
                if sel:
                    img = np.ascontiguousarray(it.image[sel])
                    tgt = np.ascontiguousarray(it.target[sel])
                    out.append(_Item(img, tgt, _fg_index(tgt), f"{it.name} ({tag})"))
        n_obj = sum(_count_objects(v.target > 0) for v in val)
        return (
            train,
            val,
            (f"validation on {len(val_set)} of {len(planes)} images/slices ({n_obj} objects)"),
        )
    # Few images: hold out a band (bottom rows or right columns, the longer side) of each one.
    train, val = [], []
    n_val_obj = 0
    for it in items:
        h, w = it.target.shape[-2:]
        along_rows = h >= w
        size = h if along_rows else w
        band = round(config.val_fraction * size)
        if band < _MIN_BAND or size - band < _MIN_BAND:
            train.append(it)
            continue
        cut = size - band
        full = slice(None)
        tr = (
            _sub_item(it, slice(0, cut), full, "(train)")
            if along_rows
            else _sub_item(it, full, slice(0, cut), "(train)")
        )
        va = (
            _sub_item(it, slice(cut, None), full, "(val)")
            if along_rows
            else _sub_item(it, full, slice(cut, None), "(val)")
        )
        train.append(tr)
        val.append(va)
        n_val_obj += _count_objects(va.target > 0)
    has_train_fg = any(it.fg.size for it in train)
    if n_val_obj < _MIN_VAL_OBJECTS or not has_train_fg:
        total = sum(_count_objects(it.target > 0) for it in items)
        return (
            items,
            [],
            (
                f"no validation: too little data ({total} labelled objects; "
                f"need >= {_MIN_VAL_OBJECTS} in a held-out {config.val_fraction:.0%} "
                "band); the result is the last state"
            ),
        )
    return (
        train,
        val,
        (f"validation on the last {config.val_fraction:.0%} of each image ({n_val_obj} objects)"),
    )


def _prepare_data(
    pairs: Sequence[Any],
    bundle: ModelBundle,
    config: FinetuneConfig,
    names: Sequence[str] | None,
    val_pairs: Sequence[Any] | None,
    corrected: Sequence[Any] | None = None,
) -> _Data:
    items, info = _prepare(pairs, bundle, config, names, "training", corrected)
    n_objects = sum(d["n_objects"] for d in info)
    if corrected is not None and any(m is not None for m in corrected):
        return _corrected_data(items, info, config, n_objects)
    if val_pairs is not None:
        val, _ = _prepare(val_pairs, bundle, config, None, "validation")
        n_val = sum(_count_objects(v.target > 0) for v in val)
        return _Data(
            items, val, f"validation on {len(val)} given images ({n_val} objects)", info, n_objects
        )
    train, val, split = _split(items, config)
    return _Data(train, val, split, info, n_objects)


def _corrected_data(
    items: list[_Item], info: list[dict[str, Any]], config: FinetuneConfig, n_objects: int
) -> _Data:
    """Training from corrections: region weights, crop centres, held-out corrected regions."""
    masks = [it.regions.all_mask if it.regions is not None else None for it in items]
    n_total = sum(count_regions(m) for m in masks if m is not None)
    if n_total == 0 and all(m is not None for m in masks):
        raise ValueError(
            "No corrected pixels: paint, fill or erase labels where the model was "
            "wrong first (or train on whole labels without corrected masks)."
        )
    held = choose_held_out(n_total, config)
    offset = 0
    val: list[_Item] = []
    n_val = 0
    for it, mask in zip(items, masks, strict=True):
        if mask is None:  # a fully checked pair: every pixel counts, none held out
            mask = np.ones(it.target.shape, bool)
            regions = Regions(
                weight=np.full(it.target.shape, CORRECTED, np.float32),
                centres=_fg_index(it.target),
                val=None,
                val_boxes=[],
                all_mask=mask,
                all_boxes=[],
                n_regions=0,
                n_val=0,
            )
        else:
            regions, offset = build_regions(mask, config, held, offset)
        it.regions = regions
        if regions.val is not None:
            val.append(
                _Item(it.image, it.target, it.fg, f"{it.name} (held-out corrections)", regions)
            )
            n_val += regions.n_val
    if not any(it.regions.centres.size for it in items if it.regions is not None):
        raise ValueError(
            "Every corrected region is held out for validation; correct more "
            "objects or set val_fraction=0."
        )
    if n_val:
        split = f"validation on {n_val} of {n_total} corrected regions (held out from training)"
    elif config.val_fraction <= 0:
        split = (
            f"{n_total} corrected region(s), all used for training (no validation); "
            "the result is the final state"
        )
    else:
        split = (
            f"no validation: {n_total} corrected region(s), validation needs at least "
            f"{MIN_VAL_REGIONS}; the result is the final state"
        )
    if not n_val and n_total <= FEW_REGIONS:
        split += (
            f"; with {n_total} corrected region(s) the labels elsewhere can get worse as well as "
            "better: look at them (Revert is one click), or correct a few more objects first "
            "(5 gave steady gains)"
        )
    return _Data(items, val, split, info, n_objects, corrected=True)


def _fingerprint(data: _Data) -> str:
    """Fingerprint of the prepared training and validation data (for :class:`ResumeState`)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for items in (data.train, data.val):
        h.update(str(len(items)).encode())
        for it in items:
            for arr in (it.image, it.target):
                h.update(f"{arr.dtype}{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()
