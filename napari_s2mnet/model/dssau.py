"""DSSAU-Net: a U-shaped DSSA encoder/decoder (methods.md §3.3-§3.5), registered as ``"dssau"``.

Structure (Xia et al., arXiv 2506.03684; reference code ``XiaZunhui/DSSAU-Net``):

* **Encoder** (MedFormer-like): stem ``/4`` (Conv3x3 s2 + BN + GELU + Conv3x3 s2 + BN), a Conv3x3
  s2 + BN downsampling before stages 2-4, transformer blocks per stage with region top-k
  ``k1 = [1, 4, 16, full]``, ``S = 8`` regions per side, head dim 32, and a channel LayerNorm on
  each of the four stage outputs.
* **Transformer block**: ``x += DWConv3x3(x)`` (CPE); ``x += DropPath(Attn(LN(x)))``;
  ``x += DropPath(MLP(LN(x)))`` with MLP ratio 3 and GELU; DropPath grows linearly over the blocks.
  ``Attn`` is :class:`~napari_s2mnet.model.dssa.DSSA`, or full attention with LePE at stage 4.
* **Decoder**: PPM on the deepest features (adaptive *max* pooling, bins 1/2/3/6), then four DSSA
  stages at ``decoder_channels`` run deepest first, each fed with the ×2 bilinear upsampled
  previous output plus a lateral Conv1x1-BN-ReLU of the encoder skip; multi-scale fusion of the
  four decoder outputs at ``/4``; bilinear ×4 (``align_corners=True``) and a Conv3x3 to the logits.

The network returns **logits** ``(B, num_classes, H, W)`` for any ``H, W >= 1``: the input is
zero-padded to a multiple of :attr:`DSSAUNet.stride` (32) and the output cropped back. Stage token
maps need not be divisible by the ``S x S`` region grid: DSSA pads each map internally and, by
default, masks the padded keys (see :mod:`napari_s2mnet.model.dssa`).

Presets (:class:`DSSAUNetOptions`): ``"tiny"`` (the **default**, CPU-friendly: the paper's network
with the MedFormer-Tiny widths [32, 64, 128, 256], depths [2, 2, 8, 2] and a 32-channel decoder,
3.43M parameters, comparable with S2M-Net's 4.7M) and ``"base"`` (the paper: widths
[96, 192, 384, 768], depths [2, 2, 8, 2], decoder 64 channels, 29.25M parameters for 3 classes).
Explicit ``widths`` / ``depths`` / ... override the preset, e.g. ``depths=(2, 2, 2, 2),
decoder_depths=(2, 2, 2, 2)`` gives a 2.34M, about 1.5x faster variant.

Differences from the reference code (deliberate, documented):

* Padded keys are masked in DSSA by default (``mask_padding``); region grids for sizes not divisible
  by ``S`` use ``ceil`` region sizes (see :func:`~napari_s2mnet.model.dssa.region_geometry`).
* The reference decoder builds four unused LayerNorm2d (512 parameters); they are left out.
* No ImageNet pre-trained encoder is loaded (the reference loads ``pretrain.pth``): training here
  starts from scratch.
* **Loss**: the reference trains with ``0.5 CE + 0.5 Dice`` where the Dice is computed on the
  *argmax one-hot* prediction, which is non-differentiable, so only CE actually trains. This
  project never uses an argmax Dice: training uses the soft-Dice losses of
  :mod:`napari_s2mnet.losses` on the sigmoid / softmax probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_s2mnet.model.base import SegmentationNet
from napari_s2mnet.model.dssa import DSSA, FullAttentionLePE
from napari_s2mnet.model.registry import ModelConfig, register_model

__all__ = ["PRESETS", "DSSAUNet", "DSSAUNetOptions", "TransformerBlock", "build_dssau"]

#: Preset sizes; any field left ``None`` in :class:`DSSAUNetOptions` is taken from here.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "widths": (32, 64, 128, 256),
        "depths": (2, 2, 8, 2),
        "decoder_channels": 32,
        "decoder_depths": (2, 2, 8, 2),
        "drop_path": 0.1,
    },
    "base": {
        "widths": (96, 192, 384, 768),
        "depths": (2, 2, 8, 2),
        "decoder_channels": 64,
        "decoder_depths": (2, 2, 8, 2),
        "drop_path": 0.2,
    },
}

_SCALES = ("channel", "head")


@dataclass
class DSSAUNetOptions:
    """Options of DSSAU-Net (``ModelConfig(arch="dssau", options={...})``).

    The default preset is ``"tiny"`` (3.43M parameters, fine-tunes on a CPU); ``"base"`` is the
    paper's network (29.25M). Fields left ``None`` come from the preset; set them to override.

    Attributes:
        preset: ``"tiny"`` (default) or ``"base"``.
        widths: Encoder channels of the four stages (each a multiple of ``head_dim``).
        depths: Transformer blocks per encoder stage.
        decoder_channels: Width of the PPM, lateral skips and the four decoder stages.
        decoder_depths: Blocks per decoder stage, listed from ``/4`` to ``/32`` like ``depths``
            (the reference mirrors the encoder).
        drop_path: Maximum stochastic-depth rate (linear from 0 over the blocks of the encoder,
            and separately of the decoder).
        region_topk: ``k1`` per stage (``/4``, ``/8``, ``/16``, ``/32``); a value ``<= 0`` means full
            global attention with LePE (the reference's last stage).
        n_win: Regions per side ``S`` of the DSSA grid.
        head_dim: Channels per head in the DSSA stages (heads = width / head_dim).
        full_attn_heads: Heads of the full-attention stage (8 in the reference).
        pixel_keep_ratio: Fraction of the ``k1 * m`` gathered candidates each query keeps.
        scale: ``"channel"`` (``C^-1/2``, the reference code) or ``"head"`` (``d^-1/2``).
        mask_padding: Mask zero-padded keys before the pixel top-k (True, default) or let them be
            selected as the reference code does (False).
        mlp_ratio: Hidden width of the block MLP relative to the block width.
        lepe_kernel: Kernel of the depthwise LePE conv.
        ppm_bins: Output sizes of the PPM's adaptive max pools.
    """

    preset: str = "tiny"
    widths: tuple[int, ...] | None = None
    depths: tuple[int, ...] | None = None
    decoder_channels: int | None = None
    decoder_depths: tuple[int, ...] | None = None
    drop_path: float | None = None
    region_topk: tuple[int, ...] = (1, 4, 16, 0)
    n_win: int = 8
    head_dim: int = 32
    full_attn_heads: int = 8
    pixel_keep_ratio: float = 0.125
    scale: str = "channel"
    mask_padding: bool = True
    mlp_ratio: float = 3.0
    lepe_kernel: int = 5
    ppm_bins: tuple[int, ...] = (1, 2, 3, 6)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"Unknown DSSAU-Net preset {self.preset!r}; choose one of {sorted(PRESETS)}."
            )
        # JSON round trips give lists: store tuples.
        for name in ("widths", "depths", "decoder_depths", "region_topk", "ppm_bins"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self._validate()

    def resolved(self) -> dict[str, Any]:
        """The preset-dependent sizes with overrides applied (``widths``, ``depths``, ...)."""
        out = dict(PRESETS[self.preset])
        for name in out:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def _validate(self) -> None:
        sizes = self.resolved()
        for name in ("widths", "depths", "decoder_depths"):
            value = sizes[name]
            if len(value) != 4 or any(int(v) != v or v < 1 for v in value):
                raise ValueError(
                    f"{name} must be 4 positive integers (one per stage), got {value}."
                )
        if len(self.region_topk) != 4:
            raise ValueError(f"region_topk must have 4 entries, got {self.region_topk}.")
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}.")
        dec = sizes["decoder_channels"]
        if dec < 1:
            raise ValueError(f"decoder_channels must be >= 1, got {dec}.")
        for width, topk in zip(
            (*sizes["widths"], dec, dec, dec, dec), self.region_topk * 2, strict=True
        ):
            if topk > 0 and width % self.head_dim:
                raise ValueError(
                    f"Width {width} of a DSSA stage is not a multiple of head_dim={self.head_dim}; "
                    "choose widths / decoder_channels divisible by head_dim or change head_dim."
                )
            if topk <= 0 and width % self.full_attn_heads:
                raise ValueError(
                    f"Width {width} of a full-attention stage is not a multiple of "
                    f"full_attn_heads={self.full_attn_heads}."
                )
        if not 0.0 <= sizes["drop_path"] < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {sizes['drop_path']}.")
        if self.n_win < 1:
            raise ValueError(f"n_win must be >= 1, got {self.n_win}.")
        if not 0.0 < self.pixel_keep_ratio <= 1.0:
            raise ValueError(f"pixel_keep_ratio must be in (0, 1], got {self.pixel_keep_ratio}.")
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {self.scale!r}.")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}.")
        if self.lepe_kernel < 1 or self.lepe_kernel % 2 == 0:
            raise ValueError(f"lepe_kernel must be odd and >= 1, got {self.lepe_kernel}.")
        if not self.ppm_bins or any(b < 1 for b in self.ppm_bins):
            raise ValueError(f"ppm_bins must be positive integers, got {self.ppm_bins}.")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        """Identity at eval time or for ``p == 0``; scaled Bernoulli mask otherwise."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map at each pixel (eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransformerBlock(nn.Module):
    """CPE + pre-norm attention + pre-norm MLP, all residual (methods.md §3.3).

    Args:
        dim: Channels.
        topk: Region top-k ``k1`` for DSSA; ``<= 0`` selects full attention with LePE.
        options: Network options (heads, S, scale, masking, MLP ratio, LePE kernel).
        drop_path: Stochastic-depth rate of this block.
    """

    def __init__(self, dim: int, topk: int, options: DSSAUNetOptions, drop_path: float) -> None:
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn: nn.Module
        if topk > 0:
            self.attn = DSSA(
                dim,
                num_heads=dim // options.head_dim,
                n_win=options.n_win,
                topk=topk,
                pixel_keep_ratio=options.pixel_keep_ratio,
                scale=options.scale,
                mask_padding=options.mask_padding,
                lepe_kernel=options.lepe_kernel,
            )
        else:
            self.attn = FullAttentionLePE(
                dim, num_heads=options.full_attn_heads, lepe_kernel=options.lepe_kernel
            )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(options.mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        x = x + self.cpe(x)
        y = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.drop_path(self.attn(y))
        y = self.mlp(self.norm2(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


def _stages(
    widths: Sequence[int], depths: Sequence[int], options: DSSAUNetOptions, drop_path: float
) -> nn.ModuleList:
    """Four sequences of blocks with a linear drop-path schedule over all of them."""
    total = sum(depths)
    rates = [drop_path * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    stages, cur = nn.ModuleList(), 0
    for width, depth, topk in zip(widths, depths, options.region_topk, strict=True):
        blocks = [TransformerBlock(width, topk, options, rates[cur + j]) for j in range(depth)]
        stages.append(nn.Sequential(*blocks))
        cur += depth
    return stages


def _cbr(cin: int, cout: int) -> nn.Sequential:
    """Conv1x1 (bias) + BN + ReLU, the reference's lateral / fusion unit."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class DSSAEncoder(nn.Module):
    """MedFormer-like encoder returning four LayerNorm'd maps at strides 4, 8, 16, 32."""

    def __init__(self, in_channels: int, options: DSSAUNetOptions) -> None:
        super().__init__()
        sizes = options.resolved()
        widths, depths = sizes["widths"], sizes["depths"]
        half = max(1, widths[0] // 2)
        stem = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1),
            nn.BatchNorm2d(half),
            nn.GELU(),
            nn.Conv2d(half, widths[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(widths[0]),
        )
        downs = [
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
                nn.BatchNorm2d(widths[i + 1]),
            )
            for i in range(3)
        ]
        self.downsample = nn.ModuleList([stem, *downs])
        self.stages = _stages(widths, depths, options, sizes["drop_path"])
        self.norms = nn.ModuleList(LayerNorm2d(w) for w in widths)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, C_in, H, W)`` with ``H, W`` multiples of 32 -> four feature maps."""
        feats = []
        for down, stage, norm in zip(self.downsample, self.stages, self.norms, strict=True):
            x = stage(down(x))
            feats.append(norm(x))
        return feats


class PPM(nn.Module):
    """Pyramid pooling with adaptive *max* pooling (as in DSSAU-Net), fused by Conv-BN-ReLU."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveMaxPool2d(b), nn.Conv2d(in_channels, channels, 1))
            for b in bins
        )
        self.fuse = _cbr(in_channels + len(bins) * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, h, w) -> (B, channels, h, w)``."""
        pooled = [_up(branch(x), x.shape[-2:]) for branch in self.branches]
        return self.fuse(torch.cat([*pooled, x], dim=1))


class DSSADecoder(nn.Module):
    """PPM + four DSSA decoder stages with lateral skips + multi-scale fusion (methods.md §3.5)."""

    def __init__(self, options: DSSAUNetOptions) -> None:
        super().__init__()
        sizes = options.resolved()
        widths, ch = sizes["widths"], sizes["decoder_channels"]
        self.ppm = PPM(widths[3], ch, options.ppm_bins)
        # Stage i runs at the resolution of encoder stage i (index 0 = /4); executed deepest first.
        self.stages = _stages([ch] * 4, sizes["decoder_depths"], options, sizes["drop_path"])
        self.up_conv = nn.Conv2d(ch, ch, 1)  # plain conv on the first upsampled map (reference)
        self.laterals = nn.ModuleList(_cbr(widths[i], ch) for i in range(3))  # skips e1..e3
        self.post = nn.ModuleList(_cbr(ch, ch) for _ in range(3))  # CBR after stages 3, 2, 1
        self.fuse = _cbr(4 * ch, ch)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Four encoder maps (strides 4..32) -> ``(B, decoder_channels, H/4, W/4)``."""
        e1, e2, e3, e4 = feats
        x1 = self.stages[3](self.ppm(e4))
        x = self.up_conv(_up(x1, e3.shape[-2:])) + self.laterals[2](e3)
        x2 = self.post[0](self.stages[2](x))
        x = _up(x2, e2.shape[-2:]) + self.laterals[1](e2)
        x3 = self.post[1](self.stages[1](x))
        x = _up(x3, e1.shape[-2:]) + self.laterals[0](e1)
        x4 = self.post[2](self.stages[0](x))
        size = x4.shape[-2:]
        return self.fuse(torch.cat([_up(x1, size), _up(x2, size), _up(x3, size), x4], dim=1))


class DSSAUNet(SegmentationNet):
    """DSSAU-Net returning logits ``(B, num_classes, H, W)`` for any ``H, W >= 1``.

    Args:
        in_channels: Input channels (>= 1).
        num_classes: 1 for binary (one sigmoid logit), >= 2 for softmax classes incl. background.
        options: :class:`DSSAUNetOptions` (default: the ``"tiny"`` preset).

    Attributes:
        stride: 32; inputs are zero-padded (bottom and right, like the reference code) to a
            multiple of it and the logits cropped back.
    """

    stride: int = 32
    pad_mode = "zeros"
    channels_last = False

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        options: DSSAUNetOptions | None = None,
        instance_channels: int = 0,
    ) -> None:
        super().__init__(in_channels, num_classes, instance_channels)
        self.options = options if options is not None else DSSAUNetOptions()
        ch = self.options.resolved()["decoder_channels"]
        self.encoder = DSSAEncoder(in_channels, self.options)
        self.decoder = DSSADecoder(self.options)
        self.head = nn.Conv2d(ch, self.out_channels, 3, padding=1)  # + instance head channels
        self.apply(_init_weights)

    def forward_padded(self, x: Tensor) -> Tensor:
        """Logits for an input padded to a multiple of ``stride``."""
        y = self.decoder(self.encoder(x))
        y = _up(y, (y.shape[-2] * 4, y.shape[-1] * 4))
        return self.head(y)


def _init_weights(module: nn.Module) -> None:
    # Reference init: truncated normal for Linear layers, unit/zero LayerNorm; convs keep torch's.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_model(
    "dssau",
    DSSAUNetOptions,
    "DSSAU-Net: U-shaped dual sparse selection attention network (presets tiny 3.4M / base 29M)",
)
def build_dssau(config: ModelConfig, options: DSSAUNetOptions) -> DSSAUNet:
    """Registry builder: ``build_model(ModelConfig(arch="dssau", ...))``."""
    return DSSAUNet(config.in_channels, config.num_classes, options, config.instance_channels)
