"""Accuracy: S2M-Net (MASL, Dice/BCE, MASL+SCC) vs a U-Net and DSSAU-Net on the same splits and budget.

Usage::

    python -m benchmarks.accuracy --quick          # fold 3 only, 60 s per run (~6 min on a CPU)
    python -m benchmarks.accuracy                  # all 4 folds, 120 s per run
    python -m benchmarks.accuracy --folds 0 3 --seeds 0 1 --seconds 300 --device cuda

Protocol (identical for every model):

* data: the DSB2018 nuclei image (manual instance masks) split into four 256 x 256 quadrants
  (:func:`benchmarks.fetch_data.dsb2018_quadrants`); fold ``f`` trains on the three other
  quadrants and tests on quadrant ``f``, which it never sees (``val_fraction=0``: no model
  selection on it either; the last state of the run is evaluated);
* models, all from a random initialisation (``torch.manual_seed(seed)``) with 1 input channel:
  S2M-Net + MASL, S2M-Net + Dice/BCE, S2M-Net + MASL + SCC, the U-Net baseline of equal
  parameters + Dice/BCE and DSSAU-Net (``tiny`` preset) + Dice/BCE; S2M-Net and the U-Net use
  BatchNorm momentum 0.1 (DSSAU-Net has no such option and keeps PyTorch's 0.1 default);
  a segmentation-models-pytorch U-Net is added only when that package is importable;
* training: :func:`napari_s2mnet.training.train` with a fixed wall-clock budget per run
  (``--seconds``), Adam with warm-up + cosine decay, lr 1e-3, batch 4, crops of ``--crop-size``
  pixels with augmentation, no early stopping;
* evaluation: :func:`napari_s2mnet.inference.segment` (default post-processing, CPU or the chosen
  device) on the held-out quadrant; foreground Dice and IoU of ``labels > 0`` vs ``gt > 0``, and
  boundary F1: boundary pixels of the prediction and of the ground truth (mask minus its 3x3
  erosion) matched within a 2-pixel tolerance via a Euclidean distance transform.

The runs of a fold are sequential, so background load on a shared machine changes the steps a
run achieves in its budget; the table reports the steps and the training time alongside the
scores. Mean +- standard deviation are over folds x seeds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from benchmarks.fetch_data import dsb2018_quadrants


@dataclass(frozen=True)
class Variant:
    """One model + loss combination of the comparison."""

    label: str
    arch: str
    loss: str
    options: dict[str, Any] = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("S2M-Net + MASL", "s2mnet", "masl", {"bn_momentum": 0.1}),
    Variant("S2M-Net + Dice/BCE", "s2mnet", "dicebce", {"bn_momentum": 0.1}),
    Variant("S2M-Net + MASL + SCC", "s2mnet", "masl+scc", {"bn_momentum": 0.1}),
    Variant("U-Net (equal params) + Dice/BCE", "unet", "dicebce", {"bn_momentum": 0.1}),
    Variant("DSSAU-Net tiny + Dice/BCE", "dssau", "dicebce", {"preset": "tiny"}),
)
BOUNDARY_TOLERANCE = 2.0


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Foreground Dice and IoU of ``pred > 0`` vs ``gt > 0`` (1.0 when both are empty)."""
    p, g = pred > 0, gt > 0
    inter = float((p & g).sum())
    total = float(p.sum() + g.sum())
    union = float((p | g).sum())
    return (2.0 * inter / total if total else 1.0), (inter / union if union else 1.0)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary pixels of a binary mask (pixels whose 3x3 neighbourhood leaves the mask)."""
    return mask & ~ndi.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def boundary_f1(pred: np.ndarray, gt: np.ndarray, tol: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary F1: boundary pixels of ``pred > 0`` and ``gt > 0`` matched within ``tol`` px."""
    bp, bg = _boundary(pred > 0), _boundary(gt > 0)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    # Distance of every pixel to the nearest boundary pixel of the other mask.
    dist_to_gt = ndi.distance_transform_edt(~bg)
    dist_to_pred = ndi.distance_transform_edt(~bp)
    precision = float((dist_to_gt[bp] <= tol).mean())
    recall = float((dist_to_pred[bg] <= tol).mean())
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def smp_status() -> str | None:
    """``None`` when segmentation-models-pytorch imports, else why not (never installed here)."""
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        return "not installed"
    except Exception as exc:  # e.g. a torchvision wheel built for another torch
        return f"installed but fails to import ({type(exc).__name__}: {exc})"
    return None


