"""Building blocks of S2M-Net: MRF-SE, SSTM (spectral-spatial token mixer) and the BFD decoder stage.

All blocks take and return ``(B, C, H, W)`` tensors. Conventions follow the reference Keras code
where the paper is silent (``reference/methods.md`` §1.10):

* BatchNorm uses Keras' defaults (PyTorch ``momentum=0.01, eps=1e-3``);
* convolutions carry a bias (Keras default), weights are Glorot-uniform, biases zero;
* ELU in the encoder (stem, down-convs, MRF-SE), ReLU in the decoder and head;
* LayerNorm is over channels at each pixel with ``eps=1e-6``;
* bilinear resampling uses half-pixel centres (``align_corners=False``), like TF.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_s2mnet.model.dft import truncated_spectral_filter

BN_MOMENTUM = 0.01  # Keras momentum 0.99 == PyTorch momentum 0.01
BN_EPS = 1e-3
LN_EPS = 1e-6

SPECTRAL_MODES = ("crop", "resize")
ROUTINGS = ("soft", "hard", "learned", "none")

# Device types on which ``torch.autocast(enabled=False)`` is understood.
_AUTOCAST_DEVICES = {"cpu", "cuda", "mps", "xpu", "hpu"}


def batch_norm(channels: int, momentum: float = BN_MOMENTUM, eps: float = BN_EPS) -> nn.BatchNorm2d:
    """BatchNorm2d with Keras-like statistics (see module docstring)."""
    return nn.BatchNorm2d(channels, momentum=momentum, eps=eps)


def keras_init_(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv in ``module`` (Keras defaults).

    For a depthwise kernel PyTorch's fan computation ``(1*k*k, C*k*k)`` has the same sum as Keras'
    ``(k*k*C, k*k)``, so the Glorot bound is identical.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off, so FFTs run in float32.

    cuFFT's half-precision path only supports power-of-two sizes and S2M-Net's stage sizes
    (176, 88, 44, 22, 11 at 352^2) are not, so the FFT must never be autocast.
    """
    if device.type in _AUTOCAST_DEVICES:
        try:
            return torch.autocast(device_type=device.type, enabled=False)
        except (RuntimeError, ValueError):  # pragma: no cover - older torch without e.g. MPS
            pass
    return contextlib.nullcontext()  # pragma: no cover - exotic backends without autocast


