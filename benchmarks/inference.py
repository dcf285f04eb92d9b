"""Inference engine scaling: time and peak memory against image size, plus the 8192^2 RSS check.

Usage::

    python -m benchmarks.inference --quick          # 256^2 .. 1024^2 and the 8192^2 check skipped
    python -m benchmarks.inference                  # 512^2 .. 4096^2 + 8192^2 uint16 (CPU ~20 min)
    python -m benchmarks.inference --arch unet      # the U-Net baseline instead of S2M-Net
    python -m benchmarks.inference --bundled        # the bundled default model (4.75M parameters)
    python -m benchmarks.inference --backend torch  # eager only (default auto: the compiled
                                                    # backend, timed against eager in one run)

What it does:

1. Builds a *small* network of the chosen architecture (``--width small``, the default, so a CPU
   run finishes in minutes; ``--width full`` for the paper's size) and trains it briefly on the
   DSB2018 nuclei image (``--train-steps``), then sets its threshold so that the foreground
   fraction on that image matches the manual mask. The point is not accuracy but realistic
   output: nucleus-like objects, so post-processing and features cost what they cost in use.
2. For every size it segments a tiling of the DSB2018 image (uint16) with the default
   :class:`~napari_s2mnet.inference.InferenceConfig` on the CPU, each size in a fresh
   subprocess, and reports wall time per stage, CPU time (all threads; unlike wall time it does
   not depend on what else the machine runs), objects, peak RSS (``ru_maxrss``) and the RSS
   growth during segmentation.
3. Baseline in the same process: the raw network on a batch of 4 tiles (no tiling, blending or
   post-processing); 'vs raw' = the raw network's CPU time for the run's tiles / the run's CPU
   time, i.e. the share of the work that is the network itself.
4. ``--backend`` (default ``auto``): the timed runs use that ``InferenceConfig.backend``; when it
   resolves to a compiled runtime, every timed size is also segmented with ``backend="torch"``
   in the same process (after its peak RSS is read) and the CPU / wall ratios are printed.
   The workers run under ``/usr/bin/time -v`` when present (its peak RSS is printed too).
5. Fits the slope of log(time) against log(pixels) (goal <= 1.1: linear in the pixel count) and
   checks that an 8192 x 8192 uint16 image segments within 2 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT_GB = 2.0

SMALL_OPTIONS: dict[str, dict[str, Any]] = {
    "s2mnet": {"widths": [8, 8, 16, 16, 16], "stem": 8, "expansion": 2, "head_widths": [8, 8]},
    "unet": {"base": 4, "depth": 4},
    "dssau": {},
}


def _peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024**3


def _status_gb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in GiB from ``/proc/self/status`` (NaN elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return math.nan


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``; Linux), so that the peak of one
    stage can be read without the transient peaks of the set-up before it (export, warm-ups)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def tiled_image(size: int) -> np.ndarray:
    """A ``size x size`` uint16 image tiled from the DSB2018 nuclei image (mirrored copies)."""
    from benchmarks.fetch_data import load_dsb2018

    img = load_dsb2018()[0]
    block = np.block([[img, img[:, ::-1]], [img[::-1], img[::-1, ::-1]]])
    reps = math.ceil(size / block.shape[0])
    return np.ascontiguousarray(np.tile(block, (reps, reps))[:size, :size]).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# model


def make_model(
    arch: str, width: str, steps: int, seed: int, path: Path, tile: int
) -> dict[str, Any]:
    """Train a small model briefly on DSB2018, calibrate its threshold, save it to ``path``.

    ``tile`` is stored as the model's inference tile (what a model trained with that crop size
    gets by default).
    """
    import torch

    from benchmarks.fetch_data import load_dsb2018
    from napari_s2mnet.checkpoint import new_model, save_model
    from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
    from napari_s2mnet.model import ModelConfig, count_parameters
    from napari_s2mnet.preprocess import normalize

    torch.manual_seed(seed)
    options = SMALL_OPTIONS.get(arch, {}) if width == "small" else {}
    bundle = new_model(ModelConfig(arch=arch, in_channels=1, options=options))
    bundle.metadata["tile_size"] = tile
    image, mask = load_dsb2018()
    x = torch.from_numpy(normalize(image, bundle.normalization, None))[None, None]
    y = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    net = bundle.model
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    crop, batch = 128, 4
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        corners = torch.randint(0, image.shape[0] - crop, (batch, 2), generator=gen).tolist()
        xb = torch.cat([x[..., r : r + crop, c : c + crop] for r, c in corners])
        yb = torch.cat([y[..., r : r + crop, c : c + crop] for r, c in corners])
        out = torch.nn.functional.binary_cross_entropy_with_logits(
            net(xb), yb, pos_weight=torch.tensor(2.0)
        )
        opt.zero_grad()
        out.backward()
        opt.step()
        loss = float(out.detach())
    train_s = time.perf_counter() - start
    net.eval()
    res = run_to_end(
        segment_iter(
            image,
            bundle,
            InferenceConfig(device="cpu", return_probability=True, compute_features=False),
        )
    )
    fg = float((mask > 0).mean())
    threshold = float(np.clip(np.quantile(res.probability, 1 - fg), 0.01, 0.99))
    bundle.metadata["threshold"] = threshold
    save_model(bundle, path)
    labels = run_to_end(
        segment_iter(image, bundle, InferenceConfig(device="cpu", compute_features=False))
    ).labels
    pred = labels > 0
    dice = 2 * (pred & (mask > 0)).sum() / max(1, pred.sum() + (mask > 0).sum())
    return {
        "arch": arch,
        "options": options,
        "params": count_parameters(net),
        "steps": steps,
        "train_s": train_s,
        "loss": loss,
        "threshold": threshold,
        "dice": float(dice),
        "objects": int(labels.max()),
        "stride": int(getattr(net, "stride", 1)),
    }


def raw_cpu_seconds_per_tile(net: Any, tile: int, batch: int = 4, reps: int = 1) -> float:
    """CPU seconds of the bare network per tile (no tiling, blending, post-processing)."""
    import torch

    x = torch.rand(batch, 1, tile, tile)
    net.eval()
    with torch.inference_mode():
        net(x)  # warm-up for this batch shape
        start = time.process_time()
        for _ in range(reps):
            net(x)
    return (time.process_time() - start) / (reps * batch)


# --------------------------------------------------------------------------------------------
# one size, in a fresh process


def warm_compiled(bundle: Any, cfg: Any, size: int, backend: str) -> None:
    """Export and compile the graph for this size's tile shape and every batch size up front.

    What the first ``segment()`` on a new model or tile shape pays once (then cached on disk):
    excluded here so that the timed runs compare steady-state speed.
    """
    import torch

    from napari_s2mnet.checkpoint import model_hash
    from napari_s2mnet.inference.backends import get_runner
    from napari_s2mnet.tiling import grid

    stride = max(1, int(getattr(bundle.model, "stride", 1)))
    tile = -(-int(cfg.tile_size or bundle.tile_size) // stride) * stride
    g = grid((size, size), tile, float(cfg.overlap), stride)
    net = bundle.model.eval()
    runner = get_runner(
        net, model_hash(net), backend, (g.tile_y, g.tile_x), torch.get_num_threads()
    )
    for b in range(1, int(cfg.batch_size) + 1):
        runner(np.zeros((b, int(net.in_channels), g.tile_y, g.tile_x), np.float32))


def worker(
    size: int, model: Path, reps: int = 1, backend: str = "auto", compare: bool = False
) -> dict[str, Any]:
    """Segment a ``size^2`` uint16 image; what the parent prints (runs in a subprocess).

    ``backend``: ``InferenceConfig.backend`` of the timed runs; ``compare``: also time
    ``backend="torch"`` (eager) in the same process, after the peak RSS was read.
    """
    from napari_s2mnet.checkpoint import load_model
    from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
    from napari_s2mnet.inference.backends import resolve_backend

    bundle = load_model(model)
    image = tiled_image(size)
    cfg = InferenceConfig(device="cpu", backend=backend)  # defaults: the model's own tile size
    ran = resolve_backend(backend, "cpu")
    stride = int(getattr(bundle.model, "stride", 1))
    tile = min(-(-bundle.tile_size // stride) * stride, -(-size // stride) * stride)
    if ran != "torch":
        warm_compiled(bundle, cfg, size, ran)
    # Warm up torch's kernels (with the tile shape of this size) so no size pays for it.
    run_to_end(segment_iter(image[:tile, :tile], bundle, cfg))
    # The machine may be shared: CPU time (all threads of this process) is what the comparison
    # uses, since wall time depends on what else runs. The raw network is timed in the same
    # process right before and after.
    raw_before = raw_cpu_seconds_per_tile(bundle.model, tile)
    base = _peak_rss_gb()
    rss_before = _status_gb("VmRSS")
    reset = _reset_peak_rss()
    wall = cpu = math.inf
    for _ in range(reps):  # the fastest repetition: the least disturbed by other load
        start, cpu0 = time.perf_counter(), time.process_time()
        res = run_to_end(segment_iter(image, bundle, cfg))
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - cpu0)
    peak = _peak_rss_gb()
    segment_peak = _status_gb("VmHWM") if reset else math.nan
    eager_wall = eager_cpu = math.nan
    if compare and ran != "torch":
        eager = InferenceConfig(device="cpu", backend="torch")
        run_to_end(segment_iter(image[:tile, :tile], bundle, eager))
        eager_wall = eager_cpu = math.inf
        for _ in range(reps):
            start, cpu0 = time.perf_counter(), time.process_time()
            run_to_end(segment_iter(image, bundle, eager))
            eager_wall = min(eager_wall, time.perf_counter() - start)
            eager_cpu = min(eager_cpu, time.process_time() - cpu0)
    raw = (raw_before + raw_cpu_seconds_per_tile(bundle.model, tile)) / 2
    return {
        "tile": tile,
        "raw_cpu_per_tile": raw,
        "cpu_s": cpu,
        "backend": res.backend,
        "eager_wall_s": eager_wall,
        "eager_cpu_s": eager_cpu,
        "size": size,
        "wall_s": wall,
        "timings": res.timings,
        "tiles": res.n_tiles,
        "objects": len(res.features),
        "labels_dtype": str(res.labels.dtype),
        "peak_rss_gb": peak,
        "base_rss_gb": base,
        "rss_before_segment_gb": rss_before,
        "segment_peak_rss_gb": segment_peak,
        "image_gb": image.nbytes / 1024**3,
        "device": res.device,
    }


def run_size(
    size: int, model: Path, timeout: float, reps: int, backend: str = "auto", compare: bool = False
) -> dict[str, Any]:
    """One size in a fresh process (under ``/usr/bin/time -v`` when present, for its peak RSS)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.inference",
        "--worker",
        str(size),
        "--model",
        str(model),
        "--reps",
        str(reps),
        "--backend",
        backend,
    ]
    if not compare:
        cmd.append("--no-compare")
    gnu_time = Path("/usr/bin/time")
    if gnu_time.is_file():
        cmd = [str(gnu_time), "-v", *cmd]
    out = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"size {size} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for line in out.stderr.splitlines():  # GNU time's report (KiB)
        if "Maximum resident set size" in line:
            result["time_v_rss_gb"] = int(line.rsplit(":", 1)[1]) / 1024**2
    return result


