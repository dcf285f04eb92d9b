"""Instance segmentation: today's watershed heuristics vs the instance head vs Cellpose (issue 15).

Usage::

    python -m benchmarks.instances --model resources/s2mnet_default.safetensors
    python -m benchmarks.instances --model NEW.safetensors --baseline OLD.safetensors
    # Cellpose 3 from scratch, same training images and wall-clock budget (peer environment,
    # see benchmarks/accuracy.py):
    .venv-peers/bin/python -m benchmarks.instances --cellpose --seconds 1500 --no-s2mnet

Data (never used to choose anything below unless said so):

* **DSB2018 quadrant 3** (manual masks, 29 nuclei): held out from the bundled model's training
  (benchmarks/train_default.py trains on quadrants 0-2 and BBBC007 images 0-9);
* **BBBC007 images 10-13** (held out; automatic Voronoi-Otsu labels: pseudo ground truth);
* **the 3-D nuclei stack** of stardist==0.9.2 (31 x 61 x 57, 51 nuclei, manual masks), never
  seen in training: per-plane 2-D scores and 3-D scores (object count, 3-D F1@0.5, 3-D mAP).
  Its voxel size is not published with the file; ``--spacing-3d`` defaults to (2, 1, 1), the
  anisotropy StarDist's notebooks derive from the median object extents (7 x 15 x 14 voxels).
  Only the 3-D watershed and the 3-D morphology use it; stitching does not.

Rows: (a) the binary model without the head (``--baseline``; default: the bundled file before
issue 15, from git) with the default post-processing (8-connected components) and with
*split touching* (distance-transform watershed; 3-D: anisotropic); (b) the model with the head
(``--model``): defaults, plus each interior definition and each 3-D method; (c) Cellpose 3 from
scratch (``--cellpose``). Metrics (:func:`napari_s2mnet.instances.match_scores`): instance F1 at
IoU 0.5 and mAP = mean over IoU 0.5:0.05:0.95 of TP / (TP + FP + FN), one-to-one matching.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fetch_data import dsb2018_quadrants, load_bbbc007, load_nuclei3d
from napari_s2mnet.instances import match_scores

REPO = Path(__file__).resolve().parents[1]
#: The bundled binary model before issue 15 (git revision holding it).
BASELINE_REV = "2d9e7f7"
BASELINE_PATH = "resources/s2mnet_default.safetensors"
N_BBBC_TRAIN = 10


def datasets() -> dict[str, Any]:
    """Held-out 2-D images (name -> (image, labels)) and the 3-D stack."""
    quads = dsb2018_quadrants()
    two_d = {"dsb2018/q3": quads[3]}
    for name, img, lab in load_bbbc007()[N_BBBC_TRAIN:]:
        two_d[f"bbbc007/{name} (pseudo GT)"] = (img, lab)
    img3, lab3 = load_nuclei3d()
    return {
        "2d": two_d,
        "3d": (img3, lab3),
        "train_2d": {f"dsb2018/q{i}": quads[i] for i in range(3)},
    }


def baseline_file(tmp: Path) -> Path:
    """The pre-issue-15 bundled model, extracted from git."""
    out = tmp / "baseline.safetensors"
    data = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BASELINE_REV}:{BASELINE_PATH}"],
        check=True,
        capture_output=True,
    ).stdout
    out.write_bytes(data)
    return out


def predict_maps(image: np.ndarray, bundle: Any, **layout_kw: Any) -> np.ndarray:
    """The engine's blended sigmoid maps ``(C, [Z,] Y, X)`` with the default settings."""
    from napari_s2mnet.inference import InferenceConfig
    from napari_s2mnet.inference import run as run_mod
    from napari_s2mnet.inference.engine import Counter, Engine
    from napari_s2mnet.layout import check_array, plan_image, resolve_layout

    cfg = InferenceConfig(device="cpu")
    arr = check_array(image)
    plan = plan_image(arr, resolve_layout(arr, None), int(bundle.config.in_channels), [])
    engine = Engine(bundle, cfg, [])
    try:
        tiles = engine.grid(plan.spatial).n_tiles
        counter = Counter(
            total=plan.n_slices * (tiles + 1), tiles_per_slice=tiles, n_slices=plan.n_slices
        )
        timings = {"prepare": 0.0, "predict": 0.0}
        planes = [
            np.stack(item.maps)
            for item in run_mod._predictions(plan, bundle, cfg, engine, counter, timings)
            if not hasattr(item, "stage")
        ]
    finally:
        engine.close()
    return planes[0] if not plan.lead else np.stack(planes, axis=1)


