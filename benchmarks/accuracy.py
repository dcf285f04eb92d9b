"""Accuracy: S2M-Net (MASL, Dice/BCE, MASL+SCC) vs a U-Net and DSSAU-Net on the same splits and budget.

Usage::

    python -m benchmarks.accuracy --quick          # fold 3 only, 60 s per run (~6 min on a CPU)
    python -m benchmarks.accuracy                  # all 4 folds, 120 s per run
    python -m benchmarks.accuracy --folds 0 3 --n-seeds 2 --seconds 300 --device cuda
    python -m benchmarks.accuracy --smp --cellpose      # with both peers (see below)
    python -m benchmarks.accuracy --cellpose --models   # only the Cellpose 3 peer

The peers need torchvision, which the CPU torch wheel of the project's set-up cannot load; they
run in an environment of their own (the project without napari, torch with a matching
torchvision; on x86-64 Linux with Python 3.11 these lie on this project's machines)::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.14.1 torchvision==0.29.1 segmentation-models-pytorch \
        'cellpose>=3,<4' numpy scipy scikit-image tifffile imageio safetensors pandas
    .venv-peers/bin/pip install --no-deps -e .
    OMP_NUM_THREADS=1 .venv-peers/bin/python -m benchmarks.accuracy --threads 1 --smp --cellpose

Protocol (identical for every model):

* data: the DSB2018 nuclei image (manual instance masks) split into four 256 x 256 quadrants
  (:func:`benchmarks.fetch_data.dsb2018_quadrants`); fold ``f`` trains on the three other
  quadrants and tests on quadrant ``f``, which it never sees (``val_fraction=0``: no model
  selection on it either; the last state of the run is evaluated);
* models, all from a random initialisation (``torch.manual_seed(seed)``) with 1 input channel:
  S2M-Net + MASL, S2M-Net + Dice/BCE, S2M-Net + MASL + SCC, the U-Net baseline of equal
  parameters + Dice/BCE and DSSAU-Net (``tiny`` preset) + Dice/BCE; S2M-Net and the U-Net use
  BatchNorm momentum 0.1 (DSSAU-Net has no such option and keeps PyTorch's 0.1 default);
  with ``--smp`` (segmentation-models-pytorch importable), its U-Net with a ResNet34 encoder
  (24.4M parameters, no pretrained weights) + Dice/BCE, trained and scored by the same code;
  with ``--cellpose`` (Cellpose 3 importable), Cellpose's own network (6.6M parameters) trained from
  scratch with Cellpose's own ``train_seg`` and defaults (AdamW lr 5e-3 with its warm-up, 224-px
  crops, flows), as many epochs of one batch as fit in the budget (see :func:`run_cellpose`);
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
from functools import partial
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


def _import_status(module: str, install: str) -> str | None:
    """``None`` when ``module`` imports, else why the peer that needs it is skipped."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return f"not installed ({install})"
    except Exception as exc:  # e.g. a torchvision wheel built for another torch
        return f"installed but fails to import ({type(exc).__name__}: {exc})"
    return None


def smp_status() -> str | None:
    """``None`` when segmentation-models-pytorch imports, else why it is skipped."""
    return _import_status("segmentation_models_pytorch", "pip install segmentation-models-pytorch")


SMP_VARIANT = Variant("smp U-Net ResNet34 (no pretraining) + Dice/BCE", "smp_unet", "dicebce")


@dataclass
class SmpUnetOptions:
    """Options of the segmentation-models-pytorch peer (registered only by this benchmark)."""

    encoder: str = "resnet34"


