"""The model contract every architecture shares: :class:`SegmentationNet`.

A network takes a float ``(B, in_channels, H, W)`` tensor and returns logits
``(B, num_classes, H, W)`` for any ``H, W >= 1``. It works internally on sizes that are a multiple
of :attr:`SegmentationNet.stride`, so :meth:`SegmentationNet.forward` checks the input, pads it up
to that multiple, runs :meth:`SegmentationNet.forward_padded` and crops the logits back. Subclasses
(S2M-Net, the U-Net baseline, DSSAU-Net) only build their layers and implement
:meth:`~SegmentationNet.forward_padded`; inference tiling aligns its tiles to ``stride``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pads = tuple[int, int, int, int]


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, Pads]:
    """Pad the last two dims of ``x`` up to a multiple of ``multiple``.

    Reflect padding where the side is long enough (``pad < size``), otherwise replicate, so any
    size down to 1 x 1 works. The padding is split evenly between both ends.

    Returns:
        The padded tensor and ``(top, bottom, left, right)`` to undo it with :func:`crop_padding`.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    top, left = ph // 2, pw // 2
    pads = (top, ph - top, left, pw - left)
    if ph:
        mode = "reflect" if ph - top < h else "replicate"
        x = F.pad(x, (0, 0, top, ph - top), mode=mode)
    if pw:
        mode = "reflect" if pw - left < w else "replicate"
        x = F.pad(x, (left, pw - left, 0, 0), mode=mode)
    return x, pads


def crop_padding(x: Tensor, pads: Pads) -> Tensor:
    """Undo :func:`pad_to_multiple`; the result is contiguous (standard NCHW layout)."""
    top, bottom, left, right = pads
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right].contiguous()


def fast_layout(x: Tensor) -> Tensor:
    """``x`` in the memory layout that runs the network fastest on its device.

    On CPU, oneDNN's convolutions (depthwise ones especially) are ~2-3x faster in channels-last
    layout, and the channel LayerNorm becomes a contiguous last-dim norm. Other devices keep
    the layout they were given. Results are identical up to float rounding.
    """
    if x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def check_input(x: Tensor, in_channels: int, name: str) -> None:
    """Raise a clear error unless ``x`` is a float ``(B, in_channels, H, W)`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4:
        raise ValueError(
            f"{name} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}; "
            "add a batch axis with x[None] or move channels first."
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{name} was built for {in_channels} input channel(s), shape (B, {in_channels}, H, W), "
            f"but got {x.shape[1]} (shape {tuple(x.shape)}); convert the image or build the model "
            f"with in_channels={x.shape[1]}."
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got {x.dtype}; use x.float().")
    if min(x.shape[-2:]) < 1:
        raise ValueError(f"{name} got an empty image of shape {tuple(x.shape)}.")


class SegmentationNet(nn.Module):
    """Base of every registered network: input check, ``stride``, pad -> forward -> crop.

    Subclasses call ``super().__init__(in_channels, num_classes)``, set :attr:`stride` and
    implement :meth:`forward_padded`. The base holds no parameters or buffers, so state-dict keys
    are those of the subclass alone.

    Attributes:
        in_channels: Expected input channels (>= 1).
        num_classes: Semantic output channels: 1 = binary (sigmoid), >= 2 = softmax classes incl.
            background.
        instance_channels: Extra output channels of the instance head after the semantic ones
            (binary models only; :data:`napari_s2mnet.instances.INSTANCE_CHANNELS`: boundary and
            distance logits, each a sigmoid); 0 = none (every model before the head).
        out_channels: ``num_classes + instance_channels``, the channels :meth:`forward` returns.
        stride: Inputs are padded to a multiple of this before :meth:`forward_padded`.
        pad_mode: ``"reflect"``: centred reflect padding (replicate on tiny sides), see
            :func:`pad_to_multiple`; ``"zeros"``: zeros at the bottom and right (DSSAU-Net's
            reference code).
        channels_last: Run in channels-last layout on CPU (:func:`fast_layout`).
    """

    stride: int = 1
    pad_mode: Literal["reflect", "zeros"] = "reflect"
    channels_last: bool = True

    def __init__(self, in_channels: int, num_classes: int, instance_channels: int = 0) -> None:
        """Check and store the channel counts.

        Args:
            in_channels: Input channels (>= 1).
            num_classes: Semantic output channels (>= 1).
            instance_channels: Instance-head channels (0, or > 0 with ``num_classes == 1``).
        """
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be >= 1 (got {in_channels}, {num_classes})."
            )
        if instance_channels < 0 or (instance_channels and num_classes != 1):
            raise ValueError(
                f"An instance head needs a binary model (num_classes=1); got num_classes="
                f"{num_classes}, instance_channels={instance_channels}."
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.instance_channels = int(instance_channels)
        self.out_channels = num_classes + self.instance_channels

    def pad(self, x: Tensor) -> tuple[Tensor, Pads]:
        """Check ``x``, pad it to a multiple of :attr:`stride`; pads to give :meth:`crop`."""
        check_input(x, self.in_channels, type(self).__name__)
        if self.pad_mode == "zeros":
            h, w = x.shape[-2:]
            ph, pw = -h % self.stride, -w % self.stride
            pads = (0, ph, 0, pw)
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))
        else:
            x, pads = pad_to_multiple(x, self.stride)
        return (fast_layout(x) if self.channels_last else x), pads

    def crop(self, y: Tensor, pads: Pads) -> Tensor:
        """Undo :meth:`pad` on an output of the padded size."""
        if self.pad_mode == "zeros":
            h, w = y.shape[-2] - pads[1], y.shape[-1] - pads[3]
            return y[..., :h, :w]
        return crop_padding(y, pads)

    def forward_padded(self, x: Tensor) -> Tensor:
        """Logits for ``x`` whose height and width are multiples of :attr:`stride`."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, out_channels, H, W)`` for float ``x`` of shape ``(B, in_channels, H, W)``."""
        x, pads = self.pad(x)
        return self.crop(self.forward_padded(x), pads)


__all__ = ["SegmentationNet", "check_input", "crop_padding", "fast_layout", "pad_to_multiple"]
