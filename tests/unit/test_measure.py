"""The user-facing features table (issue 16): units in names, centroid, bbox, intensity."""

from __future__ import annotations

import numpy as np
import pytest

from napari_s2mnet.measure import measurement_table, unit_suffix
from napari_s2mnet.morphology import object_features


def _labels():
    lab = np.zeros((20, 30), np.uint16)
    lab[2:6, 3:9] = 1
    lab[10:15, 10:12] = 4
    return lab


def test_physical_columns_and_values():
    lab = _labels()
    img = np.arange(600.0).reshape(20, 30)
    t = measurement_table(
        object_features(lab, spacing=(0.5, 0.25)),
        lab,
        spacing=(0.5, 0.25),
        unit="micrometer",
        image=img,
    )
    cols = list(t.columns)
    assert cols[:4] == ["index", "label", "area_px", "area_um2"]
    assert "scale" not in cols and "area" not in cols and "area_fraction" in cols
    row = t.set_index("label").loc[4]
    assert row["area_um2"] == pytest.approx(10 * 0.125)
    assert row["centroid_y_um"] == pytest.approx(12.0 * 0.5)
    assert row["centroid_x_um"] == pytest.approx(10.5 * 0.25)
    assert (row["bbox_y0"], row["bbox_y1"], row["bbox_x0"], row["bbox_x1"]) == (10, 15, 10, 12)
    obj = img[lab == 4]
    assert row["mean_intensity"] == pytest.approx(obj.mean())
    assert row["max_intensity"] == obj.max()
    assert row["integrated_intensity"] == pytest.approx(obj.sum())
    assert row["area_fraction"] == pytest.approx(10 / lab.size)


def test_pixels_only_without_a_scale():
    lab = _labels()
    t = measurement_table(object_features(lab), lab, unit="pixel")
    assert "centroid_y_px" in t.columns and not any(
        c.startswith("area_") and c != "area_px" and c != "area_fraction" for c in t.columns
    )
    assert "mean_intensity" not in t.columns
    assert unit_suffix("µm") == "um" and unit_suffix(None, (2.0, 2.0)) == "units"
    assert unit_suffix("pixel", (1.0, 1.0)) is None


def test_stack_table_uses_the_plane_columns_and_empty_tables_work():
    stack = np.stack([_labels(), np.zeros((20, 30), np.uint16)])
    f = object_features(stack[0])
    f["z"] = 0
    t = measurement_table(f, stack, spacing=(2.0, 0.5, 0.5), unit="um")
    assert t.set_index("label").loc[1, "centroid_z_um"] == 0.0
    assert {"bbox_z0", "bbox_z1", "z"} <= set(t.columns)
    empty = measurement_table(object_features(np.zeros((8, 8), np.uint8)), np.zeros((8, 8)))
    assert len(empty) == 0 and "label" in empty.columns
    with pytest.raises(ValueError, match="labels' shape"):
        measurement_table(object_features(_labels()), _labels(), image=np.zeros((3, 3)))
