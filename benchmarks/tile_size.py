"""Accuracy and time of the bundled model against the inference tile size and overlap.

Usage::

    python -m benchmarks.tile_size                   # CPU, about 2 minutes on one thread
    python -m benchmarks.tile_size --tiles 224 512 --overlaps 0.125

Why: S2M-Net's spectral branch keeps a fixed K x K block of the lowest frequencies of each
feature map, so the same nucleus falls on different learned frequencies when the input size
changes. A model trained on 224-px crops may therefore segment a 512-px tile worse than 224-px
tiles of the same image. This script measures it: the bundled default model
(:func:`napari_s2mnet.checkpoint.load_default_model`, trained on 224-px crops) segments

* the held-out images of ``benchmarks/train_default.py`` (DSB2018 quadrant 3, 256^2, and the
  four held-out BBBC007 images, 400^2), and
* the whole 512^2 DSB2018 image (its quadrants 0-2 were training data: this row shows the size
  effect, not generalisation),

with every tile size x overlap; foreground Dice of ``labels > 0`` against the ground truth and
the CPU seconds of the run. A tile larger than the image shrinks to the image (rounded up to the
network stride), so e.g. tile 512 on a 400^2 image is one 416-px tile.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from benchmarks.fetch_data import load_dsb2018
from benchmarks.train_default import dice, splits


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    from napari_s2mnet.checkpoint import load_default_model
    from napari_s2mnet.inference import InferenceConfig, segment

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[128, 160, 224, 256, 320, 384, 512])
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.125, 0.25])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = load_default_model("cpu")
    held_out = splits()["test"]
    whole = load_dsb2018()
    print(
        f"# tile size benchmark: torch {torch.__version__}, cpu, threads {args.threads}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"# model {bundle.name!r}: trained on {bundle.trained_tile_size}-px crops, stride "
        f"{bundle.model.stride}; held-out: {', '.join(n for *_, n in held_out)}"
    )
    print()
    print(
        "| tile | overlap | held-out Dice (mean) | DSB2018 q3 | BBBC007 held-out mean | "
        "whole DSB2018 512^2 | CPU s (all images) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for tile in args.tiles:
        for overlap in args.overlaps:
            cfg = InferenceConfig(
                device="cpu", tile_size=tile, overlap=overlap, compute_features=False
            )
            cpu0 = time.process_time()
            scores = {name: dice(segment(img, bundle, cfg)[0], gt) for img, gt, name in held_out}
            whole_dice = dice(segment(whole[0], bundle, cfg)[0], whole[1])
            cpu = time.process_time() - cpu0
            bbbc = [v for k, v in scores.items() if k.startswith("bbbc007/")]
            print(
                f"| {tile} | {overlap:g} | {statistics.fmean(scores.values()):.3f} | "
                f"{scores['dsb2018/q3']:.3f} | {np.mean(bbbc):.3f} | {whole_dice:.3f} | "
                f"{cpu:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
