"""S2M-Net: spectral-spatial mixing network for medical image segmentation (methods.md §1.2).

Stem -> five encoder stages (``Conv3x3 s2 + BN + ELU -> MRF-SE -> SSTM``) -> four BFD decoder
stages -> head (nearest x2, ``Conv3x3 24->32 ReLU``, ``Conv3x3 32->16 ReLU``, ``Conv1x1``).
The network returns **logits**; losses and inference apply sigmoid / softmax.

The default binary 3-channel model has 4,752,136 trainable parameters (the reference code's
structure counts 4,768,920; the difference is the paper's ``d = 16`` spatial bottleneck and the
half-plane spectral filter, see :class:`~napari_s2mnet.model.blocks.SpectralFilter`). The
reference structure itself is ``spectral_mode="resize", spatial_bottleneck=False,
spectral_k=(32, 32, 32, 22, 11)``: exactly 4,768,920.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from napari_s2mnet.model.base import SegmentationNet
from napari_s2mnet.model.blocks import (
    BN_EPS,
    BN_MOMENTUM,
    LN_EPS,
    ROUTINGS,
    SPECTRAL_MODES,
    SSTM,
    BFDStage,
    ConvBNAct,
    MRFSEBlock,
    keras_init_,
)
from napari_s2mnet.model.registry import ModelConfig, register_model


@dataclass
class S2MNetOptions:
    """Architecture options of S2M-Net (defaults = the paper / reference code, methods.md §1.10).

    Attributes:
        widths: Encoder stage widths; the decoder mirrors them. ``len(widths)`` stages give a
            stride of ``2 ** len(widths)``.
        stem: Stem width (full resolution, not used as a skip).
        expansion: MRF-SE expansion factor E.
        kernel_sizes: MRF-SE depthwise kernel sizes.
        K: Spectral crop size (the K x K lowest frequencies; ``min(K, H, W)`` at run time).
        spectral_k: Per stage: the spectral filter side, overriding ``K`` (``None``: ``K`` at every
            stage). The reference code builds its filters with ``min(K, H, W)`` at its training
            size, so its 352 x 352 model is ``(32, 32, 32, 22, 11)`` (stage maps 176 .. 11):
            with ``spectral_mode="resize"`` and ``spatial_bottleneck=False`` that gives the
            spec's analytic parameter count of the code, 4,768,920.
        d: Bottleneck width of the SSTM spatial branch (paper form).
        sstm_use_spatial: Per stage: enable the content-gated spatial branch (code: stages 3-5).
        sstm_use_spectral: Per stage: enable the spectral branch (all stages).
        spectral_mode: ``"crop"`` (paper: centred low-frequency crop) or ``"resize"`` (reference
            code: bilinear resize of the spectrum).
        spatial_bottleneck: ``True``: paper form ``C->d->C`` with ELU; ``False``: code's ``C x C``.
        extra_norms: The reference code's extra LayerNorms in SSTM (per branch + second output LN).
        dropout: Dropout of MRF-SE and SSTM outputs.
        bfd_routing: ``"soft"`` (default), ``"hard"``, ``"learned"`` or ``"none"``.
        head_widths: Widths of the two 3x3 head convs.
        bn_momentum: BatchNorm momentum, PyTorch convention (Keras 0.99 == 0.01).
        bn_eps: BatchNorm epsilon (Keras 1e-3).
        ln_eps: LayerNorm epsilon (Keras 1e-6).
    """

    widths: tuple[int, ...] = (24, 32, 64, 80, 128)
    stem: int = 16
    expansion: int = 6
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    K: int = 32
    spectral_k: tuple[int, ...] | None = None
    d: int = 16
    sstm_use_spatial: tuple[bool, ...] = (False, False, True, True, True)
    sstm_use_spectral: tuple[bool, ...] = (True, True, True, True, True)
    spectral_mode: str = "crop"
    spatial_bottleneck: bool = True
    extra_norms: bool = True
    dropout: float = 0.1
    bfd_routing: str = "soft"
    head_widths: tuple[int, int] = (32, 16)
    bn_momentum: float = BN_MOMENTUM
    bn_eps: float = BN_EPS
    ln_eps: float = LN_EPS

    def __post_init__(self) -> None:
        """Validate the options with actionable messages."""
        n = len(self.widths)
        if n < 2:
            raise ValueError(f"S2M-Net needs at least 2 encoder widths, got widths={self.widths}.")
        for name in ("sstm_use_spatial", "sstm_use_spectral"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(
                    f"{name} has {len(value)} entries but widths has {n}; give one flag per stage."
                )
        if self.spectral_k is not None:
            if len(self.spectral_k) != n:
                raise ValueError(
                    f"spectral_k has {len(self.spectral_k)} entries but widths has {n}; give one "
                    "filter side per stage (or None for K at every stage)."
                )
            if any(int(k) != k or k < 1 for k in self.spectral_k):
                raise ValueError(
                    f"spectral_k must hold integers >= 1, got {tuple(self.spectral_k)}."
                )
        if any(w < 1 for w in (*self.widths, self.stem, *self.head_widths)):
            raise ValueError("All widths must be positive integers.")
        if len(self.head_widths) != 2:
            raise ValueError(f"head_widths must have 2 entries, got {self.head_widths}.")
        if self.expansion < 1 or self.K < 1 or self.d < 1:
            raise ValueError(
                f"expansion, K and d must be >= 1 (got {self.expansion}, {self.K}, {self.d})."
            )
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and positive, got {self.kernel_sizes}.")
        if self.spectral_mode not in SPECTRAL_MODES:
            raise ValueError(
                f"spectral_mode must be one of {SPECTRAL_MODES}, got {self.spectral_mode!r}."
            )
        if self.bfd_routing not in ROUTINGS:
            raise ValueError(f"bfd_routing must be one of {ROUTINGS}, got {self.bfd_routing!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


class EncoderStage(nn.Module):
    """``Conv3x3 s2 + BN + ELU -> MRF-SE -> SSTM``."""

    def __init__(self, in_channels: int, out_channels: int, stage: int, opts: S2MNetOptions):
        """Build the stage.

        Args:
            in_channels: Channels from the previous stage.
            out_channels: Stage width.
            stage: Stage index (0-based) into the per-stage SSTM flags.
            opts: Network options.
        """
        super().__init__()
        bn = {"bn_momentum": opts.bn_momentum, "bn_eps": opts.bn_eps}
        self.down = ConvBNAct(in_channels, out_channels, 3, stride=2, act=nn.ELU, **bn)
        self.mrf = MRFSEBlock(out_channels, opts.expansion, opts.kernel_sizes, opts.dropout, **bn)
        self.sstm = SSTM(
            out_channels,
            k=opts.K if opts.spectral_k is None else int(opts.spectral_k[stage]),
            d=opts.d,
            use_spectral=opts.sstm_use_spectral[stage],
            use_spatial=opts.sstm_use_spatial[stage],
            spectral_mode=opts.spectral_mode,
            spatial_bottleneck=opts.spatial_bottleneck,
            extra_norms=opts.extra_norms,
            dropout=opts.dropout,
            ln_eps=opts.ln_eps,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Downsample by 2 and mix."""
        return self.sstm(self.mrf(self.down(x)))