def _row(method: str, data: str, pred: np.ndarray, gt: np.ndarray, **extra: Any) -> dict:
    s = match_scores(pred, gt)
    return {
        "method": method,
        "data": data,
        "n_pred": s["n_pred"],
        "n_gt": s["n_gt"],
        "f1": s["f1@0.5"],
        "map": s["mAP"],
        **extra,
    }


def _per_plane(method: str, pred: np.ndarray, gt: np.ndarray) -> dict:
    """Mean 2-D scores over the planes of a stack (each plane's ids on their own)."""
    f1, mp, n_p, n_g = [], [], 0, 0
    for p, g in zip(pred, gt, strict=True):
        if not g.any() and not p.any():
            continue
        s = match_scores(p, g)
        f1.append(s["f1@0.5"])
        mp.append(s["mAP"])
        n_p, n_g = n_p + s["n_pred"], n_g + s["n_gt"]
    return {
        "method": method,
        "data": "nuclei3d, per plane (2-D)",
        "n_pred": n_p,
        "n_gt": n_g,
        "f1": float(np.mean(f1)),
        "map": float(np.mean(mp)),
    }


def s2mnet_rows(model: Path, baseline: Path, spacing3d: tuple[float, ...]) -> list[dict]:
    """Rows (a) and (b)."""
    from napari_s2mnet.checkpoint import load_model
    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.instances import head_instances, stitch_planes

    data = datasets()
    img3, gt3 = data["3d"]
    rows: list[dict] = []
    for tag, path in (("(a) binary model", baseline), ("(b) instance head", model)):
        bundle = load_model(path)
        head = bool(bundle.config.instance_head)
        variants = {"defaults": {}}
        if not head:
            variants["split touching"] = {"split_touching": True}
        for vname, kw in variants.items():
            cfg = InferenceConfig(device="cpu", compute_features=False, **kw)
            for name, (img, gt) in data["2d"].items():
                t0 = time.perf_counter()
                lab, _ = segment(img, bundle, cfg)
                rows.append(
                    _row(f"{tag}, {vname}", name, lab, gt, seconds=time.perf_counter() - t0)
                )
            for k3 in ("off", "stitch", "watershed"):
                cfg3 = InferenceConfig(device="cpu", compute_features=False, labels_3d=k3, **kw)
                t0 = time.perf_counter()
                lab3, _ = segment(img3, bundle, cfg3, spacing=spacing3d)
                sec = time.perf_counter() - t0
                label = f"{tag}, {vname}, labels_3d={k3}"
                rows.append(_row(label, "nuclei3d (3-D)", lab3, gt3, seconds=sec))
                if k3 == "stitch":
                    rows.append(_per_plane(label, lab3, gt3))
        if head:  # the interior definitions, from the same maps (training quadrants too)
            for mode in ("distance", "contour"):
                for split in ("2d", "train_2d"):
                    for name, (img, gt) in data[split].items():
                        maps = predict_maps(img, bundle)
                        lab, _ = head_instances(maps, threshold=bundle.threshold, mode=mode)
                        rows.append(_row(f"{tag}, interior={mode}", name, lab, gt))
                maps3 = predict_maps(img3, bundle)
                planes = np.stack(
                    [
                        head_instances(maps3[:, z], threshold=bundle.threshold, mode=mode)[0]
                        for z in range(maps3.shape[1])
                    ]
                )
                rows.append(
                    _row(
                        f"{tag}, interior={mode}, stitch",
                        "nuclei3d (3-D)",
                        stitch_planes(planes),
                        gt3,
                    )
                )
                lab3, _ = head_instances(
                    maps3, threshold=bundle.threshold, mode=mode, spacing=spacing3d
                )
                rows.append(
                    _row(
                        f"{tag}, interior={mode}, 3-D seeded watershed", "nuclei3d (3-D)", lab3, gt3
                    )
                )
    return rows


