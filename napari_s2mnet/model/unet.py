"""Plain U-Net baseline with about the parameter count of S2M-Net (4.7M).

Each level is ``(Conv3x3 -> BN -> ReLU) x 2``; max-pool down, transposed-conv (default) or
bilinear up; skips concatenated. It follows the same contract as S2M-Net (logits, any input size
by padding to :attr:`UNet.stride` and cropping back, any number of input channels), so it is a
drop-in baseline for benchmarks and for fine-tuning comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_s2mnet.model.base import SegmentationNet
from napari_s2mnet.model.blocks import BN_EPS, BN_MOMENTUM
from napari_s2mnet.model.registry import ModelConfig, register_model

UP_MODES = ("transpose", "bilinear")


@dataclass
class UNetOptions:
    """Options of the U-Net baseline.

    Attributes:
        base: Width of the first level; level ``i`` has ``base * 2**i`` channels.
        depth: Number of resolution levels (``depth - 1`` poolings; stride ``2**(depth-1)``).
            The default 5 levels with ``base=25`` has 4,739,426 parameters (S2M-Net: 4,752,136).
        up: ``"transpose"`` (2x2 transposed conv) or ``"bilinear"`` (resize + 1x1 conv).
        bn_momentum: BatchNorm momentum (same Keras-like default as S2M-Net, for a fair baseline).
        bn_eps: BatchNorm epsilon.
    """

    base: int = 25
    depth: int = 5
    up: str = "transpose"
    bn_momentum: float = BN_MOMENTUM
    bn_eps: float = BN_EPS

    def __post_init__(self) -> None:
        """Validate with actionable messages."""
        if self.base < 1:
            raise ValueError(f"base must be >= 1, got {self.base}.")
        if not 2 <= self.depth <= 8:
            raise ValueError(f"depth must be in 2..8 (levels incl. the bottom), got {self.depth}.")
        if self.up not in UP_MODES:
            raise ValueError(f"up must be one of {UP_MODES}, got {self.up!r}.")


class DoubleConv(nn.Sequential):
    """``(Conv3x3 -> BN -> ReLU) x 2`` (convs without bias: BN follows)."""

    def __init__(self, cin: int, cout: int, momentum: float, eps: float) -> None:
        """Build the four layers pairs."""
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, momentum=momentum, eps=eps),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, momentum=momentum, eps=eps),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample ``x`` by 2 to ``cout`` channels, concatenate the skip, double conv."""

    def __init__(self, cin: int, cout: int, mode: str, momentum: float, eps: float) -> None:
        """Build the stage.

        Args:
            cin: Channels of the coarser input.
            cout: Channels of the skip and of the output.
            mode: ``"transpose"`` or ``"bilinear"``.
            momentum: BatchNorm momentum.
            eps: BatchNorm epsilon.
        """
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        else:
            self.up = nn.Conv2d(cin, cout, 1)
        self.conv = DoubleConv(2 * cout, cout, momentum, eps)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Decode one level."""
        if self.mode == "bilinear":
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.up(x)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(SegmentationNet):
    """U-Net baseline. Returns logits ``(B, num_classes, H, W)`` for any ``H, W >= 1``.

    Attributes:
        stride: ``2 ** (depth - 1)``; inputs are padded internally to a multiple of it.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        options: UNetOptions | None = None,
        instance_channels: int = 0,
    ) -> None:
        """Build the network.

        Args:
            in_channels: Input channels (any >= 1).
            num_classes: 1 for binary (sigmoid), >= 2 for softmax classes incl. background.
            options: Architecture options.
        """
        super().__init__(in_channels, num_classes, instance_channels)
        opts = options or UNetOptions()
        self.options = opts
        self.stride = 2 ** (opts.depth - 1)
        widths = [opts.base * 2**i for i in range(opts.depth)]
        mom, eps = opts.bn_momentum, opts.bn_eps
        self.down = nn.ModuleList(
            DoubleConv(cin, cout, mom, eps)
            for cin, cout in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.up = nn.ModuleList(
            Up(widths[i + 1], widths[i], opts.up, mom, eps) for i in reversed(range(opts.depth - 1))
        )
        self.classifier = nn.Conv2d(widths[0], self.out_channels, 1)  # + instance head channels

    def forward_padded(self, x: Tensor) -> Tensor:
        """Logits for an input padded to a multiple of ``stride``."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.classifier(x)


@register_model(
    "unet",
    UNetOptions,
    "U-Net baseline (4.7M): plain conv-BN-ReLU encoder-decoder of about S2M-Net's size.",
)
def build_unet(config: ModelConfig, options: UNetOptions) -> UNet:
    """Registry builder."""
    return UNet(config.in_channels, config.num_classes, options, config.instance_channels)


__all__ = ["UP_MODES", "DoubleConv", "UNet", "UNetOptions", "Up", "build_unet"]
