"""Instance accuracy of ``segment()`` on a large image with ground truth (issue 18).

Usage::

    python -m benchmarks.tiled_accuracy --size 4096 [--backend auto] [--save labels.npy]

The image is :func:`benchmarks.inference.tiled_image` (DSB2018 mirrored and tiled, the image the
memory and scaling benchmarks segment); the ground truth is its manual mask tiled the same way,
with ids made unique per 512-px block. Prints one JSON line: object count, F1@0.5 and AP per
IoU threshold (:func:`napari_s2mnet.instances.match_scores`). Used to check that a memory change
in post-processing does not change what a large image's labels score.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def tiled_ground_truth(size: int) -> np.ndarray:
    """The DSB2018 manual mask tiled like :func:`benchmarks.inference.tiled_image`."""
    from skimage.segmentation import relabel_sequential

    from benchmarks.fetch_data import load_dsb2018

    gt = load_dsb2018()[1]
    block = np.block([[gt, gt[:, ::-1]], [gt[::-1], gt[::-1, ::-1]]])
    reps = math.ceil(size / block.shape[0])
    tiled = np.tile(block, (reps, reps))[:size, :size]
    out = np.zeros(tiled.shape, dtype=np.int64)
    offset = 0
    step = gt.shape[0]
    for y in range(0, size, step):  # mirrored copies repeat ids: make them unique per block
        for x in range(0, size, step):
            part = relabel_sequential(tiled[y : y + step, x : x + step].astype(np.int64))[0]
            out[y : y + step, x : x + step] = np.where(part > 0, part + offset, 0)
            offset += int(part.max())
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from benchmarks.inference import tiled_image
    from napari_s2mnet.inference import segment
    from napari_s2mnet.instances import match_scores

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--backend", default="auto")
    p.add_argument("--save", default=None, help="also save the labels (.npy)")
    args = p.parse_args(argv)
    truth = tiled_ground_truth(args.size)
    labels, _ = segment(tiled_image(args.size), None, device="cpu", backend=args.backend)
    if args.save:
        np.save(args.save, labels)
    scores = match_scores(labels, truth)
    ap = {str(k): round(float(v), 5) for k, v in scores["ap"].items()}
    print(
        json.dumps(
            {"size": args.size, "objects": int(labels.max()), "f1": scores["f1@0.5"], "ap": ap}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
