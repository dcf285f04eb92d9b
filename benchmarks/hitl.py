"""Human-in-the-loop simulation: fine-tune the bundled model on k corrected images of unseen data.

Usage::

    python -m benchmarks.hitl --quick              # 30 s per fine-tune, CPU, ~4 min
    python -m benchmarks.hitl --seconds 120 --lrs 1e-4 3e-4
    python -m benchmarks.hitl --n-seeds 3          # mean +- std over 3 seeds

Protocol:

* model: the bundled default S2M-Net (:func:`napari_s2mnet.checkpoint.load_default_model`),
  trained on BBBC007 images 0-9 and DSB2018 quadrants 0-2 only;
* data it never saw: the 3-D nuclei stack of :func:`benchmarks.fetch_data.load_nuclei3d`
  (31 x 61 x 57, instance masks), used as 2-D slices; only slices with at least 3 objects count;
  slices of the first half of the stack (z < 31 // 2) are the annotation pool, slices of the
  second half are the test set (disjoint, never used for training or model selection);
* simulated annotator: for k = 1, 2, 5 the annotator "corrects" the model's output on k pool
  slices spread evenly over the pool (``np.linspace``); the correction is the ground truth, so the
  fine-tuning pairs are (slice, ground truth);
* fine-tuning: :func:`napari_s2mnet.training.train` from the default model for a fixed wall-clock
  budget per k (``--seconds``), every learning rate in ``--lrs`` (1e-4 is the paper's; 3e-4 is
  tried too because 1e-4 barely moves the model in a 30 s budget), crops of 64 px (the slices are
  61 x 57 and are padded), batch 4, MASL, no validation split (``val_fraction=0``: the last state is
  used);
* evaluation: :func:`napari_s2mnet.inference.segment` with 64-px tiles on every test slice;
  foreground Dice of ``labels > 0`` vs ``gt > 0``, mean over the test slices. k = 0 is the default
  model without fine-tuning (zero-shot).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.fetch_data import load_nuclei3d
from benchmarks.train_default import dice

MIN_OBJECTS = 3
TILE = 64


def slice_split(masks: np.ndarray, min_objects: int = MIN_OBJECTS) -> tuple[list[int], list[int]]:
    """Indices of the annotation pool (first half) and test slices (second half) of a stack.

    Only slices with at least ``min_objects`` labelled objects are kept.
    """
    if masks.ndim != 3:
        raise ValueError(f"Expected a (Z, Y, X) label stack, got shape {masks.shape}.")
    half = masks.shape[0] // 2
    ok = [z for z in range(masks.shape[0]) if len(np.unique(masks[z][masks[z] > 0])) >= min_objects]
    return [z for z in ok if z < half], [z for z in ok if z >= half]


def pick_spread(pool: list[int], k: int) -> list[int]:
    """``k`` indices of ``pool`` spread evenly from its first to its last element."""
    if not 1 <= k <= len(pool):
        raise ValueError(f"k must be in 1..{len(pool)} (annotation pool size), got {k}.")
    return [pool[i] for i in np.linspace(0, len(pool) - 1, k).round().astype(int)]


def evaluate(
    bundle: Any, image: np.ndarray, masks: np.ndarray, test: list[int], device: str
) -> float:
    """Mean foreground Dice over the test slices."""
    from napari_s2mnet.inference import InferenceConfig, segment

    cfg = InferenceConfig(tile_size=TILE, device=device, compute_features=False)
    return statistics.fmean(dice(segment(image[z], bundle, cfg)[0], masks[z]) for z in test)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    from napari_s2mnet.checkpoint import load_default_model
    from napari_s2mnet.training import FinetuneConfig, train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="30 s per fine-tune")
    p.add_argument("--seconds", type=float, default=None, help="budget per k (default 60)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--n-seeds", type=int, default=1, help="seeds seed .. seed+n-1 per k")
    p.add_argument("--crop-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--loss", default="masl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.seconds = args.seconds or (30.0 if args.quick else 60.0)

    image, masks = load_nuclei3d()
    pool, test = slice_split(masks)
    base = load_default_model(args.device)
    base.model.eval()
    print(
        f"# HITL simulation: torch {torch.__version__}, {args.device}, threads {args.threads}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"# nuclei3d {image.shape}: annotation pool z={pool}, test z={test} "
        f"({len(test)} slices); {args.seconds:g} s per fine-tune, crop {args.crop_size}, batch "
        f"{args.batch_size}, loss {args.loss}, seeds {args.seed}..{args.seed + args.n_seeds - 1}"
    )

    t0 = time.perf_counter()
    zero = evaluate(base, image, masks, test, args.device)
    zero_wall = time.perf_counter() - t0
    print(f"# k=0 (zero-shot): Dice {zero:.3f}", flush=True)
    seeds = list(range(args.seed, args.seed + args.n_seeds))
    # (k, lr) -> per-seed (Dice, fine-tune seconds, steps, wall seconds incl. evaluation)
    runs: dict[tuple[int, float], list[tuple[float, float, int, float]]] = {}
    for lr in args.lrs:
        for k in args.ks:
            chosen = pick_spread(pool, k)
            pairs = [(image[z], masks[z]) for z in chosen]
            for seed in seeds:
                cfg = FinetuneConfig(
                    seconds=args.seconds,
                    lr=lr,
                    batch_size=args.batch_size,
                    crop_size=args.crop_size,
                    seed=seed,
                    device=args.device,
                    val_fraction=0.0,
                    patience=None,
                    loss=args.loss,
                )
                t0 = time.perf_counter()
                result = train(pairs, base, cfg, names=[f"nuclei3d/z{z}" for z in chosen])
                result.bundle.model.eval()
                score = evaluate(result.bundle, image, masks, test, args.device)
                wall = time.perf_counter() - t0
                runs.setdefault((k, lr), []).append((score, result.elapsed, result.steps, wall))
                print(
                    f"# k={k} lr={lr:g} seed {seed} slices {chosen}: Dice {score:.3f} "
                    f"({result.steps} steps, {result.elapsed:.0f} s, {result.stopped_reason})",
                    flush=True,
                )

    print()
    print(
        "| k | lr | annotated slices (z) | held-out Dice | vs k=0 | fine-tune s | steps | "
        "wall s (incl. eval) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    print(f"| 0 | - | - | {zero:.3f} | +0.000 | 0 | 0 | {zero_wall:.0f} |")
    for (k, lr), rs in runs.items():
        dices = [r[0] for r in rs]
        mean = statistics.fmean(dices)
        std = f" +- {statistics.stdev(dices):.3f}" if len(dices) > 1 else ""
        zs = ",".join(map(str, pick_spread(pool, k)))
        print(
            f"| {k} | {lr:g} | {zs} | {mean:.3f}{std} | {mean - zero:+.3f} | "
            f"{statistics.fmean(r[1] for r in rs):.0f} | "
            f"{statistics.fmean(r[2] for r in rs):.0f} | "
            f"{statistics.fmean(r[3] for r in rs):.0f} |"
        )
    print(f"\n# mean +- std over seeds {seeds} (crop sampling, augmentation, batch order)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
