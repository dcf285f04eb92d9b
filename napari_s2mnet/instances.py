"""Instance labels that separate touching objects, in 2-D and 3-D.

Core module (numpy, scipy, scikit-image; never torch, Qt or napari). It holds the one definition of

* the **training targets of the instance head** (:func:`instance_targets`): an inner-boundary map
  (pixels of an object next to another object or to background) and a normalised distance map
  (distance to the object's edge divided by the object's largest distance: 1 at the centre);
* **seeded watershed** (:func:`seeded_watershed`): seeds are the connected cores of a predicted
  interior map, flooded downhill over the predicted foreground; 2-D or 3-D;
* today's **distance-transform split** of a binary mask (:func:`distance_watershed`), the
  heuristic for models without an instance head, now n-D with anisotropic sampling;
* **IoU stitching across planes** (:func:`stitch_planes`): per-plane labels joined into 3-D
  objects when they overlap the previous plane's object by at least ``threshold`` IoU. This is
  the rule of Cellpose's ``stitch3D`` / ``stitch_threshold`` (Stringer et al., Nat. Methods 2021;
  BSD-3-Clause), re-implemented with sparse overlaps;
* **instance scores** (:func:`match_scores`): F1 and "average precision" ``TP / (TP + FP + FN)``
  (the DSB2018 / StarDist / Cellpose definition) at IoU thresholds, one-to-one matching.

Time series are never linked across ``t``: every function works on one 2-D image or one
``(Z, Y, X)`` volume; callers loop over time points (see :func:`per_volume`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "DEFAULT_INTERIOR",
    "DEFAULT_LABELS_3D",
    "INSTANCE_CHANNELS",
    "IOU_THRESHOLDS",
    "STITCH_THRESHOLD",
    "distance_watershed",
    "head_instances",
    "instance_target_batch",
    "instance_targets",
    "interior_map",
    "match_scores",
    "per_volume",
    "seeded_watershed",
    "stitch_planes",
]

#: Extra output channels of the instance head, after the foreground channel, in this order.
INSTANCE_CHANNELS: tuple[str, ...] = ("boundary", "distance")

#: How the instance head's maps define interiors for the seeds (:func:`interior_map`); chosen
#: by measurement on held-out data (docs/methods.md, benchmarks/instances.py).
DEFAULT_INTERIOR = "distance"

#: How ``(Z, Y, X)`` stacks are labelled by default (``InferenceConfig.labels_3d="auto"``);
#: chosen by measurement on the 3-D nuclei stack (docs/benchmarks.md).
DEFAULT_LABELS_3D = "watershed"

#: Cellpose's default ``stitch_threshold`` (IoU to join a plane's object to the one below).
STITCH_THRESHOLD = 0.25

#: IoU thresholds of the mean average precision (COCO / DSB2018 convention).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


# --------------------------------------------------------------------------------------------
# Input checks


def _check_labels(labels: Any, name: str = "labels", ndim: Sequence[int] = (2, 3)) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim not in ndim:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {lab.shape}."
        )
    if lab.dtype == bool:
        return lab.astype(np.int32)
    if lab.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must be an integer label image (0 = background), got dtype {lab.dtype}."
        )
    if lab.size and lab.dtype.kind == "i" and lab.min() < 0:
        raise ValueError(f"{name} must be non-negative (0 = background, 1.. = objects).")
    return lab


def _check_map(arr: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D (Y, X) or 3-D (Z, Y, X) map, got shape {a.shape}.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have the foreground's shape {shape}, got {a.shape}.")
    if a.dtype.kind not in "fbiu":
        raise TypeError(f"{name} must be numeric, got dtype {a.dtype}.")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim or not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(
            f"spacing must be {ndim} positive numbers (one per axis), got {tuple(spacing)}."
        )
    return s


# --------------------------------------------------------------------------------------------
# Training targets


def instance_targets(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Targets of the instance head from a 2-D instance label image.

    Args:
        labels: ``(H, W)`` integer instance labels, 0 = background (each object its own id).

    Returns:
        ``(boundary, distance)``, float32 ``(H, W)`` each:

        * ``boundary``: 1 on object pixels whose 4-neighbourhood holds another id or background
          (the object's inner boundary, 1 px wide; between two touching objects 2 px), else 0.
          The image border is not a boundary (an object cut by a crop continues outside it).
        * ``distance``: inside each object, the Euclidean distance to the nearest pixel not of
          that object (image border excluded, as above), divided by the object's maximum: 1 at
          its centre, ``1 / max`` at its edge; 0 on background.
    """
    lab = _check_labels(labels, ndim=(2,))
    # Edge padding: objects continue beyond the border, background stays background.
    p = np.pad(lab, 1, mode="edge")
    core = p[1:-1, 1:-1]
    same = np.ones(lab.shape, dtype=bool)
    for sl in (
        (slice(None, -2), slice(1, -1)),
        (slice(2, None), slice(1, -1)),
        (slice(1, -1), slice(None, -2)),
        (slice(1, -1), slice(2, None)),
    ):
        same &= p[sl] == core
    fg = lab > 0
    boundary = (fg & ~same).astype(np.float32)
    distance = np.zeros(lab.shape, dtype=np.float32)
    for i, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        # The box plus one pixel of margin, taken from the edge-padded image: at the image
        # border the object continues, elsewhere the margin is background or a neighbour.
        crop = p[sl[0].start : sl[0].stop + 2, sl[1].start : sl[1].stop + 2] == i + 1
        inside = crop[1:-1, 1:-1]
        if crop.all():  # one object fills the image: no edge anywhere
            distance[sl][inside] = 1.0
            continue
        d = ndi.distance_transform_edt(crop)[1:-1, 1:-1]
        distance[sl][inside] = (d[inside] / d[inside].max()).astype(np.float32)
    return boundary, distance