def fit_slope(rows: list[dict[str, Any]], key: str = "wall_s") -> float:
    """Slope of log(time) against log(pixels)."""
    px = np.log([r["size"] ** 2 for r in rows])
    t = np.log([r[key] for r in rows])
    return float(np.polyfit(px, t, 1)[0])


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, no 8192^2 check")
    p.add_argument("--arch", default="s2mnet", help="architecture (s2mnet, unet, dssau)")
    p.add_argument(
        "--width",
        choices=["small", "full"],
        default="small",
        help="small network (default, CPU friendly) or the architecture's defaults",
    )
    p.add_argument(
        "--bundled",
        action="store_true",
        help="segment with the bundled default model (no training; --arch/--width are ignored)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides to time")
    p.add_argument("--big", type=int, default=8192, help="side of the peak-RSS check (0: skip)")
    p.add_argument("--train-steps", type=int, default=None, help="brief training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tile",
        type=int,
        default=224,
        help="the model's tile size (default 224: the bundled model's training crop)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    p.add_argument(
        "--reps",
        type=int,
        default=2,
        help="repetitions per timed size (the fastest counts; the big check runs once)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        help="InferenceConfig.backend of the timed runs (default auto)",
    )
    p.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="do not also time backend='torch' (eager) at each timed size",
    )
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.model, args.reps, args.backend, args.compare)))
        return 0

    import torch

    from napari_s2mnet.inference import InferenceConfig
    from napari_s2mnet.inference.backends import CACHE_ENV, resolve_backend

    # A fresh compiled-model cache, shared by the size workers (each exports its tile once).
    cache = tempfile.TemporaryDirectory(prefix="s2m-bench-cache-")
    os.environ.setdefault(CACHE_ENV, cache.name)
    ran = resolve_backend(args.backend, "cpu")
    compare = args.compare and ran != "torch"
    sizes = args.sizes or ([256, 512, 1024] if args.quick else [512, 1024, 2048, 4096])
    big = 0 if args.quick else args.big
    steps = args.train_steps if args.train_steps is not None else (40 if args.quick else 150)
    machine = platform.processor() or platform.machine()
    print(
        f"# inference scaling  {time.strftime('%Y-%m-%d %H:%M')}  {machine}  "
        f"cores {os.cpu_count()}  load {os.getloadavg()[0]:.1f}"
        f"  torch {torch.__version__}  threads {torch.get_num_threads()}"
        f"  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundled:
            from napari_s2mnet.checkpoint import default_model_path, load_model
            from napari_s2mnet.model import count_parameters

            model = default_model_path()
            bundle = load_model(model)
            print(
                f"model: the bundled default ({model.name}), "
                f"{count_parameters(bundle.model):,} params, tile {bundle.tile_size}"
            )
        else:
            model = Path(tmp) / "bench.safetensors"
            info = make_model(args.arch, args.width, steps, args.seed, model, args.tile)
            print(
                f"model: {info['arch']} {info['options'] or '(default options)'}  "
                f"{info['params']:,} params  stride {info['stride']}  trained {info['steps']} "
                f"steps ({info['train_s']:.0f} s, loss {info['loss']:.3f})  threshold "
                f"{info['threshold']:.3f}  DSB2018 Dice {info['dice']:.2f}, "
                f"{info['objects']} objects"
            )
        print(
            f"inference: InferenceConfig defaults (tile {args.tile} = the model's own, overlap "
            f"{InferenceConfig().overlap}, batch {InferenceConfig().batch_size}), backend "
            f"{args.backend!r} -> {ran}"
            + (", compared with eager 'torch' in the same process" if compare else "")
        )
        if ran != "torch":
            print(
                "(compiled graphs exported and compiled before the timing: the one-time cost "
                "of a new model or tile shape is excluded)"
            )
        print(
            "times: wall seconds per stage; 'cpu s' = CPU seconds of the whole run (all threads;"
            " robust to\n  other load). Baseline: the raw network on a batch of 4 tiles in the "
            "same process\n  ('raw cpu/t' = its CPU s per tile); 'vs raw' = raw CPU time of the "
            "tiles / CPU time of the run\n"
        )
        header = (
            f"{'size':>6} {'Mpx':>6} {'tile':>4} {'tiles':>5} {'tiles/s':>7} {'wall s':>7} "
            f"{'predict':>8} "
            f"{'post':>6} {'feat':>6} {'cpu s':>7} {'cpu/Mpx':>7} {'raw cpu/t':>9} "
            f"{'vs raw':>6} {'objects':>7} {'peak RSS':>9} {'growth':>7}"
            + (f" {'eager cpu s':>11} {'cpu ratio':>9} {'wall ratio':>10}" if compare else "")
        )
        print(header)
        print("-" * len(header))
        rows = []
        for size in [*sizes, *([big] if big else [])]:
            timed_size = size in sizes
            r = run_size(
                size,
                model,
                args.timeout,
                args.reps if timed_size else 1,
                args.backend,
                compare and timed_size,
            )
            rows.append(r)
            t = r["timings"]
            mpx = size * size / 1e6
            vs_raw = r["tiles"] * r["raw_cpu_per_tile"] / r["cpu_s"]
            tps = r["tiles"] / max(t["predict"], 1e-9)  # tiles through the network per second
            print(
                f"{size:>6} {mpx:>6.2f} {r['tile']:>4} {r['tiles']:>5} {tps:>7.1f} "
                f"{r['wall_s']:>7.2f} "
                f"{t['predict']:>8.2f} {t['postprocess']:>6.2f} {t['features']:>6.2f} "
                f"{r['cpu_s']:>7.2f} {r['cpu_s'] / mpx:>7.2f} {r['raw_cpu_per_tile']:>9.3f} "
                f"{vs_raw:>6.2f} {r['objects']:>7} {r['peak_rss_gb']:>7.2f}GB "
                f"{r['peak_rss_gb'] - r['base_rss_gb']:>5.2f}GB"
                + (
                    f" {r['eager_cpu_s']:>11.2f} {r['cpu_s'] / r['eager_cpu_s']:>9.2f} "
                    f"{r['wall_s'] / r['eager_wall_s']:>10.2f}"
                    if compare and timed_size
                    else ""
                ),
                flush=True,
            )
        timed = [r for r in rows if r["size"] in sizes]
        print()
        if len(timed) >= 2:
            slope = fit_slope(timed)
            cpu = fit_slope(timed, "cpu_s")
            span = f"{timed[0]['size']}^2..{timed[-1]['size']}^2"
            print(
                f"log-log slope of time vs pixels ({span}): {cpu:.3f} CPU time, {slope:.3f} wall "
                f"clock (goal <= 1.1: {'OK' if cpu <= 1.1 else 'ABOVE GOAL'})"
            )
            tiles = np.polyfit(
                np.log([r["size"] ** 2 for r in timed]), np.log([r["tiles"] for r in timed]), 1
            )[0]
            print(
                f"(the tile count alone grows with slope {tiles:.3f}: overlapping tiles on "
                "small images)"
            )
            if len(timed) >= 3:
                print(
                    f"largest three sizes (tiled regime): {fit_slope(timed[-3:], 'cpu_s'):.3f} CPU time, "
                    f"{fit_slope(timed[-3:]):.3f} wall clock"
                )
        if big:
            r = rows[-1]
            ok = r["peak_rss_gb"] <= RSS_LIMIT_GB
            tv = r.get("time_v_rss_gb")
            print(
                f"{big}^2 uint16 ({r['image_gb']:.2f} GB image), backend {r['backend']}: peak "
                f"RSS {r['peak_rss_gb']:.2f} GB"
                + (f" (/usr/bin/time -v: {tv:.2f} GB)" if tv is not None else "")
                + " "
                f"(limit {RSS_LIMIT_GB:.0f} GB: {'PASS' if ok else 'FAIL'}), "
                f"{r['objects']} objects, labels {r['labels_dtype']}, {r['wall_s']:.0f} s"
            )
            return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
