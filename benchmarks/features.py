"""Feature refresh after a paint stroke: touched labels only vs the whole table, in one run.

Usage::

    python -m benchmarks.features                 # about 30 s on one CPU core
    python -m benchmarks.features --objects 5000

Labels: the DSB2018 manual instance masks mirrored and tiled to hold at least ``--objects``
objects (real nucleus shapes). A "stroke" paints a 15 x 15 brush square at a random place with
the id of an object near it (merging / growing, as a correction does) and touches 1-4 ids. For
each stroke it times :func:`napari_s2mnet.morphology.update_features` on the touched ids (what
the plugin runs after a stroke, debounced) against the baseline
:func:`~napari_s2mnet.morphology.object_features` over all objects, and checks both tables are
equal. The same for a stack (:func:`~napari_s2mnet.morphology.update_stack_features`, one plane
edited). Goal from the issue: < 0.5 s per refresh with 1000 objects.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import numpy as np

from benchmarks.fetch_data import load_dsb2018

GOAL_S = 0.5


def tiled_labels(min_objects: int) -> np.ndarray:
    """DSB2018 instance masks, mirrored and tiled, relabelled so every copy has its own ids."""
    from skimage.segmentation import relabel_sequential

    lab = load_dsb2018()[1].astype(np.int64)
    per_tile = len(np.unique(lab)) - 1
    reps = max(1, math.ceil(math.sqrt(min_objects / per_tile)))
    rows = []
    offset = 0
    for r in range(reps):
        row = []
        for c in range(reps):
            t = lab[:: (-1) ** r, :: (-1) ** c]
            row.append(np.where(t > 0, t + offset, 0))
            offset += int(lab.max())
        rows.append(np.concatenate(row, axis=1))
    return relabel_sequential(np.concatenate(rows, axis=0))[0].astype(np.uint32)


def strokes(labels: np.ndarray, n: int, seed: int) -> list[tuple[slice, slice, int]]:
    """``n`` brush squares, each painted with the id found at its centre's neighbourhood."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        y, x = rng.integers(8, np.array(labels.shape) - 8)
        ids = labels[y - 8 : y + 8, x - 8 : x + 8]
        ids = ids[ids > 0]
        if ids.size:
            out.append((slice(y - 7, y + 8), slice(x - 7, x + 8), int(ids[0])))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import pandas as pd

    from napari_s2mnet.morphology import object_features, update_features, update_stack_features

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objects", type=int, default=1000, help="at least this many objects")
    p.add_argument("--strokes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    labels = tiled_labels(args.objects)
    n_obj = int(labels.max())
    print(
        f"# feature refresh: {platform.processor() or platform.machine()}, labels "
        f"{labels.shape} {labels.dtype}, {n_obj} objects, {args.strokes} strokes of 15 x 15 px"
    )
    spacing = (0.5, 0.5)
    df = object_features(labels, spacing=spacing)
    t_update, t_full, touched_n = [], [], []
    for ys, xs, value in strokes(labels, args.strokes, args.seed):
        before = labels[ys, xs].copy()
        labels[ys, xs] = value
        touched = set(np.unique(before).tolist()) | {value}
        touched.discard(0)
        t0 = time.perf_counter()
        df = update_features(df, labels, touched, spacing=spacing)
        t_update.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        full = object_features(labels, spacing=spacing)
        t_full.append(time.perf_counter() - t0)
        pd.testing.assert_frame_equal(df, full)
        touched_n.append(len(touched))

    # The same edits on plane 1 of a 3-plane stack with ids unique across planes.
    stack = np.stack(
        [
            labels,
            np.where(labels > 0, labels + n_obj, 0),
            np.where(labels > 0, labels + 2 * n_obj, 0),
        ]
    ).astype(np.uint32)
    parts = []
    for z in range(3):
        part = object_features(stack[z], spacing=spacing)
        part["z"] = z
        parts.append(part)
    sdf = pd.concat(parts, ignore_index=True)
    t_stack = []
    for ys, xs, value in strokes(stack[1], args.strokes, args.seed + 1):
        before = stack[1, ys, xs].copy()
        stack[1, ys, xs] = value
        touched = set(np.unique(before).tolist()) | {value}
        touched.discard(0)
        t0 = time.perf_counter()
        sdf = update_stack_features(sdf, stack, touched, [(1,)], ("z",), spacing=spacing)
        t_stack.append(time.perf_counter() - t0)
    check = object_features(stack[1], spacing=spacing)
    pd.testing.assert_frame_equal(
        sdf[sdf["z"] == 1].drop(columns="z").reset_index(drop=True), check, check_dtype=False
    )

    med_u, med_f, med_s = (statistics.median(t) for t in (t_update, t_full, t_stack))
    print()
    print("| refresh | objects | touched ids / stroke | median s | max s | vs full recompute |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| `update_features` (2-D, touched ids) | {n_obj} | "
        f"{statistics.fmean(touched_n):.1f} | {med_u:.4f} | {max(t_update):.4f} | "
        f"{med_u / med_f:.3f} |"
    )
    print(
        f"| `object_features` (2-D, all objects; baseline) | {n_obj} | - | {med_f:.4f} | "
        f"{max(t_full):.4f} | 1.000 |"
    )
    print(
        f"| `update_stack_features` (3 planes, one edited) | {3 * n_obj} | - | {med_s:.4f} | "
        f"{max(t_stack):.4f} | {med_s / med_f:.3f} |"
    )
    worst = max(max(t_update), max(t_stack))
    print(
        f"\n# worst refresh {worst:.3f} s (goal < {GOAL_S} s: "
        f"{'OK' if worst < GOAL_S else 'MISSED'}); tables equal to a full recompute"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
