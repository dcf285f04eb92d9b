"""Soak test: many ``segment`` calls and short fine-tunes in one process; does memory or the
thread count creep?

Usage::

    python -m benchmarks.soak                         # 500 segment calls + 50 fine-tunes (long)
    python -m benchmarks.soak --segments 100 --finetunes 10 --size 128   # a quick run

What a long napari session does, without the GUI: the bundled S2M-Net segments a crop of the
DSB2018 sample ``--segments`` times (default settings, CPU), and ``--finetunes`` short
fine-tuning runs (``--steps`` steps each, from the bundled model, on the same crop and its manual
labels) are interleaved evenly. Resident memory (RSS) and the number of OS threads are read at
the start (after imports), after one warm-up call of each kind (the baseline: caches, thread
pools and allocator arenas filled), at every tenth of the run, and at the end. The result is the
end value against the baseline measured in the same run, as a ratio; per-call growth is the slope
of RSS over the second half of the run (first-half growth includes allocator warm-up).
"""

from __future__ import annotations

import argparse
import gc
import platform
import threading
import time

import numpy as np


def _probe() -> tuple[float, int, int]:
    """(RSS in MiB, OS threads of this process, Python threads)."""
    import psutil

    proc = psutil.Process()
    return proc.memory_info().rss / 2**20, proc.num_threads(), threading.active_count()


def main(argv: list[str] | None = None) -> int:
    """Run the soak test and print the table for docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=500, help="segment calls")
    parser.add_argument("--finetunes", type=int, default=50, help="short fine-tuning runs")
    parser.add_argument("--steps", type=int, default=2, help="steps per fine-tuning run")
    parser.add_argument("--size", type=int, default=256, help="side of the image crop")
    args = parser.parse_args(argv)

    import torch

    from napari_s2mnet._sample_data import load_nuclei
    from napari_s2mnet.checkpoint import load_default_model
    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.training import FinetuneConfig, finetune

    rows: list[tuple[str, float, int, int]] = [("start (after imports)", *_probe())]
    image, labels = load_nuclei()
    image, labels = image[: args.size, : args.size], labels[: args.size, : args.size]
    bundle = load_default_model()
    seg_cfg = InferenceConfig(device="cpu")
    ft_cfg = FinetuneConfig(
        epochs=1,
        steps_per_epoch=args.steps,
        batch_size=2,
        crop_size=min(128, args.size),
        val_fraction=0.0,
        device="cpu",
    )

    def one_segment() -> int:
        lab, _ = segment(image, bundle, seg_cfg)
        return int(lab.max())

    def one_finetune() -> int:
        gen = finetune([(image, labels)], bundle, ft_cfg)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return int(stop.value.steps)

    t0 = time.perf_counter()
    n_objects = one_segment()
    one_finetune()
    gc.collect()
    rows.append(("after warm-up (baseline)", *_probe()))
    base_rss, base_threads = rows[-1][1], rows[-1][2]

    every = max(1, args.segments // max(1, args.finetunes)) if args.finetunes else 0
    checkpoints = {max(1, round(args.segments * k / 10)) for k in range(1, 11)}
    half: list[tuple[int, float]] = []
    done_ft = 0
    t_seg = t_ft = 0.0
    for i in range(1, args.segments + 1):
        t = time.perf_counter()
        if one_segment() != n_objects:
            raise SystemExit(f"segment call {i} gave a different result; not a soak any more")
        t_seg += time.perf_counter() - t
        if every and i % every == 0 and done_ft < args.finetunes:
            t = time.perf_counter()
            assert one_finetune() == args.steps
            t_ft += time.perf_counter() - t
            done_ft += 1
        if i in checkpoints:
            gc.collect()
            probe = _probe()
            rows.append((f"after {i} segments, {done_ft} fine-tunes", *probe))
            if i >= args.segments / 2:
                half.append((i, probe[0]))
    while done_ft < args.finetunes:  # segments < finetunes: the rest at the end
        one_finetune()
        done_ft += 1
    gc.collect()
    rows.append(("end", *_probe()))
    wall = time.perf_counter() - t0

    print(
        f"# soak: {args.segments} segment calls ({args.size}^2 crop of the DSB2018 sample, "
        f"{n_objects} objects) + {done_ft} fine-tunes of {args.steps} steps, one process"
    )
    print(
        f"# {platform.platform()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; wall {wall:.0f} s (segment {t_seg / max(1, args.segments):.2f} s "
        f"per call, fine-tune {t_ft / max(1, done_ft):.2f} s per run)"
    )
    print()
    print("| point | RSS MiB | vs baseline | OS threads | Python threads |")
    print("|---|---:|---:|---:|---:|")
    for name, rss, threads, py in rows:
        print(f"| {name} | {rss:.0f} | {rss / base_rss:.3f} | {threads} | {py} |")
    if len(half) >= 2:
        xs, ys = np.array([h[0] for h in half], float), np.array([h[1] for h in half])
        slope = float(np.polyfit(xs, ys, 1)[0]) if np.ptp(xs) > 0 else 0.0
        print(f"\nRSS slope over the second half: {slope * 1024:.1f} KiB per segment call")
    end_rss, end_threads = rows[-1][1], rows[-1][2]
    print(
        f"RSS end / baseline: {end_rss / base_rss:.3f}; threads end - baseline: "
        f"{end_threads - base_threads:+d}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