class ConvBNAct(nn.Sequential):
    """``Conv(k x k, bias) -> BatchNorm -> activation``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Callable[[], nn.Module] | None = nn.ELU,
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = BN_EPS,
    ) -> None:
        """Build the three layers.

        Args:
            in_channels: Input channels.
            out_channels: Output channels.
            kernel_size: Odd kernel size; padding keeps the size (``/stride``).
            stride: Convolution stride.
            groups: Convolution groups (``groups == in_channels`` for depthwise).
            act: Activation factory, or ``None`` for no activation.
            bn_momentum: BatchNorm momentum (PyTorch convention).
            bn_eps: BatchNorm epsilon.
        """
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=True,
            ),
            batch_norm(out_channels, bn_momentum, bn_eps),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every pixel of a ``(B, C, H, W)`` tensor.

    Equivalent to Keras ``LayerNormalization(axis=-1)`` on NHWC data.
    """

    def __init__(self, channels: int, eps: float = LN_EPS) -> None:
        """Create the affine parameters (gamma = 1, beta = 0).

        Args:
            channels: Number of channels normalised together.
            eps: Variance epsilon.
        """
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.channels = int(channels)  # a constant in traced / exported graphs

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` over dim 1."""
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 ELU(W1 GAP(x)))``."""

    def __init__(self, channels: int, reduced: int) -> None:
        """Build the two 1x1 convs.

        Args:
            channels: Channels of the input (F).
            reduced: Bottleneck width r.
        """
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ELU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Rescale the channels of ``x``."""
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.expand(self.act(self.reduce(s))))
        return x * s


class MRFSEBlock(nn.Module):
    """Multi-receptive-field block with squeeze-excitation and a residual (methods.md §1.3).

    ``h = ELU(BN(1x1 C->F))``; three depthwise branches ``ELU(BN(DW k x k))`` for k in
    ``kernel_sizes``; ``ELU(BN(1x1 3F->F))``; SE with ``r = max(F // 16, 8)``;
    ``BN(1x1 F->C)``; dropout; ``x + o``.
    """

    def __init__(
        self,
        channels: int,
        expansion: int = 6,
        kernel_sizes: tuple[int, ...] = (3, 5, 7),
        dropout: float = 0.1,
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = BN_EPS,
    ) -> None:
        """Build the block.

        Args:
            channels: Stage width C (input = output channels).
            expansion: Expansion factor E (F = E * C).
            kernel_sizes: Depthwise kernel sizes, one branch each.
            dropout: Dropout probability on the block output (before the residual add).
            bn_momentum: BatchNorm momentum.
            bn_eps: BatchNorm epsilon.
        """
        super().__init__()
        hidden = expansion * channels
        bn = {"bn_momentum": bn_momentum, "bn_eps": bn_eps}
        self.expand = ConvBNAct(channels, hidden, 1, act=nn.ELU, **bn)
        self.branches = nn.ModuleList(
            ConvBNAct(hidden, hidden, k, groups=hidden, act=nn.ELU, **bn) for k in kernel_sizes
        )
        self.merge = ConvBNAct(len(kernel_sizes) * hidden, hidden, 1, act=nn.ELU, **bn)
        self.se = SqueezeExcite(hidden, max(hidden // 16, 8))
        self.project = ConvBNAct(hidden, channels, 1, act=None, **bn)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Residual MRF-SE update of ``x``."""
        h = self.expand(x)
        # merge(cat[b3, b5, b7]) without materialising the 3F-channel concat: the 1x1 conv is
        # linear, so it equals the sum of one F->F 1x1 conv per branch with the matching slice
        # of the same weight (identical parameters; ~25% faster for this block on CPU).
        conv = self.merge[0]
        weights = conv.weight.split(h.shape[1], dim=1)
        m = F.conv2d(self.branches[0](h), weights[0], conv.bias)
        for branch, weight in zip(self.branches[1:], weights[1:], strict=True):
            m = m.add_(F.conv2d(branch(h), weight))
        for layer in list(self.merge)[1:]:  # BN, ELU
            m = layer(m)
        o = self.dropout(self.project(self.se(m)))
        return x + o

    def conv_kernels(self) -> list[nn.Parameter]:
        """Conv kernels (no biases, no norms): the reference code puts L2 1e-4 on exactly these."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]


def radial_gaussian(fr: Tensor, fc: Tensor) -> Tensor:
    """Reference-code filter init: ``0.5 * exp(-(r - 0.25)^2 / (2 * 0.15^2))``, ``r = |f|``.

    Args:
        fr: Row frequencies in cycles/sample, shape ``(R, 1)``.
        fc: Column frequencies in cycles/sample, shape ``(1, Q)``.

    Returns:
        ``(R, Q)`` band-pass values: about 0.125 at DC, 0.5 at ``r = 0.25``.
    """
    r = torch.sqrt(fr**2 + fc**2)
    return 0.5 * torch.exp(-((r - 0.25) ** 2) / (2 * 0.15**2))


def crop_rows(k: int, n: int) -> Tensor:
    """Unshifted-spectrum indices of the ``k`` lowest frequencies of an ``n``-point FFT.

    The centred crop ``fftshift(X)[n//2 - k//2 : n//2 - k//2 + k]`` holds the frequencies
    ``-k//2 .. k - k//2 - 1``; in the unshifted spectrum these sit at both ends (the "corners"):
    ``0 .. k - k//2 - 1`` and ``n - k//2 .. n - 1``. Returned in centred order.
    """
    return (torch.arange(k) - k // 2) % n


class SpectralFilter(nn.Module):
    """Spectral branch of SSTM: a learnable real filter on the K x K lowest frequencies.

    ``mode="crop"`` (default, paper §1.4.1/§1.4.3): ``Re(IFFT(ifftshift(ZeroPad(Crop_K(fftshift(FFT
    x)) * W))))``, computed with ``rfft2``/``irfft2``. A real filter followed by ``Re(IFFT)`` acts as
    its Hermitian-symmetrised version, so a filter on the half plane is enough. The parameter
    ``weight`` has shape ``(C, K, K//2 + 1)``: row ``i`` is the row frequency ``i - K//2`` (centred
    order, like ``fftshift``), column ``j`` the column frequency ``j`` (like ``rfftfreq``). At run time
    ``Kh, Kw = min(K, H), min(K, W)`` and the centred ``Kh x (Kw//2 + 1)`` sub-block is used, placed
    at the rows ``crop_rows(Kh, H)`` and columns ``0 .. Kw//2`` of the ``rfft2`` half plane.

    For even ``Kh < H`` and ``Kw < W`` the half-plane element at row ``-Kh/2``, column ``Kw/2`` is
    outside the paper crop and its mirror, so it is masked to zero: every filter this module can
    express is then an instance of the paper formula (checked in the unit tests). Conversely
    every paper filter is expressed exactly except, for even ``Kh < H``, its entries at row
    ``-Kh/2`` and columns ``<= 0``, whose mirror image (row ``+Kh/2``) lies outside the
    ``Kh``-row block: an edge row of the crop, a negligible difference.

    ``mode="resize"`` (reference Keras code, for parity): bilinearly resize the real and imaginary
    parts of the unshifted ``fft2`` spectrum to ``k x k`` (``k = min(K, H, W)``), multiply by a real
    ``(C, K, K)`` filter (bilinearly resized to ``k x k`` when ``k < K``), resize back, ``Re(IFFT)``.

    The FFTs always run in float32 with autocast disabled; the output is float32.
    """

    def __init__(self, channels: int, k: int = 32, mode: str = "crop") -> None:
        """Create the filter with the radial Gaussian band-pass initialisation.

        Args:
            channels: Number of channels C (one filter per channel).
            k: Number of lowest frequencies K kept along each axis.
            mode: ``"crop"`` (paper) or ``"resize"`` (reference code).
        """
        super().__init__()
        if mode not in SPECTRAL_MODES:
            raise ValueError(f"spectral_mode must be one of {SPECTRAL_MODES}, got {mode!r}.")
        if k < 1:
            raise ValueError(f"The spectral crop size K must be >= 1, got {k}.")
        self.k = k
        self.mode = mode
        if mode == "crop":
            fr = (torch.arange(k, dtype=torch.float64) - k // 2) / k  # fftshift(fftfreq(k))
            fc = torch.arange(k // 2 + 1, dtype=torch.float64) / k  # rfftfreq(k)
        else:
            fr = torch.fft.fftfreq(k, dtype=torch.float64)  # unshifted, as the code
            fc = torch.fft.fftfreq(k, dtype=torch.float64)
        init = radial_gaussian(fr[:, None], fc[None, :]).float()
        self.weight = nn.Parameter(init.expand(channels, -1, -1).clone())
        # (h, w) -> (rows, mask): plain Python / numpy, so tracing or export never caches a
        # traced tensor here.
        self._layout_cache: dict[tuple[int, int], tuple[tuple[int, ...], np.ndarray]] = {}

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"channels={self.weight.shape[0]}, k={self.k}, mode={self.mode!r}"

    def _layout(self, h: int, w: int) -> tuple[tuple[int, ...], np.ndarray]:
        """Row indices and corner mask of the ``Kh x (Kw//2 + 1)`` block for an ``h x w`` input."""
        key = (h, w)
        if key not in self._layout_cache:
            self._layout_cache[key] = self._make_layout(h, w)
        return self._layout_cache[key]

    def _make_layout(self, h: int, w: int) -> tuple[tuple[int, ...], np.ndarray]:
        """Compute the layout (see :meth:`_layout`); small loops, run once per input size."""
        kh, kw = min(self.k, h), min(self.k, w)
        # numpy, not crop_rows' torch ops: under torch.export those would be symbolic.
        rows = tuple(int(r) for r in (np.arange(kh) - kh // 2) % h)
        row_set = set(rows)
        col_set = {int(c) for c in (np.arange(kw) - kw // 2) % w}
        # 1 where the half-plane element or its mirror lies in the centred crop (mod H, W).
        mask = np.ones((kh, kw // 2 + 1), dtype=np.float32)
        for i, r in enumerate(rows):
            for c in range(kw // 2 + 1):
                inside = r in row_set and c in col_set
                mirror = (-r) % h in row_set and (-c) % w in col_set
                if not (inside or mirror):
                    mask[i, c] = 0.0
        return rows, mask

    def filter_block(self, h: int, w: int) -> tuple[Tensor, tuple[int, ...]]:
        """The ``(C, Kh, Kw//2 + 1)`` float32 filter and the ``rfft2`` rows it applies at."""
        kh, kw = min(self.k, h), min(self.k, w)
        r0 = self.k // 2 - kh // 2
        rows, mask = self._layout(h, w)
        mask_t = torch.tensor(mask, device=self.weight.device)
        return self.weight[:, r0 : r0 + kh, : kw // 2 + 1].float() * mask_t, rows

    def half_plane_filter(self, h: int, w: int) -> Tensor:
        """The ``(C, H, W//2 + 1)`` real filter applied to ``rfft2`` of an ``h x w`` input."""
        sub, rows = self.filter_block(h, w)
        full = sub.new_zeros(sub.shape[0], h, w // 2 + 1)
        full[:, list(rows), : sub.shape[2]] = sub
        return full

    def forward(self, x: Tensor) -> Tensor:
        """Filter ``x`` (any float dtype) in the frequency domain; returns float32.

        ``mode="crop"`` computes ``irfft2(rfft2(x) * half_plane_filter)`` as matrix products
        with a fixed DFT basis on the kept frequencies only (:mod:`napari_s2mnet.model.dft`):
        the same numbers to float rounding, exportable to ONNX, and copy-free in
        channels-last layout.
        """
        # Python ints: the DFT basis is a constant of the (traced or exported) graph.
        h, w = int(x.shape[-2]), int(x.shape[-1])
        with fp32_region(x.device):
            xf = x.float()
            if self.mode == "crop":
                block, rows = self.filter_block(h, w)
                return truncated_spectral_filter(xf, block, rows)
            return self._resize_forward(xf)

    def _resize_forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        k = min(self.k, h, w)
        spec = torch.fft.fft2(x)
        parts = torch.cat([spec.real, spec.imag], dim=1)
        parts = F.interpolate(parts, size=(k, k), mode="bilinear", align_corners=False)
        filt = self.weight.float()
        if k != self.k:
            filt = F.interpolate(filt[None], size=(k, k), mode="bilinear", align_corners=False)[0]
        parts = parts * filt.repeat(2, 1, 1)
        parts = F.interpolate(parts, size=(h, w), mode="bilinear", align_corners=False)
        real, imag = parts.chunk(2, dim=1)
        return torch.fft.ifft2(torch.complex(real, imag)).real


class GatedSpatialMixer(nn.Module):
    """Content-gated spatial branch of SSTM (per-pixel dense layers as 1x1 convs).

    ``g = sigmoid(W_g x)``; paper form: ``W_C ELU(W_B (x * g))`` with a ``d``-wide bottleneck;
    code form (``bottleneck=False``): ``W (x * g)`` with a full ``C x C`` projection and no ELU.
    """

    def __init__(self, channels: int, d: int = 16, bottleneck: bool = True) -> None:
        """Build the gate and the projection.

        Args:
            channels: Channels C.
            d: Bottleneck width (paper: 16); ignored when ``bottleneck`` is False.
            bottleneck: Paper form (True) or reference-code form (False).
        """
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 1)
        if bottleneck:
            self.project: nn.Module = nn.Sequential(
                nn.Conv2d(channels, d, 1), nn.ELU(), nn.Conv2d(d, channels, 1)
            )
        else:
            self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Gate the tokens by content and mix their channels."""
        return self.project(x * torch.sigmoid(self.gate(x)))


class SSTM(nn.Module):
    """Spectral-Selective Token Mixer (methods.md §1.4.3).

    ``y = Conv1x1_{2C->C}([LN(x_spec), LN(x_gate)])`` when both branches are on, else the single
    branch; ``out = x + Dropout(LN(y))``. With ``extra_norms`` (default, as the reference code) each
    branch output gets its own LN and the fused output a second LN (``LN_out(LN_fusion(y))``).
    With both branches off the block is the identity.
    """

    def __init__(
        self,
        channels: int,
        k: int = 32,
        d: int = 16,
        use_spectral: bool = True,
        use_spatial: bool = True,
        spectral_mode: str = "crop",
        spatial_bottleneck: bool = True,
        extra_norms: bool = True,
        dropout: float = 0.1,
        ln_eps: float = LN_EPS,
    ) -> None:
        """Build the branches.

        Args:
            channels: Channels C.
            k: Spectral crop size K.
            d: Spatial bottleneck width.
            use_spectral: Enable the spectral branch.
            use_spatial: Enable the content-gated spatial branch.
            spectral_mode: ``"crop"`` (paper) or ``"resize"`` (reference code).
            spatial_bottleneck: Paper ``d``-bottleneck (True) or code's full ``C x C`` (False).
            extra_norms: The reference code's extra LNs (per branch and a second output LN).
            dropout: Dropout on the mixer output.
            ln_eps: LayerNorm epsilon.
        """
        super().__init__()
        self.use_spectral = use_spectral
        self.use_spatial = use_spatial
        self.spectral = SpectralFilter(channels, k, spectral_mode) if use_spectral else None
        self.spatial = GatedSpatialMixer(channels, d, spatial_bottleneck) if use_spatial else None
        n_branches = int(use_spectral) + int(use_spatial)
        self.enabled = n_branches > 0

        def ln() -> nn.Module:
            return ChannelLayerNorm(channels, ln_eps)

        self.spectral_norm = ln() if (extra_norms and use_spectral) else None
        self.spatial_norm = ln() if (extra_norms and use_spatial) else None
        self.fusion = nn.Conv2d(2 * channels, channels, 1) if n_branches == 2 else None
        # Paper: one LN on the fused output. Code: fusion_norm only after a real fusion + out_norm.
        self.fusion_norm = ln() if (self.enabled and (n_branches == 2 or not extra_norms)) else None
        self.out_norm = ln() if (self.enabled and extra_norms) else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Residual token mixing of ``x``."""
        if not self.enabled:
            return x
        feats = []
        if self.spectral is not None:
            s = self.spectral(x).to(x.dtype)
            feats.append(self.spectral_norm(s) if self.spectral_norm is not None else s)
        if self.spatial is not None:
            g = self.spatial(x)
            feats.append(self.spatial_norm(g) if self.spatial_norm is not None else g)
        y = self.fusion(torch.cat(feats, dim=1)) if self.fusion is not None else feats[0]
        if self.fusion_norm is not None:
            y = self.fusion_norm(y)
        if self.out_norm is not None:
            y = self.out_norm(y)
        return x + self.dropout(y)


class BFDStage(nn.Module):
    """Boundary-Focused Decoder stage (methods.md §1.5).

    ``u = bilinear(d -> size(e))``; region stream ``r = CBR(CBR([u, e]))``; boundary map
    ``beta = sigmoid(1x1(ReLU(3x3_{f->f/2}(r))))``; refined stream ``e_b = CBR(r * beta)``;
    routing (``"soft"``: ``r (1 - beta) + e_b beta``; ``"hard"``: the same with ``beta > 0.5``
    and a straight-through gradient; ``"learned"``: a per-pixel 2-way softmax from a 1x1 conv on
    ``[r, e_b]``; ``"none"``: concatenate ``[r, e_b]``); ``out = CBR_{1x1}(z)``.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        routing: str = "soft",
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = BN_EPS,
    ) -> None:
        """Build the stage.

        Args:
            in_channels: Channels of the coarser decoder feature ``d``.
            skip_channels: Channels of the encoder skip ``e``.
            out_channels: Output width f.
            routing: ``"soft"`` (default), ``"hard"``, ``"learned"`` or ``"none"``.
            bn_momentum: BatchNorm momentum.
            bn_eps: BatchNorm epsilon.
        """
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"bfd_routing must be one of {ROUTINGS}, got {routing!r}.")
        f = out_channels
        bn = {"bn_momentum": bn_momentum, "bn_eps": bn_eps}
        self.routing = routing
        self.region = nn.Sequential(
            ConvBNAct(in_channels + skip_channels, f, 3, act=nn.ReLU, **bn),
            ConvBNAct(f, f, 3, act=nn.ReLU, **bn),
        )
        half = max(f // 2, 1)
        self.boundary = nn.Sequential(
            nn.Conv2d(f, half, 3, padding=1), nn.ReLU(), nn.Conv2d(half, 1, 1), nn.Sigmoid()
        )
        self.refine = ConvBNAct(f, f, 3, act=nn.ReLU, **bn)
        self.router = nn.Conv2d(2 * f, 2, 1) if routing == "learned" else None
        z_channels = 2 * f if routing == "none" else f
        self.out = ConvBNAct(z_channels, f, 1, act=nn.ReLU, **bn)

    def forward_with_boundary(self, d: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        """Decode one level; returns ``(out, beta)`` with ``beta`` of shape ``(B, 1, H, W)``."""
        u = F.interpolate(d, size=e.shape[-2:], mode="bilinear", align_corners=False)
        r = self.region(torch.cat([u, e], dim=1))
        beta = self.boundary(r)
        e_b = self.refine(r * beta)
        if self.routing == "soft":
            z = r * (1 - beta) + e_b * beta
        elif self.routing == "hard":
            hard = beta + ((beta > 0.5).to(beta.dtype) - beta).detach()  # straight-through
            z = r * (1 - hard) + e_b * hard
        elif self.routing == "learned":
            assert self.router is not None
            a = torch.softmax(self.router(torch.cat([r, e_b], dim=1)), dim=1)
            z = r * a[:, :1] + e_b * a[:, 1:]
        else:
            z = torch.cat([r, e_b], dim=1)
        return self.out(z), beta

    def forward(self, d: Tensor, e: Tensor) -> Tensor:
        """Decode one level (see :meth:`forward_with_boundary`)."""
        return self.forward_with_boundary(d, e)[0]


__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "LN_EPS",
    "ROUTINGS",
    "SPECTRAL_MODES",
    "SSTM",
    "BFDStage",
    "ChannelLayerNorm",
    "ConvBNAct",
    "GatedSpatialMixer",
    "MRFSEBlock",
    "SpectralFilter",
    "SqueezeExcite",
    "batch_norm",
    "crop_rows",
    "fp32_region",
    "keras_init_",
    "radial_gaussian",
]