def run_one(variant: Variant, fold: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant on the three training quadrants of ``fold``, score the held-out one."""
    import torch

    from napari_s2mnet.checkpoint import new_model
    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.model import ModelConfig, count_parameters
    from napari_s2mnet.training import FinetuneConfig, train

    quads = dsb2018_quadrants()
    train_pairs = [q for i, q in enumerate(quads) if i != fold]
    test_img, test_gt = quads[fold]
    torch.manual_seed(seed)
    bundle = new_model(ModelConfig(arch=variant.arch, in_channels=1, num_classes=1,
                                   options=dict(variant.options)), name=variant.label)
    cfg = FinetuneConfig(seconds=args.seconds, lr=args.lr, batch_size=args.batch_size,
                         crop_size=args.crop_size, seed=seed, device=args.device,
                         val_fraction=0.0, patience=None, steps_per_epoch=25, loss=variant.loss)
    result = train(train_pairs, bundle, cfg, names=[f"dsb2018/q{i}" for i in range(4) if i != fold])
    trained = result.bundle
    trained.model.eval()
    t0 = time.perf_counter()
    labels, _ = segment(test_img, trained, InferenceConfig(device=args.device,
                                                           compute_features=False))
    infer_s = time.perf_counter() - t0
    d, iou = dice_iou(labels, test_gt)
    return {"dice": d, "iou": iou, "bf1": boundary_f1(labels, test_gt),
            "params": count_parameters(bundle.model), "seconds": result.elapsed,
            "steps": result.steps, "infer_s": infer_s, "stopped": result.stopped_reason}


def _ms(values: list[float], spec: str) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return format(mean, spec)
    return f"{format(mean, spec)} +- {format(statistics.stdev(values), spec)}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fold 3 only, 60 s per run, crop 128")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="held-out DSB2018 quadrants (default: 0 1 2 3; --quick: 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--n-seeds", type=int, default=1, help="seeds seed .. seed+n-1 per fold")
    p.add_argument("--seconds", type=float, default=None, help="budget per run (default 120)")
    p.add_argument("--crop-size", type=int, default=None, help="crop side (default 192; quick 128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--models", nargs="+", default=None,
                   help="subset of variants by index (0..4), e.g. --models 0 3")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.folds = args.folds or ([3] if args.quick else [0, 1, 2, 3])
    if any(f not in range(4) for f in args.folds):
        raise ValueError(f"--folds must be quadrant indices 0..3, got {args.folds}.")
    args.seconds = args.seconds or (60.0 if args.quick else 120.0)
    args.crop_size = args.crop_size or (128 if args.quick else 192)
    variants = list(VARIANTS)
    if args.models is not None:
        variants = [VARIANTS[i] for i in args.models]
    seeds = list(range(args.seed, args.seed + args.n_seeds))

    print(f"# accuracy benchmark: torch {torch.__version__}, {args.device}, threads "
          f"{args.threads}, {platform.processor() or platform.machine()}")
    print(f"# DSB2018 quadrant folds {args.folds} (train 3, test the held-out one), seeds {seeds}"
          f", {args.seconds:g} s per run, crop {args.crop_size}, batch {args.batch_size}, "
          f"lr {args.lr:g}, val_fraction 0, random init, 1 input channel")
    smp = smp_status()
    if smp is None:
        print("# segmentation-models-pytorch: importable, but no peer is wired in this script")
    else:
        print(f"# segmentation-models-pytorch peer: skipped: {smp}")

    runs: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
    for fold in args.folds:
        for seed in seeds:
            for v in variants:
                r = run_one(v, fold, seed, args)
                runs[v.label].append(r)
                print(f"# fold {fold} seed {seed} {v.label}: Dice {r['dice']:.3f} IoU "
                      f"{r['iou']:.3f} BF1 {r['bf1']:.3f} steps {r['steps']} "
                      f"({r['seconds']:.0f} s, {r['stopped']})", flush=True)

    print()
    print("| model | loss | params | held-out Dice | IoU | boundary F1 (2 px) | train s | steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        rs = runs[v.label]
        print(f"| {v.label} | {v.loss} | {rs[0]['params']:,} | "
              f"{_ms([r['dice'] for r in rs], '.3f')} | {_ms([r['iou'] for r in rs], '.3f')} | "
              f"{_ms([r['bf1'] for r in rs], '.3f')} | {_ms([r['seconds'] for r in rs], '.0f')} | "
              f"{_ms([float(r['steps']) for r in rs], '.0f')} |")
    print(f"\n# n = {len(args.folds) * len(seeds)} run(s) per model (folds x seeds); mean +- std")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
