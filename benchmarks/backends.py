"""Compiled CPU backends against eager torch and smp U-Net ResNet34, in one run (issue 18).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.backends --threads 1
    # with the smp peer (needs torchvision; see benchmarks/accuracy.py for .venv-peers):
    OMP_NUM_THREADS=1 .venv-peers/bin/python -m benchmarks.backends --threads 1

Forward pass of the bundled S2M-Net (1 x 1 x 352^2) with eager torch, OpenVINO and ONNX Runtime
(BN-folded ONNX graph), and smp U-Net ResNet34 eager when importable, timed round-robin
(median CPU seconds of the process: robust to other load on a shared machine). Then
``segment()`` on a 1024^2 image (the bundled sample tiled) with ``backend="auto"`` against
``backend="torch"`` (compile cached beforehand, as after the first run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def _median_cpu(fns: dict, reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=352)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NAPARI_S2MNET_CACHE_DIR", tempfile.mkdtemp(prefix="s2m-cache-"))

    from napari_s2mnet._sample_data import load_nuclei
    from napari_s2mnet.checkpoint import load_default_model, model_hash
    from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
    from napari_s2mnet.inference.backends import available_backends, get_runner

    bundle = load_default_model()
    model = bundle.model.eval()
    s = args.size
    x = torch.rand(1, 1, s, s)
    h = model_hash(model)
    fns = {"torch eager": lambda: model(x)}
    for be in available_backends():
        runner = get_runner(model, h, be, (s, s), args.threads)
        fns[be] = lambda r=runner: r(x.numpy())
    try:
        import segmentation_models_pytorch as smp

        peer = smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=1).eval()
        fns["smp U-Net ResNet34 eager"] = lambda: peer(x)
    except Exception as exc:  # any import problem (e.g. torchvision): report and go on
        print(f"(smp peer not available: {type(exc).__name__}: {exc})")
    with torch.inference_mode():
        t = _median_cpu(fns, args.reps)
    base = t["torch eager"]
    smp_t = t.get("smp U-Net ResNet34 eager")
    print(f"forward 1 x 1 x {s}^2, {args.threads} thread(s), median CPU s over {args.reps}:")
    for k, v in t.items():
        extra = f"  x{v / smp_t:.2f} of smp" if smp_t else ""
        print(f"  {k:28s} {v * 1e3:8.0f} ms  x{v / base:.2f} of eager{extra}")

    image = np.tile(load_nuclei()[0], (2, 2))  # 1024 x 1024 real nuclei
    runs = {}
    for be in ("auto", "torch"):
        cfg = InferenceConfig(backend=be, compute_features=False)
        run_to_end(segment_iter(image, bundle, cfg))  # warm-up (compiles once, cached)
    for _ in range(max(1, args.reps // 2)):
        for be in ("auto", "torch"):
            cfg = InferenceConfig(backend=be, compute_features=False)
            t0 = time.process_time()
            res = run_to_end(segment_iter(image, bundle, cfg))
            runs.setdefault(be, []).append(time.process_time() - t0)
            runs.setdefault(be + "_name", res.backend)
    a, b = statistics.median(runs["auto"]), statistics.median(runs["torch"])
    print(
        f"segment() 1024^2: auto ({runs['auto_name']}) {a:.2f} s, torch {b:.2f} s, "
        f"ratio {a / b:.2f}"
    )


if __name__ == "__main__":
    main()
