"""Seconds from Run to the first loss point, and steps per minute, per fine-tune scope (issue 14).

Usage::

    python -m benchmarks.first_loss                   # 5 runs per scope, 2 threads, 20 s each
    python -m benchmarks.first_loss --threads 1 --runs 3 --seconds 10

What is timed is what the Fine-tune widget does after Run (its warm-up already ran when the widget
opened: :func:`napari_s2mnet.training.loop.warm_up`): :func:`finetune` on the bundled model with
:meth:`FinetuneConfig.interactive` (CPU preset), one 256 x 256 DSB2018 tile whose model output has
its 5 worst objects fixed by the simulated annotator of :mod:`benchmarks.hitl_annotator`.
Reported per scope: median wall seconds to the first loss point, the share of the budget spent
before the first step (preparation and the starting model's validation), steps per minute (wall),
CPU seconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    from benchmarks.fetch_data import load_dsb2018
    from benchmarks.hitl_annotator import annotate
    from napari_s2mnet.checkpoint import load_default_model
    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.training import FinetuneConfig, finetune
    from napari_s2mnet.training.loop import warm_up

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--scopes", nargs="+", default=["all", "decoder+head", "head+norm"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warm_up()
    img, gt = load_dsb2018()
    img, gt = img[256:, 256:], gt[256:, 256:]
    model = load_default_model()
    pred = segment(
        img, model, InferenceConfig(device="cpu", compute_features=False, backend="torch")
    )[0]
    _, labels, mask = annotate([pred], [gt], 5)[0]
    print(
        f"# first_loss: torch {torch.__version__}, threads {args.threads}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {args.seconds:g} s per run"
    )
    print(
        "| scope | first loss point (s, median) | preparation + first validation / budget | "
        "steps/min | "
        "CPU s/step |"
    )
    print("|---|---:|---:|---:|---:|")
    for scope in args.scopes:
        firsts, shares, rates, cpu = [], [], [], []
        for run in range(args.runs):
            cfg = FinetuneConfig.interactive("cpu", seconds=args.seconds, scope=scope, seed=run)
            t0, c0 = time.perf_counter(), time.process_time()
            gen = finetune([(img, labels)], model, cfg, corrected=[mask])
            first = None
            overhead = 0.0
            last_t = t0
            try:
                while True:
                    r = next(gen)
                    now = time.perf_counter()
                    if r.step == 0 and r.loss != r.loss:  # the start report: preparation and
                        overhead += now - last_t  # the starting model's validation
                    if first is None and r.step >= 1 and r.loss == r.loss:
                        first = now - t0
                    last_t = now
            except StopIteration as stop:
                res = stop.value
            c1 = time.process_time()
            firsts.append(first if first is not None else float("nan"))
            shares.append(overhead / args.seconds)
            rates.append(60.0 * res.steps / max(res.elapsed, 1e-9))
            cpu.append((c1 - c0) / max(res.steps, 1))
        print(
            f"| {scope} | {statistics.median(firsts):.1f} | {statistics.fmean(shares):.0%} | "
            f"{statistics.fmean(rates):.0f} | {statistics.fmean(cpu):.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