def cellpose_rows(seconds: float, seed: int = 0) -> list[dict]:
    """(c) Cellpose 3 trained from scratch on the bundled model's training images."""
    import copy
    import logging

    import torch
    from cellpose import models, train

    from benchmarks.train_default import splits
    from napari_s2mnet.instances import stitch_planes

    logging.getLogger("cellpose").setLevel(logging.WARNING)
    data = datasets()
    tr = splits()["train"]
    imgs = [np.asarray(i, dtype=np.float32) for i, _, _ in tr]
    labs = [np.asarray(lab, dtype=np.int32) for _, lab, _ in tr]
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - Cellpose's augmentation uses numpy's global state
    model = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None)
    kw = {
        "train_data": imgs,
        "train_labels": labs,
        "channels": [0, 0],
        "batch_size": 4,
        "nimg_per_epoch": 4,
        "min_train_masks": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for n in (2, 6):  # seconds per epoch, as in benchmarks/accuracy.py
            probe = copy.deepcopy(model.net)
            t0 = time.perf_counter()
            train.train_seg(probe, n_epochs=n, save_path=tmp, **kw)
            timings[n] = time.perf_counter() - t0
        per_epoch = max(1e-3, (timings[6] - timings[2]) / 4)
        epochs = max(2, int((seconds - max(0.0, timings[2] - 2 * per_epoch)) / per_epoch))
        t0 = time.perf_counter()
        train.train_seg(model.net, n_epochs=epochs, save_path=tmp, **kw)
        elapsed = time.perf_counter() - t0
    model.diam_labels = float(model.net.diam_labels.item())
    model.net.eval()
    tag = f"(c) Cellpose 3 from scratch ({epochs} epochs, {elapsed:.0f} s)"
    rows = []
    for name, (img, gt) in data["2d"].items():
        masks = model.eval(np.asarray(img, dtype=np.float32), channels=[0, 0], diameter=None)[0]
        rows.append(_row(tag, name, masks, gt))
    img3, gt3 = data["3d"]
    planes = np.stack(
        [model.eval(p.astype(np.float32), channels=[0, 0], diameter=None)[0] for p in img3]
    )
    stitched = stitch_planes(planes, 0.25)
    rows.append(_row(f"{tag}, stitch 0.25", "nuclei3d (3-D)", stitched, gt3))
    rows.append(_per_plane(f"{tag}, stitch 0.25", stitched, gt3))
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints a Markdown table."""
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", type=Path, default=REPO / BASELINE_PATH, help="model with the instance head"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help=f"binary model without the head (default: {BASELINE_PATH} at {BASELINE_REV})",
    )
    p.add_argument("--spacing-3d", type=float, nargs=3, default=(2.0, 1.0, 1.0))
    p.add_argument("--cellpose", action="store_true", help="add Cellpose 3 from scratch")
    p.add_argument("--no-s2mnet", action="store_true", help="only the Cellpose rows")
    p.add_argument("--seconds", type=float, default=1500.0, help="Cellpose training budget")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
        f"threads {args.threads}"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_s2mnet:
            base = args.baseline or baseline_file(Path(tmp))
            rows += s2mnet_rows(args.model, base, tuple(args.spacing_3d))
        if args.cellpose:
            rows += cellpose_rows(args.seconds)
    print("| method | data | objects (GT) | F1@0.5 | mAP 0.5:0.95 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['data']} | {r['n_pred']} ({r['n_gt']}) | {r['f1']:.3f} | "
            f"{r['map']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
