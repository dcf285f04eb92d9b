"""Speed of S2M-Net against the equal-parameter U-Net baseline, measured in the same run.

Usage::

    python -m benchmarks.model_speed --quick              # CPU, a few minutes on 2 cores
    python -m benchmarks.model_speed                      # CPU, full (sizes up to 1024^2)
    python -m benchmarks.model_speed --device cuda        # + fp32 / bf16 batch sweep on a GPU
    python -m benchmarks.model_speed --profile            # + per-block breakdown of S2M-Net
    python -m benchmarks.model_speed --backend openvino   # compiled S2M-Net (default: auto)

Every table prints ratios against the U-Net baseline (``unet``) measured in the same process,
with the models timed round-robin (one call each per repetition) so background load hits all
of them alike. Times are medians over the repetitions, after warm-up. The size sweep fits the
slope of log(time) against log(pixels): 1.0 means time grows linearly with the pixel count.

``--backend auto|torch|openvino|onnxruntime`` (CPU only; default ``auto``: the compiled runtime
``InferenceConfig(backend="auto")`` would pick): S2M-Net's forward is also timed through that
runtime (BN-folded ONNX graph, ``napari_s2mnet.inference.backends``) in the same round-robin,
as the row ``s2mnet[<backend>]``, with its ratio to eager S2M-Net. Exporting and compiling happen
before the timing (once per input size).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from napari_s2mnet.model import ModelConfig, build_model, count_parameters

PAPER_SCALING_MS = {256: 6.8, 352: 10.1, 512: 18.7, 768: 38.2}  # methods.md §1.6 (P100, batch 8)
BASELINE = "unet"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK: Callable[[], float] = time.perf_counter  # --clock thread: time.thread_time


def round_robin(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function (``CLOCK``), timed in interleaved order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            start = CLOCK()
            fn()
            _sync(device)
            times[name].append(CLOCK() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def forward_fn(
    model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> Callable[[], Any]:
    """Inference call: eval mode, no grad, optional autocast."""
    model.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            if autocast_dtype is None:
                return model(x)
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                return model(x)

    return run


def compiled_fn(model: nn.Module, x: torch.Tensor, backend: str) -> Callable[[], Any]:
    """Forward of ``model`` through a compiled runtime on ``x``'s shape (exported here, once)."""
    import tempfile

    from napari_s2mnet.checkpoint import model_hash
    from napari_s2mnet.inference.backends import CACHE_ENV, get_runner

    os.environ.setdefault(CACHE_ENV, tempfile.mkdtemp(prefix="s2m-speed-"))
    model.eval()
    runner = get_runner(
        model, model_hash(model), backend, tuple(x.shape[-2:]), torch.get_num_threads()
    )
    xn = x.cpu().numpy()
    runner(xn)  # compile for this batch size outside the timing
    return lambda: runner(xn)


def compiled_backend(name: str, device: torch.device) -> str | None:
    """The compiled runtime to time next to eager S2M-Net, or None (``torch`` / a GPU)."""
    from napari_s2mnet.inference.backends import resolve_backend

    be = resolve_backend(name, device.type)
    return None if be == "torch" else be


