"""How fast Stop ends a fine-tuning run, against the duration of one training step.

Usage::

    python -m benchmarks.stop_latency             # bundled S2M-Net, CPU, about 2 minutes
    python -m benchmarks.stop_latency --crop-size 384 --batch-size 8

What the Fine-tune widget does, without the widget: :func:`napari_s2mnet.training.finetune` runs
in a worker thread (as napari's thread worker runs it) on the DSB2018 sample from the bundled
model; after a random delay from the start of the run (anywhere from data preparation to the
third step) the main thread calls :meth:`~napari_s2mnet.training.FinetuneControl.stop_now`, as
the widget's Stop does, and measures

* the time until ``stop_now`` returned: the model the user gets (the best state so far, or
  ``None`` = the previous model stays), usable at once;
* the time until the worker itself has returned (it finishes the step in flight; a backward pass
  cannot be interrupted).

The baseline, measured in the same process first, is the median duration of a full training step
(a run of ``--baseline-steps`` steps): what Stop would cost on average if it waited for the step
in flight to end.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import numpy as np

from benchmarks.fetch_data import load_dsb2018


def step_seconds(pairs, bundle, cfg, n: int) -> list[float]:
    """Durations of steps 2..n of an uninterrupted run (step 1 includes warm-up)."""
    import dataclasses

    from napari_s2mnet.training import finetune

    cfg = dataclasses.replace(cfg, seconds=None, epochs=1, steps_per_epoch=n)
    times, last = [], None
    for rep in finetune(pairs, bundle, cfg):
        now = time.perf_counter()
        if 1 < rep.step <= n and last is not None and rep.val_dice is None:
            times.append(now - last)
        last = now
    return times


def one_stop(pairs, bundle, cfg, delay: float) -> tuple[float, bool, float, int]:
    """One run stopped ``delay`` s after its start: (stop_now s, got a model, worker s, steps)."""
    from napari_s2mnet.inference import run_to_end
    from napari_s2mnet.training import FinetuneControl, finetune

    control = FinetuneControl()
    done = threading.Event()
    out: dict[str, object] = {}

    def work() -> None:
        out["result"] = run_to_end(finetune(pairs, bundle, cfg, control=control))
        done.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    time.sleep(delay)
    t0 = time.perf_counter()
    result = control.stop_now()
    now = time.perf_counter() - t0
    done.wait()
    returned = time.perf_counter() - t0
    thread.join()
    return now, result is not None, returned, out["result"].steps


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import torch

    from napari_s2mnet.checkpoint import load_default_model
    from napari_s2mnet.training import FinetuneConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-steps", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    image, labels = load_dsb2018()
    bundle = load_default_model("cpu")
    # No validation split: every applied step is then the run's result, so stop_now has a model
    # to hand out from the first step on (with validation it returns None until the first
    # validated improvement, and the previous model stays: also immediate).
    cfg = FinetuneConfig(
        seconds=600,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        device="cpu",
        seed=args.seed,
        val_fraction=0.0,
    )
    rng = np.random.default_rng(args.seed)
    print(
        f"# stop latency: torch {torch.__version__}, cpu, threads {args.threads}, "
        f"{platform.processor() or platform.machine()}; bundled S2M-Net, batch "
        f"{args.batch_size} x {args.crop_size}^2, {args.runs} runs"
    )
    steps = step_seconds([(image, labels)], bundle, cfg, args.baseline_steps)
    step = statistics.median(steps)
    print(f"# baseline: {len(steps)} uninterrupted steps, median {step:.3f} s", flush=True)
    now, returned = [], []
    for run in range(args.runs):
        delay = float(rng.uniform(0.0, 3.0)) * step  # from data preparation to the third step
        t_now, got, t_ret, done = one_stop([(image, labels)], bundle, cfg, delay)
        now.append(t_now)
        returned.append(t_ret)
        what = "best state so far" if got else "None: previous model kept"
        print(
            f"# run {run}: stop {delay:.2f} s after the start -> stop_now {t_now:.3f} s "
            f"({what}), worker returned after {t_ret:.3f} s ({done} steps done)",
            flush=True,
        )
    print()
    print("| measure | median s | max s | / median step |")
    print("|---|---:|---:|---:|")
    print(
        f"| Stop (stop_now) -> usable model | {statistics.median(now):.3f} | {max(now):.3f} | "
        f"{statistics.median(now) / step:.3f} |"
    )
    print(
        f"| Stop -> worker returned | {statistics.median(returned):.3f} | {max(returned):.3f} | "
        f"{statistics.median(returned) / step:.2f} |"
    )
    print(f"| one training step (baseline) | {step:.3f} | {max(steps):.3f} | 1.00 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
