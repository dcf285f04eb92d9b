"""Correct-and-fine-tune with a simulated annotator who fixes the k worst objects (issue 14).

Usage::

    python -m benchmarks.hitl_annotator                       # 3 sets x k 0,1,2,5 x 3 seeds, 60 s
    python -m benchmarks.hitl_annotator --sets dsb2018 --ks 5 --weights 0 0.1 1 --n-seeds 1
    python -m benchmarks.hitl_annotator --sets dsb2018 --ks 5 --scopes all decoder+head head+norm
    python -m benchmarks.hitl_annotator --sets dsb2018 --ks 1 --epochs 4 --lrs 1e-6 --no-check

The last is a diagnostic (docs/benchmarks.md, "Batch-norm statistics after a fine-tune"): 40
steps that leave the weights where they are, and the result scored even where the safety check
would have kept the starting model (``--freeze-bn`` and ``--fg-fraction`` change the run too).

Protocol (every model is scored only on data it never saw, and never on what was corrected):

* data sets and the model each starts from:

  - ``dsb2018``: the DSB2018 image (manual masks) for an S2M-Net trained on BBBC007 only
    (``.cache/models/bbbc007_only_head.safetensors``, made by ``--make-bases bbbc007``);
    top half = annotation pool, bottom half = test;
  - ``nuclei3d``: the 3-D nuclei stack as 2-D planes (>= 3 objects) for the bundled model;
    planes z < Z/2 = pool, the others = test;
  - ``bbbc007``: BBBC007 (automatic pseudo ground truth) for an S2M-Net trained on the DSB2018
    image only (``.cache/models/dsb_only_head.safetensors``, ``--make-bases dsb2018``); images 0-6 =
    pool, 10-13 = test;
  - ``cells``: whole U2OS cells in Cell Painting fields (the mean of the four non-DNA
    channels; automatic Cellpose labels, so scores are agreement with Cellpose) for the bundled
    nuclei model; plate h15 (6 fields) = pool, plate h23 (6 fields) = test. Cells (~55 px) are
    3x the model's training diameter, so the set runs with an object diameter, for segmenting
    and fine-tuning alike: the median equivalent diameter of the pool's cells, i.e. what a user
    types after measuring a few (the estimate button, which segments with the model itself,
    finds the nuclei a nuclei model sees: it is printed for reference). **Not a valid
    annotator set**: Cellpose labelled only part of the visible cells (32 of ~100 in field
    h15 scene 1), so the annotator erases real cells as "false objects" and the scores count
    unlabelled cells as false positives; it serves the ``--fill-holes`` comparison on cells;

* the annotator looks at the model's own output on the pool, ranks the errors (every ground-truth
  object by its best IoU with a predicted object, every predicted object that overlaps no
  ground truth as IoU 0; ties: larger first) and fixes the k worst, like a user: inside the fixed
  region (the object, the predicted objects overlapping it, 2 px around) the labels become the
  ground truth; that region is the *corrected* mask. Everything else stays the model's output;
* fine-tuning: :func:`napari_s2mnet.training.train` with ``corrected=`` masks and
  :meth:`FinetuneConfig.interactive` (CPU preset, or ``--preset gpu``: the GPU preset's settings
  and step cap, run on the CPU) for ``--seconds`` wall clock;
* scores on the test part with :func:`napari_s2mnet.inference.segment` (default settings, plus
  the set's diameter; ``--fill-holes``: with hole filling): foreground Dice (pooled pixels) and
  instance F1 at IoU 0.5 (mean over test images/planes).
  k = 0 is the starting model (zero-shot).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / ".cache" / "models"


# ------------------------------------------------------------------------------ annotator
def worst_objects(pred: np.ndarray, gt: np.ndarray) -> list[tuple[float, int, np.ndarray]]:
    """Errors of ``pred`` against ``gt`` as (IoU, -size, region mask), worst first."""
    from scipy import ndimage

    errors = []
    for g in np.unique(gt[gt > 0]):
        obj = gt == g
        ids, counts = np.unique(pred[obj], return_counts=True)
        best, region = 0.0, obj.copy()
        for p, c in zip(ids, counts, strict=True):
            if p == 0:
                continue
            other = pred == p
            region |= other
            best = max(best, c / float((obj | other).sum()))
        errors.append((best, -int(region.sum()), region))
    for p in np.unique(pred[pred > 0]):
        obj = pred == p
        if not (gt[obj] > 0).any():  # a false object
            errors.append((0.0, -int(obj.sum()), obj))
    errors.sort(key=lambda e: (e[0], e[1]))
    return [(iou, size, ndimage.binary_dilation(r, iterations=2)) for iou, size, r in errors]


def annotate(
    preds: list[np.ndarray], gts: list[np.ndarray], k: int
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Fix the ``k`` worst objects over the pool: (pool index, corrected labels, mask)."""
    ranked = []
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        ranked += [(iou, size, i, r) for iou, size, r in worst_objects(p, g)]
    ranked.sort(key=lambda e: (e[0], e[1]))
    labels = {i: preds[i].astype(np.int32) for i in range(len(preds))}
    masks = {i: np.zeros(preds[i].shape, bool) for i in range(len(preds))}
    fixed = 0
    for _iou, _size, i, region in ranked:
        if fixed == k:
            break
        if (masks[i] & region).any():
            continue  # already fixed with a neighbour
        offset = int(labels[i].max()) + 1
        g = gts[i][region]
        labels[i][region] = np.where(g > 0, g.astype(np.int32) + offset, 0)
        masks[i] |= region
        fixed += 1
    return [(i, labels[i], masks[i]) for i in sorted(masks) if masks[i].any()]


