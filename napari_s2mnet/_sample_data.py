"""Sample data contributed to napari (File > Open Sample > S2M-Net)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLE_DIR = Path(__file__).resolve().parent / "resources" / "sample"


def load_nuclei() -> tuple:
    """The DSB2018 nuclei image (512 x 512 uint16) and its manual instance labels (125 nuclei).

    From the 2018 Data Science Bowl (BBBC038, Caicedo et al., Nat. Methods 2019) as shipped in the
    stardist package (BSD-3-Clause); see ``resources/sample/README.md``.
    """
    import tifffile

    image = tifffile.imread(SAMPLE_DIR / "dsb2018_nuclei.tif")
    labels = tifffile.imread(SAMPLE_DIR / "dsb2018_nuclei_labels.tif")
    return image, labels


def nuclei_sample() -> list[tuple[Any, dict, str]]:
    """napari sample-data hook: the image plus its manual labels as two layers."""
    image, labels = load_nuclei()
    return [
        (image, {"name": "nuclei", "colormap": "gray"}, "image"),
        (labels, {"name": "nuclei ground truth", "opacity": 0.5, "visible": False}, "labels"),
    ]