def instance_target_batch(labels: Any) -> np.ndarray:
    """Targets of a batch of crops for a model with the instance head.

    Args:
        labels: ``(B, H, W)`` instance labels of the crops.

    Returns:
        float32 ``(B, 3, H, W)``: foreground mask, then :func:`instance_targets`.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be a (B, H, W) batch, got shape {lab.shape}.")
    out = np.empty((lab.shape[0], 3, *lab.shape[1:]), dtype=np.float32)
    for i, crop in enumerate(lab):
        out[i, 0] = crop > 0
        out[i, 1], out[i, 2] = instance_targets(crop)
    return out


# --------------------------------------------------------------------------------------------
# From predicted maps to labels


def interior_map(
    foreground: np.ndarray,
    boundary: np.ndarray | None = None,
    distance: np.ndarray | None = None,
    mode: str = "distance",
) -> np.ndarray:
    """How central each pixel is, in ``[0, 1]``, from the instance head's maps.

    Args:
        foreground: Foreground probability.
        boundary: Predicted inner-boundary probability (``mode="contour"``).
        distance: Predicted normalised distance (``mode="distance"``).
        mode: ``"contour"``: ``foreground * (1 - boundary)``; ``"distance"``: ``distance``
            (masked by nothing: the watershed masks with the foreground).

    Returns:
        float32 map of the foreground's shape (a float16 ``distance`` stays float16).
    """
    fg = _check_map(foreground, "foreground")
    if mode == "contour":
        if boundary is None:
            raise ValueError("mode='contour' needs the boundary map.")
        b = _check_map(boundary, "boundary", fg.shape)
        return (fg * (1.0 - b)).astype(np.float32, copy=False)
    if mode == "distance":
        if distance is None:
            raise ValueError("mode='distance' needs the distance map.")
        return _as_float(_check_map(distance, "distance", fg.shape))
    raise ValueError(f"mode must be 'contour' or 'distance', got {mode!r}.")


def _as_float(a: np.ndarray) -> np.ndarray:
    """float16 kept (half the memory of a large map), anything else as float32."""
    return a if a.dtype == np.float16 else a.astype(np.float32, copy=False)


def _structure(ndim: int, full: bool) -> np.ndarray:
    return ndi.generate_binary_structure(ndim, ndim if full else 1)


def _add_unseeded(labels: np.ndarray, mask: np.ndarray, n: int) -> int:
    """Foreground components the watershed did not reach (no seed) become objects of their own."""
    missed = mask & (labels == 0)
    if not missed.any():
        return n
    extra, k = ndi.label(missed, structure=_structure(mask.ndim, True))
    labels[missed] = extra[missed] + n
    return n + int(k)


def seeded_watershed(
    foreground: np.ndarray,
    interior: np.ndarray,
    *,
    threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_seed_size: int = 4,
    smooth: float = 0.0,
    spacing: Sequence[float] | None = None,
    per_object: bool = True,
) -> tuple[np.ndarray, int]:
    """Instance labels by seeded watershed from a predicted interior map (2-D or 3-D).

    Seeds are the face-connected components of ``interior > seed_threshold`` inside the
    foreground; each is flooded downhill on ``-interior`` over ``foreground > threshold``, so
    two touching objects meet where the interior map is lowest (their shared boundary).
    Foreground components without a seed keep their own label (nothing is lost).

    Args:
        foreground: ``(Y, X)`` or ``(Z, Y, X)`` foreground probability.
        interior: Same shape: how central each pixel is (see :func:`interior_map`).
        threshold: Foreground threshold.
        seed_threshold: Interior threshold for seeds.
        min_seed_size: Seeds smaller than this many pixels / voxels are dropped (their pixels
            are flooded from a neighbouring seed or, if none, kept as an unseeded object).
        smooth: Gaussian smoothing of the interior map before seeding, in physical units
            (``sigma / spacing`` pixels per axis); 0 = none.
        spacing: Physical size per axis (napari's ``layer.scale``), for ``smooth``.
        per_object: Flood each foreground component on its own bounding box (same partition
            as one whole-image watershed, a fraction of its memory); ``False``: whole image.

    Returns:
        ``(labels, n)``: int32 labels ``1..n`` (0 = background) and the object count.
    """
    fg = _check_map(foreground, "foreground")
    inner = _as_float(_check_map(interior, "interior", fg.shape))
    sp = _check_spacing(spacing, fg.ndim)
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0 (physical units), got {smooth}.")
    if smooth > 0:
        inner = ndi.gaussian_filter(inner.astype(np.float32), sigma=[smooth / s for s in sp])
    if per_object:
        return _watershed_per_component(fg, threshold, inner, seed_threshold, min_seed_size)
    mask = fg > threshold
    labels, n = _watershed_whole(mask, inner, seed_threshold, min_seed_size)
    return labels, _add_unseeded(labels, mask, n)


def _seeds(
    mask: np.ndarray, inner: np.ndarray, seed_threshold: float, min_seed_size: int
) -> tuple[np.ndarray, int]:
    """Face-connected seeds ``1..n`` of at least ``min_seed_size`` pixels."""
    markers, n = ndi.label(mask & (inner > seed_threshold), structure=_structure(mask.ndim, False))
    if n and min_seed_size > 1:
        sizes = np.bincount(markers.ravel(), minlength=n + 1)
        keep = sizes >= int(min_seed_size)
        keep[0] = False
        lut = np.zeros(n + 1, dtype=np.int32)
        n = int(keep.sum())
        lut[keep] = np.arange(1, n + 1, dtype=np.int32)
        markers = lut[markers]
    return markers.astype(np.int32, copy=False), int(n)


def _watershed_whole(
    mask: np.ndarray, inner: np.ndarray, seed_threshold: float, min_seed_size: int
) -> tuple[np.ndarray, int]:
    """One watershed over the whole image (the reference for :func:`_watershed_per_component`)."""
    from skimage.segmentation import watershed

    markers, n = _seeds(mask, inner, seed_threshold, min_seed_size)
    if not n:
        return np.zeros(mask.shape, dtype=np.int32), 0
    face = _structure(mask.ndim, False)
    labels = watershed(-inner, markers, mask=mask, connectivity=face)
    return labels.astype(np.int32, copy=False), n


def _watershed_per_component(
    fg: np.ndarray, threshold: float, inner: np.ndarray, seed_threshold: float, min_seed_size: int
) -> tuple[np.ndarray, int]:
    """The same partition as :func:`_watershed_whole` followed by :func:`_add_unseeded`, one
    foreground component at a time (ids in component order).

    The flood never leaves a face-connected part of the mask, and what it does not reach is
    labelled by full connectivity, so each fully connected component of the mask is independent
    of the others. Working on each one's bounding box keeps the watershed's float64 copy and
    queues small (on an 8192^2 image the whole-image watershed alone needed ~2 GB), and the
    components' label array becomes the output in place. A face-connected component with one
    seed is that object, with no watershed at all (most nuclei).
    """
    from skimage.segmentation import watershed

    face, full = _structure(fg.ndim, False), _structure(fg.ndim, True)
    comp, _ = ndi.label(fg > threshold, structure=full)  # the mask lives only this long
    # Finished objects are written as negative ids, so they never clash with a later
    # component's (positive) id inside a shared bounding box.
    n = 0
    for i, box in enumerate(ndi.find_objects(comp), start=1):
        if box is None:
            continue
        view = comp[box]
        own = view == i
        markers, k = _seeds(own, inner[box], seed_threshold, min_seed_size)
        if k == 1 and ndi.label(own, structure=face)[1] == 1:
            view[own] = -(n + 1)
            n += 1
            continue
        rest = own
        if k:
            ws = watershed(-inner[box], markers, mask=own, connectivity=face)
            reached = ws > 0
            view[reached] = -(ws[reached] + n)
            n += k
            rest = own & ~reached
        if rest.any():  # no seed reached these pixels: objects of their own (_add_unseeded)
            extra, e = ndi.label(rest, structure=full)
            view[rest] = -(extra[rest] + n)
            n += int(e)
    np.negative(comp, out=comp)
    return comp.astype(np.int32, copy=False), n


def head_instances(
    maps: np.ndarray,
    *,
    threshold: float = 0.5,
    mode: str = DEFAULT_INTERIOR,
    seed_threshold: float = 0.5,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, int]:
    """Instance labels from the three sigmoid maps of a model with the instance head.

    Args:
        maps: ``(3, Y, X)`` or ``(3, Z, Y, X)``: foreground, boundary, distance probabilities.
        threshold: Foreground threshold.
        mode: Interior definition, see :func:`interior_map`.
        seed_threshold: Interior threshold for seeds.
        spacing: Physical size per spatial axis (3-D: anisotropic seeds and smoothing).

    Returns:
        ``(labels, n)`` as :func:`seeded_watershed`.
    """
    m = np.asarray(maps)
    if m.ndim not in (3, 4) or m.shape[0] != 1 + len(INSTANCE_CHANNELS):
        raise ValueError(
            f"maps must be (3, Y, X) or (3, Z, Y, X) (foreground, boundary, "
            f"distance), got shape {m.shape}."
        )
    inner = interior_map(m[0], boundary=m[1], distance=m[2], mode=mode)
    return seeded_watershed(
        m[0], inner, threshold=threshold, seed_threshold=seed_threshold, spacing=spacing
    )


def distance_watershed(
    mask: np.ndarray, *, min_distance: float = 5.0, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, int]:
    """Split touching objects of a binary mask by watershed of its distance transform.

    The heuristic for models without an instance head (and the baseline of
    ``benchmarks/instances.py``): seeds are the local maxima of the (anisotropic) Euclidean
    distance transform at least ``min_distance`` apart; works in 2-D and 3-D.

    Args:
        mask: ``(Y, X)`` or ``(Z, Y, X)`` binary mask.
        min_distance: Minimum distance between seeds, in pixels of the finest axis.
        spacing: Physical size per axis; the distance transform and the seed spacing use it.

    Returns:
        ``(labels, n)`` as :func:`seeded_watershed`.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    m = _check_map(mask, "mask") > 0
    sp = _check_spacing(spacing, m.ndim)
    if not m.any():
        return np.zeros(m.shape, dtype=np.int32), 0
    dist = ndi.distance_transform_edt(m, sampling=sp)
    comp, _ = ndi.label(m, structure=_structure(m.ndim, True))
    finest = min(sp)
    # peak_local_max's footprint is in pixels: scale it per axis by the spacing.
    size = [max(1, round(2 * min_distance * finest / s) + 1) for s in sp]
    peaks = peak_local_max(
        dist, footprint=np.ones(size, dtype=bool), labels=comp, exclude_border=False
    )
    seeds = np.zeros(m.shape, dtype=bool)
    seeds[tuple(peaks.T)] = True
    markers, n = ndi.label(seeds, structure=_structure(m.ndim, True))  # plateaus: one seed
    labels = watershed(-dist, markers, mask=m).astype(np.int32, copy=False)
    n = _add_unseeded(labels, m, int(n))
    return labels, n


# --------------------------------------------------------------------------------------------
# IoU stitching across planes


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(ia, ib, iou)`` of labels of ``a`` and ``b`` (same shape) that overlap."""
    both = (a > 0) & (b > 0)
    if not both.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    pa, pb = a[both].astype(np.int64), b[both].astype(np.int64)
    key = pa * (int(b.max()) + 1) + pb
    keys, inter = np.unique(key, return_counts=True)
    ia, ib = keys // (int(b.max()) + 1), keys % (int(b.max()) + 1)
    size_a = np.bincount(a.ravel().astype(np.int64))
    size_b = np.bincount(b.ravel().astype(np.int64))
    iou = inter / (size_a[ia] + size_b[ib] - inter)
    return ia, ib, iou


def stitch_planes(planes: Any, threshold: float = 0.25) -> np.ndarray:
    """Join per-plane 2-D labels of a ``(Z, Y, X)`` stack into 3-D objects by IoU.

    Cellpose's ``stitch3D`` rule: going up the stack, each label of plane ``z + 1`` takes the id
    of the plane-``z`` object it overlaps best, provided that IoU is at least ``threshold`` and
    that it is also that object's best match in plane ``z + 1``; otherwise it starts a new
    object. Labels in the input may repeat across planes; ids of the output are unique.

    Args:
        planes: ``(Z, Y, X)`` integer labels, each plane labelled on its own.
        threshold: Minimum IoU to join (Cellpose's ``stitch_threshold``; 0.25 there).

    Returns:
        ``(Z, Y, X)`` int32 labels ``1..n``, unique across the stack.
    """
    lab = _check_labels(planes, "planes", ndim=(3,))
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold is an IoU in (0, 1], got {threshold}.")
    out = np.zeros(lab.shape, dtype=np.int32)
    next_id = 1
    for z in range(lab.shape[0]):
        cur = lab[z]
        ids = np.unique(cur)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        lut = np.zeros(int(cur.max()) + 1, dtype=np.int32)
        if z > 0:
            ia, ib, iou = _overlaps(cur, out[z - 1])
            ok = iou >= threshold
            ia, ib, iou = ia[ok], ib[ok], iou[ok]
            if ia.size:
                # Each previous object keeps only its best new partner ...
                best_b = np.zeros(int(ib.max()) + 1)
                np.maximum.at(best_b, ib, iou)
                ok = iou >= best_b[ib]
                ia, ib, iou = ia[ok], ib[ok], iou[ok]
                # ... and each new label joins its best remaining previous object.
                order = np.lexsort((-iou, ia))
                ia, ib = ia[order], ib[order]
                first = np.ones(ia.size, dtype=bool)
                first[1:] = ia[1:] != ia[:-1]
                lut[ia[first]] = ib[first]
        new = ids[lut[ids] == 0]
        lut[new] = np.arange(next_id, next_id + new.size, dtype=np.int32)
        next_id += int(new.size)
        out[z] = lut[cur]
    return out


def per_volume(
    fn: Callable[..., np.ndarray], *arrays: np.ndarray, n_spatial: int = 3
) -> np.ndarray:
    """Apply ``fn`` to every ``n_spatial``-D volume of ``(..., [Z,] Y, X)`` arrays separately.

    Leading axes (time points) are never linked: ids are made unique by offsetting each
    volume's labels by the count of the ones before.

    Args:
        fn: ``fn(*volumes) -> labels`` (int labels of the volume's shape).
        *arrays: Arrays of equal shape.
        n_spatial: Trailing spatial axes per volume (2 or 3).
    """
    lead = arrays[0].shape[: arrays[0].ndim - n_spatial]
    if not lead:
        return np.asarray(fn(*arrays), dtype=np.int32)
    out = np.zeros(arrays[0].shape, dtype=np.int64)
    offset = 0
    for idx in np.ndindex(*lead):
        lab = np.asarray(fn(*(a[idx] for a in arrays)))
        fg = lab > 0
        out[idx][fg] = lab[fg] + offset
        offset += int(lab.max()) if lab.size else 0
    return out


# --------------------------------------------------------------------------------------------
# Scores


def match_scores(
    pred: Any, gt: Any, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, Any]:
    """Instance F1 and average precision of ``pred`` against ``gt`` (2-D or 3-D labels).

    Objects are matched one-to-one by maximum total IoU (Hungarian); a pair counts as a true
    positive at threshold ``t`` when its IoU is at least ``t``. ``AP(t) = TP / (TP + FP + FN)``
    (DSB2018 / StarDist / Cellpose); ``mAP`` is its mean over ``thresholds``.

    Returns:
        ``{"n_pred", "n_gt", "f1": {t: ...}, "ap": {t: ...}, "f1@0.5", "mAP"}``.
    """
    from scipy.optimize import linear_sum_assignment

    p = _check_labels(pred, "pred")
    g = _check_labels(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}.")
    p_ids = np.unique(p)
    p_ids = p_ids[p_ids > 0]
    g_ids = np.unique(g)
    g_ids = g_ids[g_ids > 0]
    n_p, n_g = int(p_ids.size), int(g_ids.size)
    matched_iou = np.zeros(0)
    if n_p and n_g:
        ia, ib, iou = _overlaps(p, g)
        rows = np.searchsorted(p_ids, ia)
        cols = np.searchsorted(g_ids, ib)
        m = np.zeros((n_p, n_g))
        m[rows, cols] = iou
        r, c = linear_sum_assignment(-m)
        matched_iou = m[r, c]
    f1, ap = {}, {}
    for t in thresholds:
        tp = int((matched_iou >= t).sum())
        fp, fn = n_p - tp, n_g - tp
        f1[float(t)] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
        ap[float(t)] = tp / (tp + fp + fn) if (tp + fp + fn) else 1.0
    return {
        "n_pred": n_p,
        "n_gt": n_g,
        "f1": f1,
        "ap": ap,
        "f1@0.5": f1.get(0.5, float("nan")),
        "mAP": float(np.mean(list(ap.values()))),
    }