# ------------------------------------------------------------------------------ data sets
def _load(path: Path, how: str) -> Any:
    from napari_s2mnet.checkpoint import load_model

    if not path.exists():
        raise SystemExit(f"{path} is missing: {how}")
    return load_model(path)


def base_path(which: str, binary: bool = False) -> Path:
    """Where the starting model trained on ``which`` only lives (``binary``: without the head)."""
    stem = {"bbbc007": "bbbc007_only", "dsb2018": "dsb_only"}[which]
    return MODELS / f"{stem}{'' if binary else '_head'}.safetensors"


def make_base(which: str, epochs: int = 15, binary: bool = False) -> Path:
    """Train a starting model from scratch on one data set only (``"bbbc007"`` or ``"dsb2018"``):
    S2M-Net with the instance head like the bundled model (``binary``: without it, the protocol
    of the runs before 2026-12-06), MASL, Adam lr 1e-3, batch 4, 160-px crops, ``epochs`` x 10
    steps (a step budget, so the model does not depend on the machine's load), seed 0; saved
    under ``.cache/models``."""
    import torch

    from benchmarks import fetch_data
    from napari_s2mnet.checkpoint import new_model, save_model
    from napari_s2mnet.diameter import equivalent_diameter
    from napari_s2mnet.model import ModelConfig
    from napari_s2mnet.training import FinetuneConfig, train

    torch.manual_seed(0)
    if which == "bbbc007":
        pairs = [(im, lab) for _, im, lab in fetch_data.load_bbbc007()]
    else:
        pairs = [fetch_data.load_dsb2018()]
    out = base_path(which, binary)
    start = new_model(
        ModelConfig(
            arch="s2mnet",
            in_channels=1,
            num_classes=1,
            options={"bn_momentum": 0.1},
            instance_head=not binary,
        ),
        name=f"S2M-Net {which} only",
    )
    cfg = FinetuneConfig(
        epochs=epochs,
        lr=1e-3,
        batch_size=4,
        crop_size=160,
        seed=0,
        device="cpu",
        val_fraction=0.0,
        patience=None,
    )
    res = train(pairs, start, cfg, names=[f"{which}/{i}" for i in range(len(pairs))])
    res.bundle.metadata["diameter"] = round(
        float(np.median([equivalent_diameter(lab) for _, lab in pairs])), 1
    )
    MODELS.mkdir(parents=True, exist_ok=True)
    save_model(res.bundle, out)
    print(f"# base model {out.name}: {res.steps} steps in {res.elapsed:.0f} s", flush=True)
    return out


Pairs = list[tuple[np.ndarray, np.ndarray]]


