"""Baseline loss: BCE + soft Dice (binary) or CE + soft Dice (multi-class)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_s2mnet.losses import components as C


class DiceBCELoss(nn.Module):
    """``bce_weight * BCE + dice_weight * (1 - soft Dice)``.

    Binary logits ``(B, 1, H, W)``: BCE with logits and the per-sample soft Dice of the sigmoid.
    Multi-class logits ``(B, C, H, W)``: cross-entropy and the soft Dice of the softmax against
    the one-hot target, per sample and class, averaged over the foreground classes (plus the
    background with ``dice_include_background=True``).

    Args:
        num_classes: 1 (binary) or the number of classes incl. background.
        bce_weight: Weight of the (binary) cross-entropy term.
        dice_weight: Weight of the Dice term.
        smooth: Additive smoothing of the soft Dice (numerator and denominator); 1.0 keeps classes
            absent from a sample from dominating the loss.
        dice_include_background: Include class 0 in the multi-class Dice average.
    """

    def __init__(
        self,
        num_classes: int = 1,
        *,
        bce_weight: float = 0.5,
        dice_weight: float = 0.5,
        smooth: float = 1.0,
        dice_include_background: bool = False,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight <= 0:
            raise ValueError("bce_weight and dice_weight must be >= 0 and not both 0.")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}.")
        self.num_classes = int(num_classes)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.dice_include_background = bool(dice_include_background)
        self.last_components: dict[str, float] = {}

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, bce_weight={self.bce_weight}, "
            f"dice_weight={self.dice_weight}, smooth={self.smooth}"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``logits`` against ``target`` (binary mask or class ids)."""
        if logits.ndim == 4 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"DiceBCELoss was built for num_classes={self.num_classes} but logits have "
                f"{logits.shape[1]} channels."
            )
        with C.fp32_context(logits.device):
            z, y, _ = C.prepare_inputs(logits, target)
            p = C.probabilities(z)
            if z.shape[1] == 1:
                bce = F.binary_cross_entropy_with_logits(z, y)
            else:
                # soft cross-entropy against the one-hot (identical to CE on class ids)
                bce = -(y * F.log_softmax(z, dim=1)).sum(1).mean()
                if not self.dice_include_background:
                    p, y = p[:, 1:], y[:, 1:]
            dims = (2, 3)
            inter = (p * y).sum(dims)
            dice = (2.0 * inter + self.smooth) / (p.sum(dims) + y.sum(dims) + self.smooth + 1e-12)
            dice_loss = 1.0 - dice.mean()
            total = self.bce_weight * bce + self.dice_weight * dice_loss
        vals = torch.stack([bce.detach(), dice_loss.detach(), total.detach()]).cpu().tolist()
        self.last_components = {"bce": vals[0], "dice": vals[1], "total": vals[2]}
        return total