def train_fn(
    model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> Callable[[], Any]:
    """One optimisation step: forward, BCE-with-logits, backward, Adam step."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    out_ch = getattr(model, "num_classes", 1)
    target = (torch.rand(x.shape[0], out_ch, *x.shape[-2:], device=x.device) > 0.5).float()

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        if autocast_dtype is None:
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), target)
        else:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                logits = model(x)
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return run


def gmac(model: nn.Module, size: int, in_channels: int = 3) -> float:
    """Conv/linear multiply-accumulates (GMAC) of one forward at ``size^2`` (FFTs excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.rand(1, in_channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def loglog_slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(pixel count)."""
    xs = [math.log(s * s) for s in sizes]
    ys = [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
    den = sum((a - mx) ** 2 for a in xs)
    return num / den


def build(arch: str, device: torch.device) -> nn.Module:
    """A fresh model of the default configuration."""
    torch.manual_seed(0)
    return build_model(ModelConfig(arch)).to(device)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain Markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "| " + " | ".join(f"{{:{w}s}}" for w in widths) + " |"
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def bench_main(
    archs: list[str],
    device: torch.device,
    size: int,
    reps: int,
    warmup: int,
    train_batch: int,
    backend: str | None = None,
) -> None:
    """Forward and train-step time of every architecture at ``size^2``."""
    models = {a: build(a, device) for a in archs}
    x1 = torch.rand(1, 3, size, size, device=device)
    xb = torch.rand(train_batch, 3, size, size, device=device)
    fns = {a: forward_fn(m, x1) for a, m in models.items()}
    comp = f"s2mnet[{backend}]" if backend and "s2mnet" in models else None
    if comp:
        fns[comp] = compiled_fn(models["s2mnet"], x1, backend)
    fwd = round_robin(fns, reps, warmup, device)
    trn = round_robin({a: train_fn(m, xb) for a, m in models.items()}, reps, warmup, device)
    macs = {a: gmac(build(a, torch.device("cpu")), size) for a in archs}
    rows = []
    for a, m in models.items():
        rows.append(
            [
                a,
                f"{count_parameters(m) / 1e6:.3f}M",
                f"{macs[a]:.2f}",
                f"{fwd[a] * 1e3:.1f}",
                f"{fwd[a] / fwd[BASELINE]:.2f}",
                f"{trn[a] * 1e3:.1f}",
                f"{trn[a] / trn[BASELINE]:.2f}",
            ]
        )

    print(
        f"\n## {device.type.upper()} fp32, {size}x{size}: forward (batch 1) and train step "
        f"(batch {train_batch}, fwd+bwd+Adam), median of {reps}"
    )
    if comp:
        m = models["s2mnet"]
        rows.append(
            [
                comp,
                f"{count_parameters(m) / 1e6:.3f}M",
                f"{macs['s2mnet']:.2f}",
                f"{fwd[comp] * 1e3:.1f}",
                f"{fwd[comp] / fwd[BASELINE]:.2f}",
                "-",
                "-",
            ]
        )
    header = ["model", "params", "GMAC", "fwd ms", f"fwd / {BASELINE}", "train ms"]
    header.append(f"train / {BASELINE}")
    print(table(header, rows))
    if comp:
        print(f"{comp} / s2mnet eager forward: {fwd[comp] / fwd['s2mnet']:.2f}")


def bench_sizes(
    archs: list[str],
    device: torch.device,
    sizes: list[int],
    reps: int,
    warmup: int,
    backend: str | None = None,
) -> None:
    """Forward time against input size, with the fitted log-log slope."""
    models = {a: build(a, device) for a in archs}
    archs = list(archs)
    comp = f"s2mnet[{backend}]" if backend and "s2mnet" in models else None
    if comp:
        archs.insert(archs.index("s2mnet") + 1, comp)
    results: dict[str, list[float]] = {a: [] for a in archs}
    for s in sizes:
        x = torch.rand(1, 3, s, s, device=device)
        fns = {a: forward_fn(m, x) for a, m in models.items()}
        if comp:
            fns[comp] = compiled_fn(models["s2mnet"], x, backend)
        med = round_robin(fns, reps, warmup, device)
        for a in archs:
            results[a].append(med[a])
    header = [
        "size",
        *(f"{a} ms" for a in archs),
        *(f"{a}/{BASELINE}" for a in archs if a != BASELINE),
    ]
    rows = []
    for i, s in enumerate(sizes):
        row = [f"{s}^2", *(f"{results[a][i] * 1e3:.1f}" for a in archs)]
        row += [f"{results[a][i] / results[BASELINE][i]:.2f}" for a in archs if a != BASELINE]
        rows.append(row)
    slopes = ["slope", *(f"{loglog_slope(sizes, results[a]):.2f}" for a in archs)]
    slopes += ["" for a in archs if a != BASELINE]
    rows.append(slopes)
    print(f"\n## {device.type.upper()} fp32 forward (batch 1) vs input size, median of {reps}")
    print(table(header, rows))
    if comp:
        ratios = [results[comp][i] / results["s2mnet"][i] for i in range(len(sizes))]
        print(
            f"{comp} / s2mnet eager: "
            + ", ".join(f"{s}^2 {r:.2f}" for s, r in zip(sizes, ratios, strict=True))
        )
    paper = loglog_slope(list(PAPER_SCALING_MS), list(PAPER_SCALING_MS.values()))
    print(
        f"slope = d log(time) / d log(pixels); paper's S2M-Net GPU numbers "
        f"{PAPER_SCALING_MS} give {paper:.2f}."
    )


def bench_cuda_batches(
    archs: list[str], device: torch.device, size: int, batches: list[int], reps: int, warmup: int
) -> None:
    """GPU forward throughput (images/s) for fp32 and bf16 autocast over batch sizes."""
    rows = []
    for dtype_name, dtype in [("fp32", None), ("bf16", torch.bfloat16)]:
        for b in batches:
            models = {a: build(a, device) for a in archs}
            x = torch.rand(b, 3, size, size, device=device)
            try:
                torch.cuda.reset_peak_memory_stats(device)
                med = round_robin(
                    {a: forward_fn(m, x, dtype) for a, m in models.items()}, reps, warmup, device
                )
                peak = torch.cuda.max_memory_allocated(device) / 2**30
            except torch.OutOfMemoryError:
                rows.append([dtype_name, str(b), *(["OOM"] * (2 * len(archs) - 1)), ""])
                torch.cuda.empty_cache()
                continue
            row = [dtype_name, str(b)]
            row += [f"{med[a] * 1e3 / b:.2f} / {b / med[a]:.0f}" for a in archs]
            row += [f"{med[a] / med[BASELINE]:.2f}" for a in archs if a != BASELINE]
            row.append(f"{peak:.2f}")
            rows.append(row)
            del models
            torch.cuda.empty_cache()
    header = ["dtype", "batch", *(f"{a} ms/img / img/s" for a in archs)]
    header += [f"{a}/{BASELINE}" for a in archs if a != BASELINE] + ["peak GiB (all)"]
    print(f"\n## CUDA inference throughput at {size}x{size} ({torch.cuda.get_device_name(device)})")
    print(table(header, rows))


def profile_s2mnet(device: torch.device, size: int, reps: int) -> None:
    """Per-block forward time of S2M-Net (hooks) and the top operators (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model = build("s2mnet", device).eval()
    acc: dict[str, float] = {}
    starts: dict[str, float] = {}

    def hook(name: str, module: nn.Module) -> None:
        def pre(_m: nn.Module, _i: Any) -> None:
            _sync(device)
            starts[name] = CLOCK()

        def post(_m: nn.Module, _i: Any, _o: Any) -> None:
            _sync(device)
            acc[name] = acc.get(name, 0.0) + CLOCK() - starts[name]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    hook("stem", model.stem)
    for i, enc in enumerate(model.encoders):
        for part in ("down", "mrf", "sstm"):
            hook(f"enc{i + 1}.{part}", getattr(enc, part))
    for i, dec in enumerate(model.decoders):
        hook(f"dec{i + 1} (BFD)", dec)
    hook("head", model.head)
    x = torch.rand(1, 3, size, size, device=device)
    with torch.inference_mode():
        model(x)
        acc.clear()
        for _ in range(reps):
            model(x)
    total = sum(acc.values())
    rows = [[k, f"{v / reps * 1e3:.1f}", f"{100 * v / total:.1f}"] for k, v in acc.items()]
    groups: dict[str, float] = {}
    for k, v in acc.items():
        g = k.split(".")[-1] if "." in k else k.split(" ")[0].rstrip("01234")
        groups[g] = groups.get(g, 0.0) + v
    print(f"\n## S2M-Net forward breakdown at {size}x{size} on {device.type} (mean of {reps})")
    print(table(["block", "ms", "%"], rows))
    print(
        "by kind: "
        + ", ".join(
            f"{g} {100 * v / total:.0f}%" for g, v in sorted(groups.items(), key=lambda t: -t[1])
        )
    )
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        model(x)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_speed", description=__doc__)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--archs", default="s2mnet,unet", help="comma-separated; unet is the baseline")
    p.add_argument("--profile", action="store_true", help="per-block breakdown of S2M-Net")
    p.add_argument("--size", type=int, default=352)
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        help="compiled runtime timed next to eager S2M-Net (CPU; "
        "auto: what inference picks; torch: none)",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall (default) or thread: CPU time of the calling thread, robust to other load "
        "on a shared machine (needs --threads 1 and a CPU device)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available.")
    if args.clock == "thread":
        if args.threads != 1 or device.type != "cpu":
            raise SystemExit("--clock thread needs --threads 1 and --device cpu.")
        global CLOCK
        CLOCK = time.thread_time
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if BASELINE not in archs:
        archs.append(BASELINE)
    gpu = device.type == "cuda"
    reps = args.reps or (3 if args.quick else (20 if gpu else 7))
    warmup = 1 if args.quick and not gpu else (5 if gpu else 2)
    sizes = [128, 256, 352, 512] if args.quick else [128, 256, 352, 512, 1024]
    if gpu:
        sizes = [128, 256, 352, 512, 1024]

    backend = compiled_backend(args.backend, device) if args.backend != "torch" else None
    if backend and args.clock == "thread":
        # The runtimes compute in their own worker threads, invisible to the calling thread's clock.
        raise SystemExit("--clock thread cannot time a compiled backend; add --backend torch.")
    print(
        f"# model_speed: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {device}, {torch.get_num_threads()} CPU threads, {args.clock} clock, "
        f"{'quick' if args.quick else 'full'}, compiled backend {backend or 'none'}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    t0 = time.perf_counter()
    bench_main(
        archs, device, args.size, reps, warmup, train_batch=2 if not gpu else 8, backend=backend
    )
    bench_sizes(archs, device, sizes, reps, warmup, backend=backend)
    if gpu:
        batches = [1, 2, 4, 8] if args.quick else [1, 2, 4, 8, 16, 32]
        bench_cuda_batches(archs, device, args.size, batches, reps, warmup)
    if args.profile:
        profile_s2mnet(device, args.size, reps)
    print(f"\n(total benchmark time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
