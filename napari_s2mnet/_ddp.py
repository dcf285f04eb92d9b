"""Data-parallel helpers for :mod:`napari_s2mnet.training` (``torchrun --nproc_per_node=N``).

Training runs the same code in every process. Each rank samples its own crops (the random stream
of every crop is keyed by its *global* index in the step, so ``N`` ranks with batch ``B`` see
exactly the crops one process with batch ``N * B`` would see), gradients are averaged by
``DistributedDataParallel`` and every decision that must agree across ranks (stop, divergence
recovery, validation Dice) goes through one small all-reduce.

Batch norm: each rank normalises with the statistics of its own batch (plain DDP behaviour) and
the running statistics of rank 0 are broadcast at every forward pass (``broadcast_buffers``);
``FinetuneConfig.sync_batchnorm`` switches to ``SyncBatchNorm`` on CUDA, and
``FinetuneConfig.freeze_batchnorm`` keeps BN in eval mode (then the result is independent of how
the batch is split).

Backends: NCCL when training on CUDA, gloo on CPU. Torch is imported inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: Global rank (0 for single-process runs).
        world_size: Number of processes (1 for single-process runs).
        local_rank: Rank on this machine (selects the GPU).
        created: This module created the process group (and so destroys it in :func:`cleanup`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints and saves."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place (no-op for one process)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for all ranks (no-op for one process)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def current() -> DistContext:
    """The context of an already initialised process group (or a single-process context)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    return DistContext()


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Join the process group torchrun describes in the environment, if any.

    A no-op (single-process context) when ``WORLD_SIZE`` is absent or 1, and returns the existing
    context when a process group is already initialised.

    Args:
        device_type: ``"cuda"`` selects NCCL (and this rank's GPU), anything else gloo.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        return current()
    if env_world_size() <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    ctx = current()
    ctx.created = True
    return ctx


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if ctx.created:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        ctx.created = False


def wrap_model(model: Any, ctx: DistContext, device: torch.device, in_channels: int) -> Any:
    """``DistributedDataParallel(model)`` for multi-process runs, else ``model`` unchanged."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Some option sets leave branches unused; only then pay for DDP's unused-parameter search.
        find_unused_parameters=has_unused_parameters(model, in_channels, device),
    )


def has_unused_parameters(model: Any, in_channels: int, device: torch.device) -> bool:
    """Whether a forward/backward pass leaves some trainable parameter without a gradient.

    Probes with a small zero image and restores the model's state (batch-norm statistics)
    afterwards.
    """
    import torch

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    side = 2 * int(getattr(model, "stride", 32) or 32)
    x = torch.zeros(1, in_channels, side, side, device=device)
    try:
        model(x).float().sum().backward()
        return any(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)


def average_gradients(params: Any, ctx: DistContext) -> None:
    """Average the gradients of parameters DDP does not own (the loss's learnable weights)."""
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is not None:
            ctx.all_reduce_sum(p.grad)
            p.grad /= ctx.world_size