def data_set(name: str, binary: bool = False) -> tuple[Any, Pairs, Pairs, float | None]:
    """(starting model, pool pairs, test pairs, object diameter or ``None``) of a set (see the
    module docstring); ``binary``: the starting models without the instance head."""
    flag = " --binary-bases" if binary else ""
    from benchmarks import fetch_data

    if name == "dsb2018":
        model = _load(
            base_path("bbbc007", binary),
            f"python -m benchmarks.hitl_annotator --make-bases bbbc007{flag}",
        )
        img, gt = fetch_data.load_dsb2018()
        h = img.shape[0] // 2
        return model, [(img[:h], gt[:h])], [(img[h:], gt[h:])], None
    if name == "nuclei3d":
        from benchmarks.hitl import slice_split
        from napari_s2mnet.checkpoint import load_default_model

        img, gt = fetch_data.load_nuclei3d()
        pool, test = slice_split(gt)
        return (
            load_default_model(),
            [(img[z], gt[z]) for z in pool],
            [(img[z], gt[z]) for z in test],
            None,
        )
    if name == "bbbc007":
        model = _load(
            base_path("dsb2018", binary),
            f"python -m benchmarks.hitl_annotator --make-bases dsb2018{flag}",
        )
        items = fetch_data.load_bbbc007()
        return (
            model,
            [(im, lab) for _, im, lab in items[:7]],
            [(im, lab) for _, im, lab in items[10:]],
            None,
        )
    if name == "cells":
        from napari_s2mnet.checkpoint import load_default_model
        from napari_s2mnet.diameter import equivalent_diameter, estimate_diameter

        model = load_default_model()
        fields = fetch_data.load_cellpainting()
        pairs = [(img[1:].mean(axis=0, dtype=np.float32), lab) for _, img, lab in fields]
        pool = [p for (n, _, _), p in zip(fields, pairs, strict=True) if n.startswith("h15")]
        test = [p for (n, _, _), p in zip(fields, pairs, strict=True) if n.startswith("h23")]
        diameter = float(np.median([equivalent_diameter(lab) for _, lab in pool]))
        estimate = estimate_diameter(pool[0][0], model, backend="torch", device="cpu")
        print(f"# cells: diameter {diameter:.1f} px (the estimate button: {estimate} px)")
        return model, pool, test, diameter
    raise SystemExit(f"unknown set {name!r}")


# ------------------------------------------------------------------------------ scoring
def _config(diameter: float | None, fill_holes: bool = False) -> Any:
    from napari_s2mnet.inference import InferenceConfig

    return InferenceConfig(
        device="cpu",
        compute_features=False,
        backend="torch",
        diameter=diameter,
        fill_holes=fill_holes,
    )


def score(
    bundle: Any, test: Pairs, diameter: float | None = None, fill_holes: bool = False
) -> tuple[float, float]:
    """Foreground Dice (pooled) and mean instance F1@0.5 on the test pairs."""
    from napari_s2mnet.inference import segment
    from napari_s2mnet.instances import match_scores

    cfg = _config(diameter, fill_holes)
    inter = total = 0
    f1s = []
    for img, gt in test:
        lab, _ = segment(img, bundle, cfg)
        p, g = lab > 0, gt > 0
        inter += int((p & g).sum())
        total += int(p.sum() + g.sum())
        f1s.append(match_scores(lab, gt)["f1@0.5"])
    return 2 * inter / max(total, 1), float(np.mean(f1s))


def predict(bundle: Any, pool: Pairs, diameter: float | None = None) -> list[np.ndarray]:
    from napari_s2mnet.inference import segment

    return [segment(img, bundle, _config(diameter))[0] for img, _ in pool]


