"""Writers contributed to napari (File > Save Selected Layers...) for labels layers.

Each writer hands the layer's data and physical pixel size to :mod:`napari_s2mnet.io`, so
File > Save and the Export widget write identical files.
"""

from __future__ import annotations

from typing import Any


def _spacing(meta: dict) -> tuple[float, ...] | None:
    scale = meta.get("scale")
    return tuple(float(s) for s in scale) if scale is not None else None


def _write(path: str, data: Any, meta: dict) -> list[str]:
    from napari_s2mnet.io import physical_unit, write_labels

    unit = physical_unit(meta.get("units"))
    return [str(write_labels(path, data, spacing=_spacing(meta), unit=unit))]


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Labels as a Fiji/ImageJ-readable TIFF with the pixel size in its metadata."""
    return _write(path, data, meta)


def write_labels_png(path: str, data: Any, meta: dict) -> list[str]:
    """2-D labels as a PNG (uint8/uint16, < 65536 labels)."""
    return _write(path, data, meta)


def write_labels_npy(path: str, data: Any, meta: dict) -> list[str]:
    """Labels as a NumPy ``.npy`` file."""
    return _write(path, data, meta)


def write_features_csv(path: str, data: Any, meta: dict) -> list[str]:
    """The layer's features table (one row per label) as CSV."""
    import pandas as pd

    from napari_s2mnet.io import write_features_csv as _write_csv

    features = meta.get("features")
    if features is None or len(features) == 0:
        raise ValueError(
            "This labels layer has no features to save. Segment with S2M-Net (or compute "
            "features in the S2M-Net Export widget) first."
        )
    return [str(_write_csv(pd.DataFrame(features), path))]
