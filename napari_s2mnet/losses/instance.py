"""Loss of a binary model with the instance head (issue 15).

The foreground channel keeps its own loss (MASL, Dice/BCE, ...: whatever :func:`build_loss`
built), so everything MASL does is unchanged; the two instance channels add

* **boundary** (:data:`~napari_s2mnet.instances.INSTANCE_CHANNELS` ``[0]``): BCE + soft Dice
  against the inner-boundary target (Dice keeps the thin, rare class from being ignored);
* **distance** (``[1]``): BCE of the sigmoid against the normalised distance target in
  ``[0, 1]`` (a bounded regression with the sigmoid's well-behaved gradients).

Targets: ``(B, 3, H, W)`` float, channel 0 the foreground mask and channels 1-2 from
:func:`napari_s2mnet.instances.instance_targets` of each crop's instance labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InstanceHeadLoss"]


def _soft_dice_loss(p: Tensor, t: Tensor, eps: float = 1.0) -> Tensor:
    dims = tuple(range(1, p.ndim))
    inter = (p * t).sum(dims)
    return (1.0 - (2.0 * inter + eps) / (p.sum(dims) + t.sum(dims) + eps)).mean()


class InstanceHeadLoss(nn.Module):
    """``foreground_loss(logits[:, :1], target[:, :1]) + weight * (L_boundary + L_distance)``.

    Args:
        foreground_loss: Loss of the foreground channel (e.g. :class:`~napari_s2mnet.losses.MASL`).
        weight: Weight of the instance terms.
    """

    def __init__(self, foreground_loss: nn.Module, weight: float = 1.0) -> None:
        """Wrap ``foreground_loss``."""
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        self.foreground = foreground_loss
        self.weight = float(weight)
        self.last_components: dict[str, float] = {}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Total loss for ``(B, 3, H, W)`` logits and targets."""
        if logits.shape[1] != 3 or target.shape != logits.shape:
            raise ValueError(
                f"InstanceHeadLoss expects (B, 3, H, W) logits and targets of the same shape, got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}."
            )
        fg = self.foreground(logits[:, :1], target[:, :1])
        lb, tb = logits[:, 1], target[:, 1]
        l_bnd = F.binary_cross_entropy_with_logits(lb, tb) + _soft_dice_loss(torch.sigmoid(lb), tb)
        l_dist = F.binary_cross_entropy_with_logits(logits[:, 2], target[:, 2])
        comps = dict(getattr(self.foreground, "last_components", {}) or {})
        comps.update(
            foreground=float(fg.detach()),
            boundary=float(l_bnd.detach()),
            distance=float(l_dist.detach()),
        )
        self.last_components = comps
        return fg + self.weight * (l_bnd + l_dist)

    def clamp_weights_(self) -> None:
        """Clamp the foreground loss's learnable weights (MASL), if it has any."""
        clamp = getattr(self.foreground, "clamp_weights_", None)
        if clamp is not None:
            clamp()

    def __getattr__(self, name: str) -> Any:
        # Anything else the training loop asks of the loss (e.g. MASL's weight parameters)
        # comes from the foreground loss.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("foreground"), name)
