"""Training speed: time per step and time to a held-out Dice target, S2M-Net vs the U-Net baseline.

Usage::

    python -m benchmarks.finetune --quick          # CPU, a few minutes on 2 cores
    python -m benchmarks.finetune                  # 3 seeds, larger budget
    python -m benchmarks.finetune --device cuda    # on a GPU (mixed precision)

Protocol: both networks start from a random initialisation (same seed), train with the same
:class:`~napari_s2mnet.training.FinetuneConfig` (MASL, Adam, warm-up + cosine, crops with
augmentation) on three 256 x 256 quadrants of the DSB2018 nuclei image (manual ground truth),
and are validated every ``--val-every`` steps on the fourth quadrant, which they never train on.
A run stops when the held-out Dice reaches ``--target`` or after ``--max-steps``.

The two runs are interleaved step by step (one step of each in turn), so background load on a
shared machine slows both alike. Per architecture it reports the median seconds (wall and
process CPU) per optimisation step, the steps and the training time (steps x median step time,
validation excluded) to reach the target, the best held-out Dice, and the ratios S2M-Net / U-Net.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Any

import torch

from benchmarks.fetch_data import dsb2018_quadrants
from napari_s2mnet.checkpoint import new_model
from napari_s2mnet.model import ModelConfig, count_parameters
from napari_s2mnet.training import FinetuneConfig, FinetuneControl, finetune

ARCHS = ("s2mnet", "unet")
BASELINE = "unet"


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Train both architectures interleaved; per-arch measurements."""
    quads = dsb2018_quadrants()
    train_pairs, held_out = quads[:3], [quads[3]]
    opts = {} if args.bn_momentum is None else {"bn_momentum": args.bn_momentum}
    steps_per_epoch = args.val_every
    cfg = FinetuneConfig(
        epochs=math.ceil(args.max_steps / steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        lr=args.lr,
        loss=args.loss,
        device=args.device,
        seed=seed,
        patience=None,
    )
    gens, controls, out = {}, {}, {}
    for arch in ARCHS:
        torch.manual_seed(seed)
        bundle = new_model(ModelConfig(arch=arch, in_channels=1, options=dict(opts)))
        controls[arch] = FinetuneControl()
        gens[arch] = finetune(train_pairs, bundle, cfg, control=controls[arch], val_pairs=held_out)
        out[arch] = {
            "params": count_parameters(bundle.model),
            "step_wall": [],
            "step_cpu": [],
            "target_step": None,
            "best": 0.0,
            "wall": 0.0,
            "curve": [],
        }
    active = list(ARCHS)
    while active:
        for arch in list(active):
            t, c = time.perf_counter(), time.process_time()
            try:
                rep = next(gens[arch])
            except StopIteration as stop:
                out[arch]["reason"] = stop.value.stopped_reason
                out[arch]["steps"] = stop.value.steps
                active.remove(arch)
                continue
            dt, dc = time.perf_counter() - t, time.process_time() - c
            rec = out[arch]
            rec["wall"] += dt
            if rep.step > 0 and rep.val_dice is None and math.isfinite(rep.loss):
                rec["step_wall"].append(dt)  # a pure training step (no validation in it)
                rec["step_cpu"].append(dc)
            if rep.val_dice is not None:
                rec["curve"].append((rep.step, rep.val_dice))
                rec["best"] = max(rec["best"], rep.val_dice)
                if rec["target_step"] is None and rep.val_dice >= args.target:
                    rec["target_step"] = rep.step
                    rec["target_wall"] = rec["wall"]
                    controls[arch].stop()
    for rec in out.values():
        rec["s_step"] = statistics.median(rec["step_wall"][1:] or rec["step_wall"])
        rec["cpu_step"] = statistics.median(rec["step_cpu"][1:] or rec["step_cpu"])
        rec["t_target"] = (
            rec["target_step"] * rec["s_step"] if rec["target_step"] is not None else None
        )
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "not reached" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, crops 128, <= 100 steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--target", type=float, default=0.80, help="held-out Dice target")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=None)
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak lr (1e-3: training from scratch; the paper's 1e-4 is for 150 epochs)",
    )
    p.add_argument("--loss", default="masl")
    p.add_argument(
        "--bn-momentum",
        type=float,
        default=None,
        help="override both networks' BatchNorm momentum (default: their own 0.01)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.max_steps = args.max_steps or (100 if args.quick else 400)
    args.crop_size = args.crop_size or (128 if args.quick else 256)

    from napari_s2mnet.devices import describe_device, resolve_device

    print(
        f"# fine-tune benchmark: {describe_device(resolve_device(args.device))}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(
        f"# DSB2018: train 3 quadrants, held-out 4th; loss {args.loss}, batch {args.batch_size}"
        f", crop {args.crop_size}, lr {args.lr:g}, target Dice {args.target}, max "
        f"{args.max_steps} steps, validation every {args.val_every}, seeds {args.seeds}"
    )
    runs = [run_seed(s, args) for s in args.seeds]

    def mean(key: str, arch: str) -> float | None:
        vals = [r[arch][key] for r in runs]
        return None if any(v is None for v in vals) else statistics.fmean(vals)

    header = (
        f"{'model':8} {'params':>10} {'s/step':>8} {'cpu s/step':>10} "
        f"{'steps->target':>14} {'time->target s':>15} {'best Dice':>9}"
    )
    print(header)
    print("-" * len(header))
    for arch in ARCHS:
        print(
            f"{arch:8} {runs[0][arch]['params']:>10,} {mean('s_step', arch):>8.3f} "
            f"{mean('cpu_step', arch):>10.3f} {_fmt(mean('target_step', arch), '.0f'):>14} "
            f"{_fmt(mean('t_target', arch), '.1f'):>15} {mean('best', arch):>9.3f}"
        )
    print(
        f"ratio s2mnet/{BASELINE}: s/step {_ratio(mean('s_step', 's2mnet'), mean('s_step', BASELINE))}"
        f", cpu s/step {_ratio(mean('cpu_step', 's2mnet'), mean('cpu_step', BASELINE))}"
        f", steps->target {_ratio(mean('target_step', 's2mnet'), mean('target_step', BASELINE))}"
        f", time->target {_ratio(mean('t_target', 's2mnet'), mean('t_target', BASELINE))}"
    )
    for s, r in zip(args.seeds, runs, strict=True):
        for arch in ARCHS:
            curve = " ".join(f"{st}:{d:.2f}" for st, d in r[arch]["curve"])
            print(f"# seed {s} {arch:7} held-out Dice by step: {curve}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