def _filled(args: argparse.Namespace, bundle: Any, test: Pairs, diameter: float | None) -> str:
    """With ``--fill-holes``: the same scores with hole filling, as text for the log line."""
    if not args.fill_holes:
        return ""
    d, f = score(bundle, test, diameter, fill_holes=True)
    return f" | fill_holes: Dice {d:.3f} F1 {f:.3f}"


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    from napari_s2mnet.training import FinetuneConfig, train

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sets",
        nargs="+",
        default=["dsb2018", "nuclei3d", "bbbc007"],
        choices=["dsb2018", "nuclei3d", "bbbc007", "cells"],
    )
    p.add_argument(
        "--fill-holes",
        action="store_true",
        help="also score every model with fill_holes on (printed as a second Dice / F1 pair)",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument(
        "--preset",
        choices=["cpu", "gpu"],
        default="cpu",
        help="which interactive preset (gpu: its settings and step cap, run on the CPU)",
    )
    p.add_argument("--n-seeds", type=int, default=3)
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ..."
    )
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=[None],
        help="uncorrected_weight values (default: the preset's)",
    )
    p.add_argument("--scopes", nargs="+", default=[None], help="scopes (default: the preset's)")
    p.add_argument(
        "--lrs", type=float, nargs="+", default=[None], help="learning rates (default: preset's)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="cap every run at this many epochs of 10 steps (the step schedule rules)",
    )
    p.add_argument(
        "--fg-fraction",
        type=float,
        default=None,
        help="share of crops centred on corrected pixels (the rest uniform; preset: 0.8)",
    )
    p.add_argument(
        "--freeze-bn",
        action="store_true",
        help="batch-norm layers in eval mode while training (running statistics kept)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="diagnostic: never put the starting model back (see what training itself gives)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--no-val",
        action="store_true",
        help="no validation (val_fraction 0, the preset's since 2026-12-06): the final state",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="hold this share of the corrected regions out for validation (from 10 regions on)",
    )
    p.add_argument(
        "--make-bases",
        nargs="*",
        choices=["bbbc007", "dsb2018"],
        default=None,
        help="first train these starting models (150 steps each)",
    )
    p.add_argument(
        "--binary-bases",
        action="store_true",
        help="starting models without the instance head (the protocol before 2026-12-06)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_check:
        from napari_s2mnet.training import loop

        loop._WORSE = loop._CONTEXT_DROP = float("inf")
    for which in args.make_bases or []:
        make_base(which, binary=args.binary_bases)
    print(
        f"# hitl_annotator: torch {torch.__version__}, cpu, threads {args.threads}, "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}, {args.seconds:g} s per run",
        flush=True,
    )
    rows = []
    for name in args.sets:
        model, pool, test, diameter = data_set(name, args.binary_bases)
        d0, f0 = score(model, test, diameter)
        filled = _filled(args, model, test, diameter)
        print(f"# {name}: k=0 Dice {d0:.3f} F1 {f0:.3f}{filled}", flush=True)
        rows.append((name, 0, "-", "-", d0, 0.0, f0, 0.0, 0.0, "-"))
        preds = predict(model, pool, diameter)
        for k in args.ks:
            fixes = annotate(preds, [g for _, g in pool], k)
            pairs = [(pool[i][0], lab) for i, lab, _ in fixes]
            masks = [m for _, _, m in fixes]
            combos = [(w, sc, lr) for w in args.weights for sc in args.scopes for lr in args.lrs]
            for w, scope, lr in combos:
                over = {} if w is None else {"uncorrected_weight": w}
                if scope is not None:
                    over["scope"] = scope
                if lr is not None:
                    over["lr"] = lr
                if args.epochs is not None:
                    over["epochs"] = args.epochs
                if args.freeze_bn:
                    over["freeze_batchnorm"] = True
                if args.fg_fraction is not None:
                    over["foreground_fraction"] = args.fg_fraction
                if args.no_val:
                    over["val_fraction"] = 0.0
                elif args.val_fraction is not None:
                    over["val_fraction"] = args.val_fraction
                ds, fs, steps = [], [], []
                for seed in range(args.first_seed, args.first_seed + args.n_seeds):
                    cfg = FinetuneConfig.interactive(
                        "cuda" if args.preset == "gpu" else "cpu",
                        seconds=args.seconds,
                        seed=seed,
                        diameter=diameter,
                        **over,
                    )
                    cfg = dataclasses.replace(cfg, device="cpu")  # the GPU preset on the CPU
                    res = train(pairs, model, cfg, corrected=masks)
                    d, f = score(res.bundle, test, diameter)
                    ds.append(d)
                    fs.append(f)
                    steps.append(res.steps)
                    print(
                        f"# {name} k={k} w={cfg.uncorrected_weight} scope={cfg.scope} lr={cfg.lr:g} "
                        f"seed {seed}: Dice {d:.3f} F1 {f:.3f} steps {res.steps} "
                        f"kept_previous={res.kept_previous}"
                        f"{_filled(args, res.bundle, test, diameter)} | {res.message}",
                        flush=True,
                    )
                sd = statistics.stdev(ds) if len(ds) > 1 else 0.0
                sf = statistics.stdev(fs) if len(fs) > 1 else 0.0
                rows.append(
                    (
                        name,
                        k,
                        cfg.uncorrected_weight,
                        cfg.scope,
                        statistics.fmean(ds),
                        sd,
                        statistics.fmean(fs),
                        sf,
                        statistics.fmean(steps),
                        cfg.lr,
                    )
                )
    print()
    print("| set | k | uncorrected weight | scope | lr | Dice | vs k=0 | F1@0.5 | vs k=0 | steps |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    base = {r[0]: r for r in rows if r[1] == 0}
    for r in rows:
        b = base[r[0]]
        sd = f" +- {r[5]:.3f}" if r[5] else ""
        sf = f" +- {r[7]:.3f}" if r[7] else ""
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[9]} | {r[4]:.3f}{sd} | {r[4] - b[4]:+.3f} | "
            f"{r[6]:.3f}{sf} | {r[6] - b[6]:+.3f} | {r[8]:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
