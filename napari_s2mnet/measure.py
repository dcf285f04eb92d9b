"""The features table a user reads: units in the column names, position, size and intensity.

The morphology modules compute the shape descriptors (:func:`napari_s2mnet.morphology.
object_features`, :func:`napari_s2mnet.morphology3d.object_features_3d`) with generic names;
:func:`measurement_table` turns such a table into the one shown in napari and written to CSV:

- ``area`` -> ``area_um2`` (the unit from the layer; no physical column without a pixel size),
  ``volume`` -> ``volume_um3``, ``surface_area`` -> ``surface_area_um2``;
- ``scale`` (object area / image area) -> ``area_fraction``, ``scale_3d`` -> ``volume_fraction``;
- centroid per axis (physical: ``centroid_y_um``; else ``centroid_y_px``), bounding box in
  pixels (``bbox_y0`` inclusive ... ``bbox_y1`` exclusive), and with an intensity image the
  ``mean_intensity``, ``max_intensity`` and ``integrated_intensity`` (sum over the object).

``index`` stays (napari's status bar finds a label's row through it); ``label`` is the id.
Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_UNIT_SUFFIX = {
    "micrometer": "um",
    "micron": "um",
    "µm": "um",
    "μm": "um",
    "um": "um",
    "nanometer": "nm",
    "nm": "nm",
    "millimeter": "mm",
    "mm": "mm",
    "centimeter": "cm",
    "cm": "cm",
    "meter": "m",
    "m": "m",
}
_NO_UNIT = {"", "pixel", "pixels", "px", "none"}
RENAMED = {"scale": "area_fraction", "scale_3d": "volume_fraction"}


def unit_suffix(unit: Any, spacing: Sequence[float] = ()) -> str | None:
    """Column suffix for ``unit`` (``"um"`` for micrometres); ``None`` when sizes are in pixels.

    A pixel size other than 1 without a unit gives ``"units"`` (the layer's scale is physical,
    its unit unknown).
    """
    text = "" if unit is None else str(unit).strip().lower()
    if text not in _NO_UNIT:
        return _UNIT_SUFFIX.get(text, re.sub(r"[^0-9a-z]+", "", text) or "units")
    if any(abs(float(s) - 1.0) > 1e-12 for s in spacing):
        return "units"
    return None


def measurement_table(
    features: pd.DataFrame,
    labels: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    unit: Any = None,
    image: np.ndarray | None = None,
) -> pd.DataFrame:
    """The user-facing table for ``features`` of ``labels`` (see the module docstring).

    Args:
        features: A table with ``label`` (and usually ``index``) per object, as the morphology
            functions or the inference engine return it. Rows whose id is absent from
            ``labels`` keep NaN position columns.
        labels: The label image ``(..., Y, X)`` the table describes.
        spacing: Pixel size per axis of ``labels`` (napari's ``layer.scale``), or of its last
            axes; missing leading entries are 1.
        unit: The layer's spatial unit (``"micrometer"``, ``"µm"``, ``"pixel"``, ...).
        image: Intensity image with the shape of ``labels`` (e.g. the gray source image), or
            ``None`` for no intensity columns.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    nd = labels.ndim
    sp = [1.0] * nd
    if spacing is not None:
        given = [float(s) for s in spacing][-nd:]
        sp[nd - len(given) :] = given
    suffix = unit_suffix(unit, sp[-2:] if "volume" not in features else sp[-3:])
    df = features.copy()
    df = df.rename(columns={k: v for k, v in RENAMED.items() if k in df.columns})
    physical = {"area": 2, "volume": 3, "surface_area": 2}
    for name, power in physical.items():
        if name in df.columns:
            if suffix is None:
                df = df.drop(columns=name)  # equals area_px / volume_vox: one column is enough
            else:
                df = df.rename(columns={name: f"{name}_{suffix}{power}"})

    ids = df["label"].to_numpy(dtype=np.int64) if len(df) else np.zeros(0, np.int64)
    axes = _axis_names(df, nd)
    new: dict[str, np.ndarray] = {}
    if len(ids):
        present = np.isin(ids, np.unique(labels))
        ids_in = ids[present]
        com = np.full((len(ids), nd), np.nan)
        if len(ids_in):
            com[present] = np.asarray(
                ndi.center_of_mass(np.ones(labels.shape, np.uint8), labels, ids_in), dtype=float
            ).reshape(-1, nd)
        for ax, name in enumerate(axes):
            if name == "t":
                continue  # a time point, not a position
            scale = sp[ax] if suffix is not None else 1.0
            new[f"centroid_{name}_{suffix or 'px'}"] = com[:, ax] * scale
        boxes = ndi.find_objects(labels, max_label=int(ids.max()) if len(ids) else 0)
        spatial = [ax for ax, name in enumerate(axes) if name != "t"]
        for ax in spatial:
            lo = np.full(len(ids), -1, np.int64)
            hi = np.full(len(ids), -1, np.int64)
            for i, lid in enumerate(ids):
                box = boxes[lid - 1] if 0 < lid <= len(boxes) else None
                if box is not None:
                    lo[i], hi[i] = box[ax].start, box[ax].stop
            new[f"bbox_{axes[ax]}0"], new[f"bbox_{axes[ax]}1"] = lo, hi
        if image is not None:
            img = np.asarray(image, dtype=np.float64)
            if img.shape != labels.shape:
                raise ValueError(
                    f"image of shape {img.shape} must have the labels' shape "
                    f"{labels.shape} for the intensity columns."
                )
            for col, fn in (
                ("mean_intensity", ndi.mean),
                ("max_intensity", ndi.maximum),
                ("integrated_intensity", ndi.sum),
            ):
                vals = np.full(len(ids), np.nan)
                if len(ids_in):
                    vals[present] = np.asarray(fn(img, labels, ids_in), dtype=float)
                new[col] = vals
    else:
        for name in axes:
            if name != "t":
                new[f"centroid_{name}_{suffix or 'px'}"] = np.zeros(0)
        if image is not None:
            for col in ("mean_intensity", "max_intensity", "integrated_intensity"):
                new[col] = np.zeros(0)
    cols = list(df.columns)
    sizes = [
        i
        for i, c in enumerate(cols)
        if re.match(r"(area|volume|surface_area)_", c) and c not in RENAMED.values()
    ]
    pos = max(sizes) + 1 if sizes else cols.index("label") + 1
    head, tail = list(df.columns[:pos]), list(df.columns[pos:])
    import pandas as pd

    extra = pd.DataFrame(new, index=df.index)
    out = pd.concat(
        [
            df[head],
            extra[[c for c in extra.columns if "intensity" not in c]],
            df[tail],
            extra[[c for c in extra.columns if "intensity" in c]],
        ],
        axis=1,
    )
    return out.reset_index(drop=True)


def _axis_names(features: pd.DataFrame, nd: int) -> list[str]:
    """Names of the labels' axes: the table's lead columns (``t``, ``z``) or ``z`` for volumes."""
    lead = [c for c in ("t", "z") if c in features.columns]
    names = ["y", "x"]
    if nd - 2 == len(lead):
        return [*lead, *names][-nd:] if nd > 2 else names
    default = ["t", "z", "y", "x"] if nd == 4 else ["z", "y", "x"]
    return default[-nd:]
