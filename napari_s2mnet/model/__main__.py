"""``python -m napari_s2mnet.model --summary [--arch s2mnet] [--in-channels 3] [--num-classes 1]``.

Prints the parameter count of every block and the total, then runs one forward pass at 352 x 352
(or ``--size``) on the CPU as a smoke check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from napari_s2mnet.model.registry import (
    ModelConfig,
    available_models,
    build_model,
    count_parameters,
)


def block_rows(model: object, max_depth: int = 2) -> list[tuple[str, int]]:
    """``(qualified name, trainable parameters)`` for the blocks of ``model``.

    Top-level children are listed; containers (``ModuleList``) are expanded to their items and
    each item to its children, down to ``max_depth`` levels below the top.
    """
    from torch import nn

    rows: list[tuple[str, int]] = []

    def visit(prefix: str, module: nn.Module, depth: int) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}{name}"
            n = count_parameters(child)
            if isinstance(child, nn.ModuleList):
                visit(f"{qual}.", child, depth)  # list items are the real blocks
                continue
            rows.append(("  " * depth + qual, n))
            if depth < max_depth and n and any(True for _ in child.named_children()):
                if not isinstance(child, nn.Sequential):
                    visit(f"{qual}.", child, depth + 1)

    visit("", model, 0)
    return rows


def summary(config: ModelConfig, size: int = 352, forward: bool = True) -> str:
    """The summary text for ``config``."""
    import torch

    model = build_model(config)
    lines = [f"architecture: {config.arch}   config: {json.dumps(config.to_dict())}"]
    lines.append(f"{'block':<40s} {'params':>12s}")
    for name, n in block_rows(model):
        lines.append(f"{name:<40s} {n:>12,d}")
    total = count_parameters(model)
    lines.append(f"{'TOTAL (trainable)':<40s} {total:>12,d}   ({total / 1e6:.3f}M)")
    n_buffers = sum(b.numel() for b in model.buffers())
    lines.append(f"{'buffers (BN running stats etc.)':<40s} {n_buffers:>12,d}")
    lines.append(f"stride: {model.stride}")
    if forward:
        model.eval()
        x = torch.rand(1, config.in_channels, size, size)
        with torch.no_grad():
            start = time.perf_counter()
            y = model(x)
            took = time.perf_counter() - start
        ok = y.shape == (1, config.num_classes, size, size) and bool(torch.isfinite(y).all())
        lines.append(
            f"forward check: input {tuple(x.shape)} -> logits {tuple(y.shape)} "
            f"in {took * 1000:.0f} ms (first call, CPU, {torch.get_num_threads()} threads): "
            f"{'OK' if ok else 'FAILED'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_s2mnet.model", description="Inspect the segmentation networks."
    )
    parser.add_argument("--summary", action="store_true", help="print parameter counts")
    parser.add_argument("--list", action="store_true", help="list the registered architectures")
    parser.add_argument("--arch", default="s2mnet", help="architecture name (default: s2mnet)")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1)
    parser.add_argument(
        "--options", default="{}", help="architecture options as JSON, e.g. '{\"K\": 16}'"
    )
    parser.add_argument("--size", type=int, default=352, help="forward-check size (default 352)")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward check")
    args = parser.parse_args(argv)

    if args.list or not args.summary:
        for name, description in available_models().items():
            print(f"{name:<10s} {description}")
        if not args.summary:
            print("\nUse --summary [--arch NAME] for parameter counts.")
        return 0
    try:
        options = json.loads(args.options)
        config = ModelConfig(args.arch, args.in_channels, args.num_classes, options)
        print(summary(config, args.size, forward=not args.no_forward))
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
