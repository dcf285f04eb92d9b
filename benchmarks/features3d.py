"""Time of the 3-D features table, with the hull counted by scikit-image and line by line.

Usage::

    python -m benchmarks.features3d [--objects 900] [--shape 48 384 384] [--reps 2]

A synthetic ``(Z, Y, X)`` label volume of touching nuclei-like objects (a watershed of random
seeds, spacing 2 x 1 x 1, radius ~9 px) goes through
:func:`napari_s2mnet.morphology3d.object_features_3d` twice per repetition in one process: with
the irregularity's hull counted by ``skimage.morphology.convex_hull_image`` (the baseline) and
with :func:`napari_s2mnet.morphology3d._hull_voxels` (facet planes, line by line). Prints the
fastest time of each and the ratio, and checks that both tables are identical.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def volume(n_objects: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Touching nuclei-like objects: a watershed of ``n_objects`` random seeds."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    rng = np.random.default_rng(seed)
    pts = np.stack([rng.integers(0, s, n_objects) for s in shape], axis=1)
    markers = np.zeros(shape, dtype=np.int32)
    markers[tuple(pts.T)] = np.arange(1, n_objects + 1)
    dist = ndi.distance_transform_edt(markers == 0, sampling=(2, 1, 1))
    return watershed(dist, markers, mask=dist < 9)


def _skimage_hull(m: np.ndarray) -> float:
    from skimage.morphology import convex_hull_image

    n = int(np.count_nonzero(m))
    coords = np.argwhere(m)
    if n <= 3 or np.linalg.matrix_rank(coords - coords[0]) < 3:
        return float(n)
    return float(np.count_nonzero(convex_hull_image(m, offset_coordinates=False)))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from napari_s2mnet import morphology3d

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objects", type=int, default=900)
    p.add_argument("--shape", type=int, nargs=3, default=[48, 384, 384])
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    lab = volume(args.objects, tuple(args.shape))
    morphology3d.object_features_3d(lab[:8, :64, :64], spacing=(2, 1, 1))  # imports, warm-up
    fast = morphology3d._hull_voxels
    times: dict[str, float] = {}
    tables = {}
    for _ in range(args.reps):
        for name, hull in (("scikit-image hull", _skimage_hull), ("line by line", fast)):
            morphology3d._hull_voxels = hull
            t0 = time.perf_counter()
            tables[name] = morphology3d.object_features_3d(lab, spacing=(2, 1, 1))
            times[name] = min(times.get(name, np.inf), time.perf_counter() - t0)
    morphology3d._hull_voxels = fast
    same = tables["scikit-image hull"].equals(tables["line by line"])
    print(f"# features3d: {lab.max()} objects in {tuple(args.shape)}, {time.strftime('%F %H:%M')}")
    print("| hull | features s | / baseline |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {t / times['scikit-image hull']:.2f} |")
    print(f"identical tables: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