def register_smp_unet() -> None:
    """Register ``smp.Unet`` (random init) as architecture ``"smp_unet"``.

    Going through the registry means the peer is trained and scored by exactly the same code as
    the project's own models (``training.train``, ``inference.segment``); the wrapper only adds
    the registry contract (``stride``, any input size by padding and cropping back).
    """
    import segmentation_models_pytorch as smp
    import torch
    from torch import nn

    from napari_s2mnet.model import ModelConfig, register_model
    from napari_s2mnet.model.blocks import crop_padding, pad_to_multiple

    class SmpUnet(nn.Module):
        stride = 32

        def __init__(self, in_channels: int, num_classes: int, encoder: str) -> None:
            super().__init__()
            self.net = smp.Unet(
                encoder, encoder_weights=None, in_channels=in_channels, classes=num_classes
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x, pads = pad_to_multiple(x, self.stride)
            return crop_padding(self.net(x), pads)

    @register_model("smp_unet", SmpUnetOptions, "segmentation-models-pytorch U-Net (peer)")
    def _build(config: ModelConfig, options: SmpUnetOptions) -> nn.Module:
        return SmpUnet(config.in_channels, config.num_classes, options.encoder)


def cellpose_status() -> str | None:
    """``None`` when Cellpose 3 imports (the peer trained from scratch), else why it is skipped."""
    status = _import_status("cellpose.train", "pip install 'cellpose>=3,<4'")
    if status is not None:
        return status
    import cellpose

    version = getattr(cellpose, "__version__", None) or _dist_version("cellpose")
    if not str(version).startswith("3."):
        return f"version {version} installed; this script drives the Cellpose 3 training API"
    return None


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


CELLPOSE_LABEL = "Cellpose 3 (from scratch)"


def run_cellpose(fold: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Cellpose 3's own network and training (``train_seg``, its defaults) from a random init.

    ``train_seg`` has epochs, not a time budget: the seconds per epoch are measured on a
    throw-away copy first (2 and 6 epochs, set-up cost separated), then the run gets as many
    epochs as fit in ``--seconds``. One epoch = one batch of ``--batch-size`` crops (224 px,
    Cellpose's size), so its steps compare with the other rows'. Segmentation: Cellpose's
    ``eval`` with the diameter learned from the training masks.
    """
    import copy
    import logging
    import tempfile

    import torch
    from cellpose import models, train

    logging.getLogger("cellpose").setLevel(logging.WARNING)
    quads = dsb2018_quadrants()
    imgs = [q[0].astype(np.float32) for i, q in enumerate(quads) if i != fold]
    labs = [q[1].astype(np.int32) for i, q in enumerate(quads) if i != fold]
    test_img, test_gt = quads[fold]
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - Cellpose's augmentation uses numpy's global state
    model = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None)
    n_params = sum(p.numel() for p in model.net.parameters())  # eval() may convert to oneDNN
    kw = {
        "train_data": imgs,
        "train_labels": labs,
        "channels": [0, 0],
        "batch_size": args.batch_size,
        "nimg_per_epoch": args.batch_size,
        "min_train_masks": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for n in (2, 6):
            probe = copy.deepcopy(model.net)
            t0 = time.perf_counter()
            train.train_seg(probe, n_epochs=n, save_path=tmp, **kw)
            timings[n] = time.perf_counter() - t0
        per_epoch = max(1e-3, (timings[6] - timings[2]) / 4)
        setup = max(0.0, timings[2] - 2 * per_epoch)
        epochs = max(2, int((args.seconds - setup) / per_epoch))
        t0 = time.perf_counter()
        train.train_seg(model.net, n_epochs=epochs, save_path=tmp, **kw)
        elapsed = time.perf_counter() - t0
    model.diam_labels = float(model.net.diam_labels.item())
    model.net.eval()
    t0 = time.perf_counter()
    masks = model.eval(test_img.astype(np.float32), channels=[0, 0], diameter=None)[0]
    infer_s = time.perf_counter() - t0
    d, iou = dice_iou(masks, test_gt)
    return {
        "dice": d,
        "iou": iou,
        "bf1": boundary_f1(masks, test_gt),
        "params": n_params,
        "seconds": elapsed,
        "steps": epochs,
        "infer_s": infer_s,
        "stopped": "epochs fitted to the budget",
    }


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
    bundle = new_model(
        ModelConfig(arch=variant.arch, in_channels=1, num_classes=1, options=dict(variant.options)),
        name=variant.label,
    )
    cfg = FinetuneConfig(
        seconds=args.seconds,
        lr=args.lr,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        seed=seed,
        device=args.device,
        val_fraction=0.0,
        patience=None,
        steps_per_epoch=25,
        loss=variant.loss,
    )
    result = train(train_pairs, bundle, cfg, names=[f"dsb2018/q{i}" for i in range(4) if i != fold])
    trained = result.bundle
    trained.model.eval()
    t0 = time.perf_counter()
    labels, _ = segment(
        test_img, trained, InferenceConfig(device=args.device, compute_features=False)
    )
    infer_s = time.perf_counter() - t0
    d, iou = dice_iou(labels, test_gt)
    return {
        "dice": d,
        "iou": iou,
        "bf1": boundary_f1(labels, test_gt),
        "params": count_parameters(bundle.model),
        "seconds": result.elapsed,
        "steps": result.steps,
        "infer_s": infer_s,
        "stopped": result.stopped_reason,
    }


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
    p.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=None,
        help="held-out DSB2018 quadrants (default: 0 1 2 3; --quick: 3)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--n-seeds", type=int, default=1, help="seeds seed .. seed+n-1 per fold")
    p.add_argument("--seconds", type=float, default=None, help="budget per run (default 120)")
    p.add_argument("--crop-size", type=int, default=None, help="crop side (default 192; quick 128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--smp",
        action="store_true",
        help="add segmentation-models-pytorch's U-Net ResNet34, random init (needs "
        "segmentation-models-pytorch and a torchvision matching torch)",
    )
    p.add_argument(
        "--cellpose",
        action="store_true",
        help="add Cellpose 3 trained from scratch (needs cellpose>=3,<4 importable)",
    )
    p.add_argument(
        "--models",
        type=int,
        nargs="*",
        default=None,
        help="subset of variants by index (0..4), e.g. --models 0 3; the flag "
        "alone runs none of them (only the peers asked for)",
    )
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

    print(
        f"# accuracy benchmark: torch {torch.__version__}, {args.device}, threads "
        f"{args.threads}, {platform.processor() or platform.machine()}"
    )
    print(
        f"# DSB2018 quadrant folds {args.folds} (train 3, test the held-out one), seeds {seeds}"
        f", {args.seconds:g} s per run, crop {args.crop_size}, batch {args.batch_size}, "
        f"lr {args.lr:g}, val_fraction 0, random init, 1 input channel"
    )
    smp = smp_status() if args.smp else "not requested (--smp)"
    print(f"# segmentation-models-pytorch peer: {'included' if smp is None else 'skipped: ' + smp}")
    if smp is None:
        register_smp_unet()
        variants.append(SMP_VARIANT)

    cellpose = cellpose_status() if args.cellpose else "not requested (--cellpose)"
    print(f"# Cellpose peer: {'included' if cellpose is None else 'skipped: ' + cellpose}")
    rows: list[tuple[str, str]] = [(v.label, v.loss) for v in variants]
    if cellpose is None:
        rows.append((CELLPOSE_LABEL, "Cellpose's"))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in rows}
    for fold in args.folds:
        for seed in seeds:
            jobs = [(v.label, partial(run_one, v, fold, seed, args)) for v in variants]
            if cellpose is None:
                jobs.append((CELLPOSE_LABEL, partial(run_cellpose, fold, seed, args)))
            for label, job in jobs:
                r = job()
                runs[label].append(r)
                print(
                    f"# fold {fold} seed {seed} {label}: Dice {r['dice']:.3f} IoU "
                    f"{r['iou']:.3f} BF1 {r['bf1']:.3f} steps {r['steps']} "
                    f"({r['seconds']:.0f} s, {r['stopped']})",
                    flush=True,
                )

    print()
    print("| model | loss | params | held-out Dice | IoU | boundary F1 (2 px) | train s | steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, loss in rows:
        rs = runs[label]
        print(
            f"| {label} | {loss} | {rs[0]['params']:,} | "
            f"{_ms([r['dice'] for r in rs], '.3f')} | {_ms([r['iou'] for r in rs], '.3f')} | "
            f"{_ms([r['bf1'] for r in rs], '.3f')} | {_ms([r['seconds'] for r in rs], '.0f')} | "
            f"{_ms([float(r['steps']) for r in rs], '.0f')} |"
        )
    print(f"\n# n = {len(args.folds) * len(seeds)} run(s) per model (folds x seeds); mean +- std")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
