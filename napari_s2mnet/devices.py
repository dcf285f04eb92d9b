"""Compute devices: resolve ``"auto"`` to CUDA > MPS > CPU, describe them, OOM fallback policy.

Torch is imported inside the functions so that widgets can import this module cheaply.

Out-of-memory policy (used by :mod:`napari_s2mnet.inference`): when a GPU runs out of memory the
work is retried with a batch of one tile, then with tiles half as large (down to a minimum), and
finally on the CPU. Each step is described by a message that ends up in the result, so the user
knows why a run was slower than expected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FallbackState",
    "describe_device",
    "empty_cache",
    "is_oom_error",
    "next_fallback",
    "resolve_device",
    "supports_amp",
]

_VALID = "'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a device request into a usable :class:`torch.device`.

    Args:
        device: ``"auto"`` (CUDA, then Apple MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``, a ``torch.device`` or ``None`` (same as ``"auto"``).

    Returns:
        The device to run on.

    Raises:
        ValueError: If the name is unknown or the requested device is not available here (the
            message says what is available).
    """
    import torch

    if device is None:
        device = "auto"
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise TypeError(f"device must be a string such as {_VALID}, got {type(device).__name__}.")

    if name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "gpu":  # a common spelling; means "the GPU there is"
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cuda"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}; use one of {_VALID}.") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"Device {device!r} was requested but CUDA is not available here "
                f"({_available_text()}). Use device='auto' or 'cpu'."
            )
        index = 0 if dev.index is None else dev.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"Device {device!r} does not exist: {count} CUDA device(s) found "
                f"(cuda:0 .. cuda:{count - 1}). Choose one of them or 'auto'."
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"Device {device!r} was requested but Apple MPS is not available here "
                f"({_available_text()}). Use device='auto' or 'cpu'."
            )
        return torch.device("mps")
    raise ValueError(f"Unsupported device {device!r}; use one of {_VALID}.")


def describe_device(device: str | torch.device) -> str:
    """A short readable description: ``"CUDA: NVIDIA H100 (80 GB)"``, ``"CPU (2 threads)"``."""
    import torch

    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        props = torch.cuda.get_device_properties(index)
        gib = props.total_memory / 1024**3
        suffix = f" #{index}" if torch.cuda.device_count() > 1 else ""
        return f"CUDA{suffix}: {props.name} ({gib:.0f} GB)"
    if dev.type == "mps":
        return "Apple MPS (Metal GPU)"
    if dev.type == "cpu":
        threads = torch.get_num_threads()
        return f"CPU ({threads} thread{'s' if threads != 1 else ''})"
    return str(dev)


def supports_amp(device: torch.device) -> bool:
    """Whether mixed precision (float16 autocast) is used on ``device``: CUDA only.

    CPU autocast would use bfloat16, which is slow or inexact on many CPUs, and MPS autocast is
    still incomplete, so both run in float32.
    """
    return device.type == "cuda"


def is_oom_error(exc: BaseException) -> bool:
    """True for a torch out-of-memory error (CUDA's ``OutOfMemoryError``, MPS, CPU allocator)."""
    import torch

    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    # CUDA/MPS say "out of memory"; the CPU allocator says "can't allocate memory" / "not enough".
    return any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory"))


def empty_cache(device: torch.device) -> None:
    """Release cached GPU memory after an out-of-memory error (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


@dataclass(frozen=True)
class FallbackState:
    """What an inference run currently uses; :func:`next_fallback` steps it down after an OOM.

    Attributes:
        device: Device string (``"cuda:0"``, ``"mps"``, ``"cpu"``).
        tile_size: Tile side in pixels.
        batch_size: Tiles per forward pass.
    """

    device: str
    tile_size: int
    batch_size: int


def next_fallback(
    state: FallbackState, *, min_tile: int = 128, multiple: int = 1
) -> tuple[FallbackState, str] | None:
    """The next, less memory-hungry settings after an out-of-memory error, with a message.

    Order: batch of one tile, then halve the tile size (kept a multiple of ``multiple`` and not
    below ``min_tile``), then, on a GPU, the CPU (keeping the smaller tiles). ``None`` when there
    is nothing left to try (on the CPU with a batch of one and the smallest tile).

    Args:
        state: Current settings.
        min_tile: Smallest tile side to fall back to.
        multiple: Tile sides stay multiples of this (the network's stride).

    Returns:
        ``(new_state, message)`` or ``None``.
    """
    where = "the CPU" if state.device.startswith("cpu") else state.device
    if state.batch_size > 1:
        new = replace(state, batch_size=1)
        return new, (
            f"Out of memory on {where} with {state.batch_size} tiles per batch; "
            "retrying with 1 tile per batch."
        )
    smaller = max(min_tile, (state.tile_size // 2) // multiple * multiple)
    if smaller < state.tile_size:
        new = replace(state, tile_size=smaller)
        return new, (
            f"Out of memory on {where} with {state.tile_size} px tiles; "
            f"retrying with {smaller} px tiles."
        )
    if not state.device.startswith("cpu"):
        return replace(state, device="cpu"), (
            f"Out of memory on {where} even with {state.tile_size} px tiles; "
            "continuing on the CPU (slower)."
        )
    return None


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _available_text() -> str:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(f"{torch.cuda.device_count()} CUDA device(s)")
    if _mps_available():
        found.append("mps")
    return "available: " + ", ".join(found)
