"""Morphology descriptors: the one definition used by the features table and by MASL.

Every descriptor lies in ``[0, 1]``, does not depend on the object's size (a shape scaled by 2 or 4
gives about the same value) and behaves sensibly on simple shapes:

========================  ===============================================================  ============================
descriptor                definition (``A`` = area in pixels)                              typical values
========================  ===============================================================  ============================
``compactness``           ``clip(4 pi A / P^2, 0, 1)``, ``P`` = Crofton perimeter (4 dirs)  disk ~1.0, square ~0.9,
                                                                                           2:1 ellipse ~0.85, line ~0.1
``tubularity``            ``clip(1 - pi r^2 / A, 0, 1)``, ``r`` = radius of the largest     disk ~0, square ~0.22,
                          disk that fits inside the object                                 2:1 ellipse 0.5,
                                                                                           4:1 ellipse 0.75, line ~1
``irregularity``          ``1 - A / A_convex`` (1 - solidity; convex hull as scikit-image)  convex 0, 5-point star ~0.5
``scale``                 ``A / image area``                                               --
========================  ===============================================================  ============================

Why these estimators:

* **Perimeter.** :func:`skimage.measure.perimeter_crofton` (4 directions) is the only one of the
  scikit-image estimators whose disk compactness stays at 0.99-1.01 for radii 10 to 80 pixels.
  ``regionprops.perimeter`` drifts from 0.98 (r = 10) to 0.91 (r = 80) and keeps falling, and
  8-connected or marching-squares contour lengths overestimate a circle by ~5-20 %. Crofton is
  exact in the mean over orientations; with 4 directions an axis-aligned square reads 0.89
  instead of pi/4 = 0.79 (its perimeter is underestimated by ~5 %), which keeps the ordering
  disk > square > ellipse > line.
* **Tubularity.** A thin, elongated or branched structure is one that no single disk covers
  much of, so ``1 - (area of the largest inscribed disk) / area`` measures it directly. For an
  ellipse with axes ``a >= b`` it is exactly ``1 - b/a``; a line of width ``w`` and length
  ``L`` gives ``1 - pi w / (4 L)``; rings and vessel trees give > 0.9. The inscribed radius is
  taken from a Euclidean distance transform on a half-pixel lattice (pixel centres, edge
  midpoints and corners), so it is the distance to the true pixel-square boundary and even
  widths are not biased by half a pixel. The alternative "width-weighted skeleton length / area"
  was rejected after measuring it: every boundary bump spawns a skeleton branch, so a disk with
  8 % boundary noise reads 0.6-0.9 (this definition: ~0.3) and a 30-degree 3-px line only ~0.6.
  The erosion-based formula of the reference code is inverted (a disk scores higher than a
  line); it exists only in :mod:`napari_s2mnet.losses.components` for parity experiments.
* **Irregularity.** ``1 - solidity`` with the convex hull of scikit-image's ``regionprops``
  (hull of the pixel squares, pixels whose centres it contains) is 0 for convex shapes and
  grows with concavities.

Whole masks (:func:`mask_descriptors`, :func:`batch_descriptors`) use the area-weighted mean of
the per-object values over 8-connected components and the total foreground fraction for ``scale``.

This module imports only numpy, scipy, scikit-image and (lazily) pandas; it never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "DESCRIPTORS",
    "FEATURE_COLUMNS",
    "batch_descriptors",
    "compactness",
    "empty_features",
    "irregularity",
    "mask_descriptors",
    "object_descriptors",
    "object_features",
    "tubularity",
    "update_features",
    "update_stack_features",
]

#: Shape descriptors computed for every object / mask, in this order.
DESCRIPTORS: tuple[str, ...] = ("compactness", "tubularity", "irregularity", "scale")

#: Columns of :func:`object_features`, in this order.
FEATURE_COLUMNS: tuple[str, ...] = (
    "index",
    "label",
    "area_px",
    "area",
    "compactness",
    "tubularity",
    "irregularity",
    "scale",
    "class",
    "mean_probability",
)

# 8-connectivity: components that touch diagonally are one object (scikit-image's default).
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# Single-object descriptors (one binary crop = one object)
# --------------------------------------------------------------------------------------------


def _as_2d_bool(mask: Any, name: str = "mask") -> np.ndarray:
    arr = _to_numpy(mask)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (H, W) array, got shape {arr.shape}; "
            "compute descriptors slice by slice for stacks."
        )
    return _binarize(arr, name)


def _to_numpy(x: Any) -> np.ndarray:
    # Accept torch tensors without importing torch (duck typing on .detach()).
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binarize(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values.")
        return arr > 0.5
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise TypeError(f"{name} must be a bool, integer or float array, got dtype {arr.dtype}.")


def compactness(mask: np.ndarray, area: float | None = None) -> float:
    """Isoperimetric quotient ``clip(4 pi A / P^2, 0, 1)`` with the 4-direction Crofton perimeter.

    Args:
        mask: 2-D binary image of one object (all foreground pixels count).
        area: Foreground pixel count if already known.

    Returns:
        1 for a disk, ~0.9 for a square, small for thin lines; 0 for an empty mask.
    """
    from skimage.measure import perimeter_crofton

    m = _as_2d_bool(mask)
    a = float(m.sum()) if area is None else float(area)
    if a <= 0:
        return 0.0
    return _compactness_from(a, float(perimeter_crofton(m, directions=4)))


def _compactness_from(area: float, perimeter: float) -> float:
    if area <= 0 or perimeter <= 0:
        return 0.0
    return float(np.clip(4.0 * np.pi * area / perimeter**2, 0.0, 1.0))


def _inscribed_radius(mask: np.ndarray) -> float:
    """Radius (pixels) of the largest disk inside the union of the foreground pixel squares.

    The EDT runs on a lattice of half-pixel spacing whose points are pixel centres, edge midpoints
    and corners; a lattice point is inside when every pixel it touches is foreground. Boundary
    edges lie on the lattice, so the result is the distance to the true pixel-square boundary
    (a 4-px-wide bar gives 2.0, a 3-px-wide bar 1.5).
    """
    p = np.pad(mask, 1)
    h, w = p.shape
    lat = np.zeros((2 * h - 1, 2 * w - 1), dtype=bool)
    lat[0::2, 0::2] = p  # pixel centres
    lat[1::2, 0::2] = p[:-1] & p[1:]  # midpoints of horizontal edges
    lat[0::2, 1::2] = p[:, :-1] & p[:, 1:]  # midpoints of vertical edges
    lat[1::2, 1::2] = p[:-1, :-1] & p[1:, :-1] & p[:-1, 1:] & p[1:, 1:]  # corners
    if not lat.any():
        return 0.0
    return float(ndi.distance_transform_edt(lat).max()) / 2.0


def _tubularity_from(area: float, radius: float) -> float:
    if area <= 0:
        return 0.0
    return float(np.clip(1.0 - np.pi * radius**2 / area, 0.0, 1.0))


def tubularity(mask: np.ndarray) -> float:
    """``clip(1 - pi r^2 / A, 0, 1)``, ``r`` the radius of the largest inscribed disk.

    High (-> 1) for thin, elongated, ring-shaped or branched objects, ~0 for disks; an ellipse
    with semi-axes ``a >= b`` gives ``1 - b/a``.

    Args:
        mask: 2-D binary image of one object.
    """
    m = _as_2d_bool(mask)
    a = float(m.sum())
    if a <= 0:
        return 0.0
    return _tubularity_from(a, _inscribed_radius(m))


def _convex_area(mask: np.ndarray) -> float:
    from skimage.morphology import convex_hull_image

    if mask.sum() <= 2:  # qhull needs 3 points; 1-2 pixels are convex
        return float(mask.sum())
    return float(convex_hull_image(mask).sum())


def _irregularity_from(area: float, convex_area: float) -> float:
    if area <= 0 or convex_area <= 0:
        return 0.0
    return float(np.clip(1.0 - area / convex_area, 0.0, 1.0))


def irregularity(mask: np.ndarray) -> float:
    """``1 - solidity = 1 - A / A_convex`` (scikit-image's convex hull image).

    Args:
        mask: 2-D binary image of one object.
    """
    m = _as_2d_bool(mask)
    a = float(m.sum())
    return _irregularity_from(a, _convex_area(m)) if a > 0 else 0.0


def _crop_descriptors(crop: np.ndarray) -> tuple[float, float, float, float]:
    """(area, compactness, tubularity, irregularity) of the object filling ``crop`` (bool)."""
    from skimage.measure import perimeter_crofton

    area = float(np.count_nonzero(crop))
    if area == 0:
        return 0.0, 0.0, 0.0, 0.0
    comp = _compactness_from(area, float(perimeter_crofton(crop, directions=4)))
    tub = _tubularity_from(area, _inscribed_radius(crop))
    irr = _irregularity_from(area, _convex_area(crop))
    return area, comp, tub, irr


def object_descriptors(
    mask_crop: np.ndarray, *, image_area: float | None = None
) -> dict[str, float]:
    """Descriptors of one object.

    Args:
        mask_crop: 2-D binary array; all its foreground pixels form the object (use
            :func:`mask_descriptors` for a mask with several objects). Float arrays are
            thresholded at 0.5.
        image_area: Pixel count of the full image, for ``scale``; default: the crop's size.

    Returns:
        ``{"area", "compactness", "tubularity", "irregularity", "scale"}`` (area in pixels, the
        rest in ``[0, 1]``); all zeros for an empty crop.
    """
    m = _as_2d_bool(mask_crop, "mask_crop")
    if image_area is not None and image_area <= 0:
        raise ValueError(f"image_area must be positive, got {image_area}.")
    area, comp, tub, irr = _crop_descriptors(m)
    total = float(image_area) if image_area is not None else float(m.size)
    return {
        "area": area,
        "compactness": comp,
        "tubularity": tub,
        "irregularity": irr,
        "scale": float(np.clip(area / total, 0.0, 1.0)) if total > 0 else 0.0,
    }


# --------------------------------------------------------------------------------------------
# Whole masks
# --------------------------------------------------------------------------------------------


def mask_descriptors(mask: np.ndarray) -> dict[str, float]:
    """Descriptors of a whole binary mask.

    ``compactness``, ``tubularity`` and ``irregularity`` are the area-weighted means of the
    per-object values over the 8-connected components; ``scale`` is the foreground fraction.

    Args:
        mask: 2-D array (bool, integer: nonzero is foreground, float: > 0.5 is foreground).

    Returns:
        ``{"compactness", "tubularity", "irregularity", "scale"}``; zeros for an empty mask.
    """
    m = _as_2d_bool(mask)
    out = dict.fromkeys(DESCRIPTORS, 0.0)
    if m.size == 0 or not m.any():
        return out
    labels, _ = ndi.label(m, structure=_STRUCTURE_8)
    total = 0.0
    acc = np.zeros(3)
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:  # pragma: no cover - ndi.label yields consecutive ids
            continue
        # compare ids: a bounding box may also hold pixels of another component
        area, comp, tub, irr = _crop_descriptors(labels[sl] == i + 1)
        total += area
        acc += area * np.array([comp, tub, irr])
    if total > 0:
        out["compactness"], out["tubularity"], out["irregularity"] = (float(v) for v in acc / total)
    out["scale"] = float(np.count_nonzero(m)) / m.size
    return out


def batch_descriptors(masks: Any) -> dict[str, np.ndarray]:
    """Per-sample :func:`mask_descriptors` of a batch.

    Args:
        masks: ``(B, H, W)`` array or tensor (bool, integer: nonzero = foreground, float:
            > 0.5 = foreground); a ``(B, 1, H, W)`` array is accepted too.

    Returns:
        ``{"compactness", "tubularity", "irregularity", "scale"}`` -> float64 arrays of shape ``(B,)``.
    """
    arr = _to_numpy(masks)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"masks must have shape (B, H, W) (or (B, 1, H, W)), got {arr.shape}.")
    arr = _binarize(arr, "masks")
    rows = [mask_descriptors(m) for m in arr]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in DESCRIPTORS}


# --------------------------------------------------------------------------------------------
# Feature tables for label images
# --------------------------------------------------------------------------------------------


def _check_labels(labels: Any) -> np.ndarray:
    lab = _to_numpy(labels)
    if lab.ndim != 2:
        raise ValueError(
            f"labels must be a 2-D (H, W) label image, got shape {lab.shape}; "
            "for stacks compute the features per 2-D slice."
        )
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(
            f"labels must have an integer dtype (0 = background), got {lab.dtype}; "
            "convert with labels.astype(int) if the values are whole numbers."
        )
    if lab.size and lab.min() < 0:
        raise ValueError("labels must be non-negative (0 = background, 1.. = objects).")
    return lab


def _check_aux(arr: Any, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if arr is None:
        return None
    a = _to_numpy(arr)
    if a.shape != shape:
        raise ValueError(f"{name} must have the labels' shape {shape}, got {a.shape}.")
    return a


def _object_slices(
    labels: np.ndarray, label_ids: Iterable[int] | None
) -> dict[int, tuple[slice, ...]]:
    """Bounding boxes of the requested (or all) label ids present in ``labels``."""
    if label_ids is not None:
        ids = [int(i) for i in label_ids]
        wanted = np.unique(np.asarray(ids, dtype=_id_dtype(max(ids, default=0))))
        wanted = wanted[wanted > 0]
        if wanted.size == 0:
            return {}
        # One O(HW) pass maps the wanted ids to 1..k so find_objects stays small even for
        # huge label values.
        present = np.isin(labels, wanted)
        if not present.any():
            return {}
        compact = np.zeros(labels.shape, dtype=np.int32)
        compact[present] = np.searchsorted(wanted, labels[present]) + 1
        return {
            int(wanted[i]): sl for i, sl in enumerate(ndi.find_objects(compact)) if sl is not None
        }
    max_id = int(labels.max()) if labels.size else 0
    if max_id == 0:
        return {}
    if max_id <= 4 * labels.size + 1024:
        return {i + 1: sl for i, sl in enumerate(ndi.find_objects(labels)) if sl is not None}
    # Sparse huge ids: relabel to 0..n-1 through np.unique (O(HW log HW), rare).
    ids, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(labels.shape)
    if ids[0] != 0:  # no background: shift so that every id gets a slice
        ids = np.concatenate([[0], ids])
        inv = inv + 1
    return {int(ids[i + 1]): sl for i, sl in enumerate(ndi.find_objects(inv)) if sl is not None}


def _majority_class(values: np.ndarray) -> int:
    vals = values.astype(np.int64, copy=False).ravel()
    if vals.size == 0:
        return 1
    if vals.min() < 0:
        raise ValueError("classes must be non-negative class ids.")
    counts = np.bincount(vals)
    # Background (0) is only the answer when nothing else is inside the object.
    if counts.size > 1 and counts[1:].any():
        return int(np.argmax(counts[1:]) + 1)
    return int(np.argmax(counts))


def empty_features() -> pd.DataFrame:
    """A feature table with no rows: the columns of :func:`object_features` and their dtypes."""
    import pandas as pd

    return pd.DataFrame(
        {
            "index": pd.Series(dtype="int64"),
            "label": pd.Series(dtype="int64"),
            "area_px": pd.Series(dtype="int64"),
            "area": pd.Series(dtype="float64"),
            "compactness": pd.Series(dtype="float64"),
            "tubularity": pd.Series(dtype="float64"),
            "irregularity": pd.Series(dtype="float64"),
            "scale": pd.Series(dtype="float64"),
            "class": pd.Series(dtype="int64"),
            "mean_probability": pd.Series(dtype="float64"),
        }
    )


def object_features(
    labels: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0),
    probability: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    label_ids: Iterable[int] | None = None,
) -> pd.DataFrame:
    """One row of morphology features per object of a 2-D label image.

    Args:
        labels: ``(H, W)`` integer label image, 0 = background.
        spacing: Physical pixel size ``(dy, dx)``; ``area = area_px * dy * dx``.
        probability: Optional ``(H, W)`` probability map; ``mean_probability`` is its mean inside
            each object (NaN without a map).
        classes: Optional ``(H, W)`` class-id map; ``class`` is the majority non-background class
            inside each object (1 without a map).
        label_ids: Only compute these ids (ids absent from ``labels`` are not returned). Work is
            proportional to the touched objects plus one pass over the image.

    Returns:
        DataFrame with columns :data:`FEATURE_COLUMNS` (``index`` = label id, as napari's features
        table expects), one row per label id, sorted by label id, with a default RangeIndex.
    """
    import pandas as pd

    lab = _check_labels(labels)
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing must be two positive numbers (dy, dx), got {tuple(spacing)}.")
    prob = _check_aux(probability, lab.shape, "probability")
    cls = _check_aux(classes, lab.shape, "classes")
    if cls is not None and not (np.issubdtype(cls.dtype, np.integer) or cls.dtype == bool):
        raise TypeError(f"classes must be an integer class-id map, got dtype {cls.dtype}.")

    slices = _object_slices(lab, label_ids)
    if not slices:
        return empty_features()
    pixel_area = spacing_t[0] * spacing_t[1]
    image_area = float(lab.size)
    rows: list[tuple] = []
    for lid in sorted(slices):
        sl = slices[lid]
        crop = lab[sl] == lid
        area, comp, tub, irr = _crop_descriptors(crop)
        mean_p = float(prob[sl][crop].mean()) if prob is not None else float("nan")
        klass = _majority_class(cls[sl][crop]) if cls is not None else 1
        rows.append(
            (
                lid,
                lid,
                int(area),
                area * pixel_area,
                comp,
                tub,
                irr,
                area / image_area,
                klass,
                mean_p,
            )
        )
    df = pd.DataFrame.from_records(rows, columns=list(FEATURE_COLUMNS))
    ids = _id_dtype(max(slices)).name  # uint64 ids above 2**63 must not wrap to negatives
    return df.astype({"index": ids, "label": ids, "area_px": "int64", "class": "int64"})


def _id_dtype(max_id: int) -> np.dtype:
    """int64 for label ids (napari's convention), uint64 for ids beyond its range."""
    return np.dtype(np.uint64 if max_id > np.iinfo(np.int64).max else np.int64)


def _concat_ids(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate feature tables, keeping uint64 ids exact (int64 + uint64 would give floats)."""
    import pandas as pd

    if any(p["label"].dtype == np.uint64 for p in parts):
        parts = [p.astype({"index": "uint64", "label": "uint64"}) for p in parts]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].copy()


def update_features(
    df: pd.DataFrame | None,
    labels: np.ndarray,
    touched_ids: Iterable[int],
    **kwargs: Any,
) -> pd.DataFrame:
    """Refresh a features table after an edit that touched ``touched_ids``.

    Rows of touched ids are recomputed (or dropped when the id vanished from ``labels``), new
    ids among ``touched_ids`` are added, untouched rows are kept as they are, and the result is
    sorted by label id. Equivalent to ``object_features(labels, **kwargs)`` when every changed id
    is listed in ``touched_ids`` (``scale`` of untouched rows stays valid because the image size
    does not change with an edit).

    Args:
        df: Table from :func:`object_features` (``None`` or empty: start from scratch).
        labels: The edited ``(H, W)`` label image.
        touched_ids: Label ids whose pixels changed (painted over, erased, or new).
        **kwargs: ``spacing``, ``probability``, ``classes`` as in :func:`object_features`.
    """

    unknown = set(kwargs) - {"spacing", "probability", "classes"}
    if unknown:
        raise TypeError(f"update_features got unexpected keyword(s) {sorted(unknown)}.")
    touched = {int(i) for i in touched_ids if int(i) > 0}
    fresh = object_features(labels, label_ids=touched, **kwargs)
    if df is None or len(df) == 0:
        base = empty_features()
    else:
        missing = set(FEATURE_COLUMNS) - set(df.columns)
        if missing:
            raise ValueError(f"df is not a features table: missing columns {sorted(missing)}.")
        base = df[~df["label"].isin(touched)]
    parts = [p for p in (base, fresh) if len(p)]
    if not parts:
        return empty_features()
    out = _concat_ids(parts)
    out = out.sort_values("label", kind="stable").reset_index(drop=True)
    return out[list(FEATURE_COLUMNS)]


def update_stack_features(
    df: pd.DataFrame | None,
    labels: np.ndarray,
    touched_ids: Iterable[int],
    planes: Iterable[tuple[int, ...]],
    lead_names: Sequence[str],
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`update_features` for a stack whose every label id lives in one 2-D plane.

    That is how the inference engine labels stacks and time series (ids unique across planes,
    one row per id with the plane's index in the ``lead_names`` columns, e.g. ``z``). Rows of
    ``touched_ids`` are recomputed from the edited ``planes`` only (so a paint stroke costs one
    plane, not the stack); touched ids no longer found there are dropped. Should the user have
    given an id pixels in several edited planes, the plane where it is largest is kept.

    Args:
        df: The stack's features table (``None`` or empty: start from scratch).
        labels: The edited ``(..., H, W)`` label stack.
        touched_ids: Label ids whose pixels changed.
        planes: Leading indices (one tuple of ``labels.ndim - 2`` ints each) of the edited planes.
        lead_names: Feature-table column per leading axis, e.g. ``("z",)`` or ``("t", "z")``.
        **kwargs: ``spacing`` (of ``(Y, X)``) and ``classes`` as in :func:`object_features`.
    """
    import pandas as pd

    labels = np.asarray(labels)
    n_lead = labels.ndim - 2
    if n_lead < 1 or len(lead_names) != n_lead:
        raise ValueError(
            f"labels of shape {labels.shape} need {max(n_lead, 0)} lead name(s), got "
            f"{tuple(lead_names)}; use update_features for 2-D labels."
        )
    touched = {int(i) for i in touched_ids if int(i) > 0}
    fresh = []
    for plane in sorted({tuple(int(i) for i in p) for p in planes}):
        if len(plane) != n_lead:
            raise ValueError(
                f"plane index {plane} needs {n_lead} entries for shape {labels.shape}."
            )
        img = labels[plane]
        present = touched & {int(v) for v in np.unique(img)}
        if not present:
            continue
        part = object_features(img, label_ids=present, **kwargs)
        for name, i in zip(lead_names, plane, strict=True):
            part[name] = i
        fresh.append(part)
    columns = [*FEATURE_COLUMNS, *lead_names]
    if df is None or len(df) == 0:
        base = empty_features()
        for name in lead_names:
            base[name] = pd.Series(dtype="int64")
    else:
        missing = set(columns) - set(df.columns)
        if missing:
            raise ValueError(
                f"df is not a stack features table: missing columns {sorted(missing)}."
            )
        base = df[~df["label"].isin(touched)]
    if fresh:
        new = _concat_ids(fresh)
        new = new.sort_values("area_px", ascending=False, kind="stable")
        fresh = [new.drop_duplicates("label")]
    parts = [p for p in (base, *fresh) if len(p)]
    if not parts:
        return base[columns].reset_index(drop=True)
    out = _concat_ids(parts)
    out = out.sort_values("label", kind="stable").reset_index(drop=True)
    return out[columns]