class Head(nn.Module):
    """Nearest x2 upsampling, two ``Conv3x3 + ReLU``, ``Conv1x1`` to logits."""

    def __init__(self, in_channels: int, widths: tuple[int, int], num_classes: int) -> None:
        """Build the head.

        Args:
            in_channels: Channels of the last decoder stage.
            widths: Widths of the two 3x3 convs.
            num_classes: Output channels (logits).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.classifier = nn.Conv2d(widths[1], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Upsample to the input resolution and predict logits."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.classifier(x)


class S2MNet(SegmentationNet):
    """S2M-Net (methods.md §1.2-1.6). Returns logits ``(B, num_classes, H, W)`` for any ``H, W``.

    Attributes:
        stride: Inputs are padded internally to a multiple of this (``2 ** len(widths)`` = 32).
        in_channels: Expected input channels.
        num_classes: Output channels (1 = binary).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        options: S2MNetOptions | None = None,
        instance_channels: int = 0,
    ) -> None:
        """Build the network.

        Args:
            in_channels: Input channels (any >= 1).
            num_classes: 1 for binary (sigmoid), >= 2 for softmax classes incl. background.
            options: Architecture options (defaults: the paper model).
        """
        super().__init__(in_channels, num_classes, instance_channels)
        opts = options or S2MNetOptions()
        self.options = opts
        self.stride = 2 ** len(opts.widths)
        bn = {"bn_momentum": opts.bn_momentum, "bn_eps": opts.bn_eps}

        self.stem = ConvBNAct(in_channels, opts.stem, 3, act=nn.ELU, **bn)
        chans = [opts.stem, *opts.widths]
        self.encoders = nn.ModuleList(
            EncoderStage(chans[i], chans[i + 1], i, opts) for i in range(len(opts.widths))
        )
        widths = list(opts.widths)
        decoders = []
        coarse = widths[-1]
        for skip in reversed(widths[:-1]):
            decoders.append(BFDStage(coarse, skip, skip, opts.bfd_routing, **bn))
            coarse = skip
        self.decoders = nn.ModuleList(decoders)
        # The instance head shares the BFD decoder and the head convs: only the last 1x1 conv
        # gets its extra output channels (boundary, distance).
        self.head = Head(widths[0], opts.head_widths, self.out_channels)
        keras_init_(self)

    def _decode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and BFD boundary maps for an input padded to a multiple of ``stride``."""
        feats = []
        y = self.stem(x)
        for enc in self.encoders:
            y = enc(y)
            feats.append(y)
        betas = []
        y = feats[-1]
        for dec, skip in zip(self.decoders, reversed(feats[:-1]), strict=True):
            y, beta = dec.forward_with_boundary(y, skip)
            betas.append(beta)
        return self.head(y), betas

    def forward_padded(self, x: Tensor) -> Tensor:
        """Logits for an input padded to a multiple of ``stride``."""
        return self._decode(x)[0]

    def forward_with_boundaries(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits plus the BFD boundary maps beta (coarse to fine, on the padded grid).

        The maps get no supervision; they are exposed for inspection (e.g. correlation with
        ground-truth edges, paper §1.5).
        """
        x, pads = self.pad(x)
        logits, betas = self._decode(x)
        return self.crop(logits, pads), betas

    def mrf_se_kernels(self) -> list[nn.Parameter]:
        """Conv kernels of the MRF-SE blocks (the reference code's L2 1e-4 targets)."""
        return [p for enc in self.encoders for p in enc.mrf.conv_kernels()]


@register_model(
    "s2mnet",
    S2MNetOptions,
    "S2M-Net (4.7M): MRF-SE + spectral-spatial token mixer encoder, boundary-focused decoder.",
)
def build_s2mnet(config: ModelConfig, options: S2MNetOptions) -> S2MNet:
    """Registry builder."""
    return S2MNet(config.in_channels, config.num_classes, options, config.instance_channels)


__all__ = ["EncoderStage", "Head", "S2MNet", "S2MNetOptions", "build_s2mnet"]
