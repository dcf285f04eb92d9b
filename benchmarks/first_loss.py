"""Seconds from Run to the first loss point, and steps per minute, per fine-tune scope (issue 14).

Usage::

    python -m benchmarks.first_loss                   # 5 runs per scope, 2 threads, 20 s each
    python -m benchmarks.first_loss --threads 1 --runs 3 --seconds 10
    python -m benchmarks.first_loss --data bbbc007 --k 1000 --scopes decoder+head  # dense

What is timed is what the Fine-tune widget does after Run (its warm-up already ran when the widget
opened: :func:`napari_s2mnet.training.loop.warm_up`): :func:`finetune` on the bundled model with
:meth:`FinetuneConfig.interactive` (CPU preset), one 256 x 256 DSB2018 tile whose model output has
its 5 worst objects (``--k``) fixed by the simulated annotator of
:mod:`benchmarks.hitl_annotator`. ``--data bbbc007``: the seven BBBC007 images 0-6 (450^2, ~80
nuclei each) instead, where ``--k 1000`` corrects every object (~565 regions: a user who corrected
whole images).
Reported per scope: median wall seconds to the first loss point, the share of the budget spent
before the first step (preparation and the starting model's validation), steps per minute (wall),
CPU seconds per step, and the median seconds from the last step to the result (the checks on the
corrected regions and the batch-norm recalibration, while the user waits).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    from benchmarks.fetch_data import load_bbbc007, load_dsb2018
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
    p.add_argument("--k", type=int, default=5, help="objects the annotator fixes")
    p.add_argument("--data", choices=["dsb-tile", "bbbc007"], default="dsb-tile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warm_up()
    if args.data == "bbbc007":
        pool = [(im, lab) for _, im, lab in load_bbbc007()[:7]]
    else:
        img, gt = load_dsb2018()
        pool = [(img[256:, 256:], gt[256:, 256:])]
    model = load_default_model()
    cfg0 = InferenceConfig(device="cpu", compute_features=False, backend="torch")
    preds = [segment(im, model, cfg0)[0] for im, _ in pool]
    fixes = annotate(preds, [g for _, g in pool], args.k)
    pairs = [(pool[i][0], lab) for i, lab, _ in fixes]
    masks = [m for _, _, m in fixes]
    print(
        f"# first_loss: torch {torch.__version__}, threads {args.threads}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {args.seconds:g} s per run, {args.data}, "
        f"k {args.k}, {len(pairs)} image(s)"
    )
    print(
        "| scope | first loss point (s, median) | preparation + first validation / budget | "
        "steps/min | "
        "CPU s/step | last step to result (s, median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for scope in args.scopes:
        firsts, shares, rates, cpu, ends = [], [], [], [], []
        for run in range(args.runs):
            cfg = FinetuneConfig.interactive("cpu", seconds=args.seconds, scope=scope, seed=run)
            t0, c0 = time.perf_counter(), time.process_time()
            gen = finetune(pairs, model, cfg, corrected=masks)
            first = None
            overhead = 0.0
            last_t = last_step = t0
            try:
                while True:
                    r = next(gen)
                    now = time.perf_counter()
                    if r.step == 0 and r.loss != r.loss:  # the start report: preparation and
                        overhead += now - last_t  # the starting model's validation
                    if r.step >= 1 and r.loss == r.loss:
                        first = now - t0 if first is None else first
                        last_step = now
                    last_t = now
            except StopIteration as stop:
                res = stop.value
            c1 = time.process_time()
            firsts.append(first if first is not None else float("nan"))
            shares.append(overhead / args.seconds)
            rates.append(60.0 * res.steps / max(res.elapsed, 1e-9))
            cpu.append((c1 - c0) / max(res.steps, 1))
            ends.append(last_t - last_step)  # the last report is the summary, after the checks
        print(
            f"| {scope} | {statistics.median(firsts):.1f} | {statistics.fmean(shares):.0%} | "
            f"{statistics.fmean(rates):.0f} | {statistics.fmean(cpu):.2f} | "
            f"{statistics.median(ends):.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
