"""Dual Sparse Selection Attention (DSSA) and full attention with LePE (methods.md §3.1-§3.2).

DSSA (MedFormer / DSSAU-Net, Xia et al.) extends BiFormer's bi-level routing attention with a second,
pixel-level sparse selection:

1. ``q, k, v = Conv1x1(x)`` (with bias).
2. The token map is split into an ``S x S`` grid of regions (``S = n_win``).
3. **Region routing** (first selection): region means of the *detached* queries and keys,
   ``A_r = Q_r K_r^T`` (no scale, no softmax, only the ranking matters), top-``k1`` region indices
   per query region, shared by all heads. The indices carry no gradient.
4. The keys / values of the ``k1`` routed regions are gathered (``k1 * m`` candidates per query,
   ``m`` = tokens per region).
5. **Pixel selection** (second selection): per query and head, only the top
   ``k2 = max(1, floor(k1 * m * pixel_keep_ratio))`` scores are kept; the softmax runs over the
   kept scores only. This uses the masked dense formulation of methods.md §3.1: scores outside the
   per-row top-``k2`` set are ``-inf`` before an fp32 softmax (identical to the reference code's
   gather-based version up to ties).
6. ``out = proj(attn(v) + LePE(v))`` with ``LePE`` a depthwise 5x5 conv on the value map.

Padding (deviation from the reference, on by default): a token map whose side is not a multiple of
the region size is zero-padded at the bottom / right, and the padded keys are masked with ``-inf``
*before* the pixel top-k, so they can never be selected (``mask_padding=False`` restores the
reference code, where zero keys score 0 and can be picked). Region means exclude the padding in
both modes (the reference's ``count_include_pad=False``). The region size is ``ceil(side / S)``
and the grid ``ceil(side / region)``, so every region holds at least one real token; for sides
divisible by ``S`` this is exactly the reference's ``S x S`` grid of ``side / S`` regions.

Memory: the score block is ``B * heads * n * m * k1 * m`` floats. With a fixed ``S x S`` grid the
region size grows with the input, so at stage 1 (``k1 = 1``) the cost per query grows with the
tile area: 64 candidates per query at 256^2 inputs, 256 at 512^2, 1024 at 1024^2 (about 0.27 GB
of fp32 scores per head per image). Keep inference tiles around 256-512 px.

Scale: ``scale="channel"`` (default) uses ``C^-1/2`` with the *full* channel width, as the reference
code does (inherited from BiFormer); ``scale="head"`` uses the usual ``d^-1/2``.

:class:`FullAttentionLePE` is the last-stage attention of the reference (``topk = -2``): global
multi-head attention with 8 heads, qkv without bias, scale ``d^-1/2``, and the LePE depthwise conv
applied to the attention's *input* tokens (not to V). The asymmetry with DSSA is kept for parity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DSSA", "DSSADetails", "FullAttentionLePE", "region_geometry"]

_SCALES = ("channel", "head")


def region_geometry(height: int, width: int, n_win: int) -> tuple[int, int, int, int]:
    """Region size and grid for a token map.

    Args:
        height: Token-map height (>= 1).
        width: Token-map width (>= 1).
        n_win: Target number of regions per side (``S``).

    Returns:
        ``(region_h, region_w, grid_h, grid_w)`` with ``region = ceil(side / S)`` and
        ``grid = ceil(side / region) <= S``; the padded map is ``grid * region`` per side and
        every region contains at least one real token.
    """
    region_h = max(1, math.ceil(height / n_win))
    region_w = max(1, math.ceil(width / n_win))
    return region_h, region_w, math.ceil(height / region_h), math.ceil(width / region_w)


class DSSADetails(NamedTuple):
    """Internals of one DSSA forward pass (for inspection and tests).

    Attributes:
        region_index: ``(B, n, k1)`` routed key-region indices per query region (shared by heads).
        weights: ``(B, heads, n, m, k1 * m)`` attention weights; exactly the kept (top-``k2``)
            candidates of each row are non-zero (fewer if a row has fewer than ``k2`` real keys).
        key_valid: ``(B, 1, n, 1, k1 * m)`` bool, True where a gathered candidate is a real token
            (False for padding).
        grid: ``(grid_h, grid_w)`` regions per side; ``n = grid_h * grid_w``.
        region_size: ``(region_h, region_w)`` tokens per region side; ``m = region_h * region_w``.
        k1: Number of routed regions actually used (``min(topk, n)``).
        k2: Number of candidates kept per query row.
    """

    region_index: Tensor
    weights: Tensor
    key_valid: Tensor
    grid: tuple[int, int]
    region_size: tuple[int, int]
    k1: int
    k2: int


def _to_regions(x: Tensor, heads: int, gh: int, rh: int, gw: int, rw: int) -> Tensor:
    """``(B, C, gh*rh, gw*rw)`` -> ``(B, heads, n, m, d)`` with ``n = gh*gw``, ``m = rh*rw``."""
    b, c = x.shape[:2]
    x = x.reshape(b, heads, c // heads, gh, rh, gw, rw)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, heads, gh * gw, rh * rw, c // heads)


def _from_regions(x: Tensor, gh: int, rh: int, gw: int, rw: int) -> Tensor:
    """Inverse of :func:`_to_regions`: ``(B, heads, n, m, d)`` -> ``(B, C, gh*rh, gw*rw)``."""
    b, heads, _, _, d = x.shape
    x = x.reshape(b, heads, gh, gw, rh, rw, d)
    return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, heads * d, gh * rh, gw * rw)


def _gather_regions(x: Tensor, index: Tensor) -> Tensor:
    """Gather routed regions: ``x (B, h, n, m, d)``, ``index (B, n, k)`` -> ``(B, h, n, k*m, d)``."""
    b, h, _, m, d = x.shape
    n, k = index.shape[1:]
    idx = index.reshape(b, 1, n * k, 1, 1).expand(b, h, n * k, m, d)
    return torch.gather(x, 2, idx).reshape(b, h, n, k * m, d)


class DSSA(nn.Module):
    """Dual Sparse Selection Attention on an NCHW feature map.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``h`` (``C`` must be divisible by it).
        n_win: Regions per side ``S``.
        topk: Routed regions per query region ``k1`` (>= 1; capped at the number of regions).
        pixel_keep_ratio: Fraction of the ``k1 * m`` candidates kept per query (``k2``).
        scale: ``"channel"`` (``C^-1/2``, reference code) or ``"head"`` (``d^-1/2``).
        mask_padding: Mask zero-padded keys with ``-inf`` before the pixel top-k (default); False
            reproduces the reference code, where padded keys can be selected.
        lepe_kernel: Kernel of the depthwise LePE conv on V (odd, >= 1).
        qkv_bias: Bias on the qkv projection (the reference has one).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int = 8,
        topk: int = 4,
        pixel_keep_ratio: float = 0.125,
        scale: str = "channel",
        mask_padding: bool = True,
        lepe_kernel: int = 5,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"DSSA dim ({dim}) must be a positive multiple of num_heads ({num_heads})."
            )
        if n_win < 1:
            raise ValueError(f"n_win must be >= 1, got {n_win}.")
        if topk < 1:
            raise ValueError(
                f"DSSA topk (k1) must be >= 1, got {topk}; use full attention instead."
            )
        if not 0.0 < pixel_keep_ratio <= 1.0:
            raise ValueError(f"pixel_keep_ratio must be in (0, 1], got {pixel_keep_ratio}.")
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}.")
        if lepe_kernel < 1 or lepe_kernel % 2 == 0:
            raise ValueError(f"lepe_kernel must be odd and >= 1, got {lepe_kernel}.")
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.pixel_keep_ratio = pixel_keep_ratio
        self.mask_padding = mask_padding
        self.scale_mode = scale
        head_dim = dim // num_heads
        self.scale = (dim if scale == "channel" else head_dim) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def keep_count(self, k1: int, region_tokens: int) -> int:
        """``k2 = max(1, floor(k1 * m * pixel_keep_ratio))``, at most the ``k1 * m`` candidates."""
        candidates = k1 * region_tokens
        # The small epsilon keeps e.g. 64 * 0.125 from flooring to 7 through rounding error.
        return min(candidates, max(1, math.floor(candidates * self.pixel_keep_ratio + 1e-9)))

    def forward(
        self, x: Tensor, return_details: bool = False
    ) -> Tensor | tuple[Tensor, DSSADetails]:
        """Attend over ``x``.

        Args:
            x: ``(B, C, H, W)`` with any ``H, W >= 1``.
            return_details: Also return a :class:`DSSADetails` with routing and weights.

        Returns:
            ``(B, C, H, W)``, plus the details when asked.
        """
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"DSSA expects (B, {self.dim}, H, W), got {tuple(x.shape)}.")
        b, _, height, width = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=1)
        lepe = self.lepe(v)  # on the unpadded value map, as in the reference

        rh, rw, gh, gw = region_geometry(height, width, self.n_win)
        pad_h, pad_w = gh * rh - height, gw * rw - width
        if pad_h or pad_w:
            q, k, v = (F.pad(t, (0, pad_w, 0, pad_h)) for t in (q, k, v))
        n, m = gh * gw, rh * rw

        # Real-token mask on the padded grid, in region layout: (n, m).
        valid = torch.zeros(gh * rh, gw * rw, dtype=torch.bool, device=x.device)
        valid[:height, :width] = True
        valid_seq = _to_regions(valid.view(1, 1, gh * rh, gw * rw), 1, gh, rh, gw, rw)
        valid_seq = valid_seq.reshape(n, m)
        counts = valid_seq.sum(-1).to(torch.float32).clamp_min(1.0)  # (n,)

        # Region routing: stop-gradient, means over real tokens only, no scale, no softmax.
        with torch.no_grad():
            q_r = _to_regions(q.detach().float(), 1, gh, rh, gw, rw).sum(3)[:, 0] / counts[:, None]
            k_r = _to_regions(k.detach().float(), 1, gh, rh, gw, rw).sum(3)[:, 0] / counts[:, None]
            a_r = q_r @ k_r.transpose(-1, -2)  # (B, n, n)
            k1 = min(self.topk, n)
            region_index = torch.topk(a_r, k1, dim=-1).indices  # (B, n, k1), shared by heads

        q_seq = _to_regions(q, heads, gh, rh, gw, rw)  # (B, h, n, m, d)
        k_g = _gather_regions(_to_regions(k, heads, gh, rh, gw, rw), region_index)  # (B,h,n,k1m,d)
        v_g = _gather_regions(_to_regions(v, heads, gh, rh, gw, rw), region_index)

        scores = ((q_seq * self.scale) @ k_g.transpose(-1, -2)).float()  # (B, h, n, m, k1m)
        key_valid = valid_seq[region_index].reshape(b, 1, n, 1, k1 * m)
        if self.mask_padding:
            scores = scores.masked_fill(~key_valid, float("-inf"))

        # Pixel-level selection: keep the per-row top-k2, softmax over those only (fp32).
        k2 = self.keep_count(k1, m)
        top_val, top_idx = scores.topk(k2, dim=-1)
        kept = torch.full_like(scores, float("-inf")).scatter(-1, top_idx, top_val)
        weights = torch.softmax(kept, dim=-1)
        out = weights.to(v_g.dtype) @ v_g  # (B, h, n, m, d)

        out = _from_regions(out, gh, rh, gw, rw)[:, :, :height, :width]
        out = self.proj(out + lepe)
        if return_details:
            details = DSSADetails(
                region_index=region_index,
                weights=weights,
                key_valid=key_valid,
                grid=(gh, gw),
                region_size=(rh, rw),
                k1=k1,
                k2=k2,
            )
            return out, details
        return out


class FullAttentionLePE(nn.Module):
    """Global multi-head self-attention with LePE on an NCHW map (the last stage, methods.md §3.2).

    As in the reference: qkv ``Linear`` without bias, scale ``d^-1/2``, depthwise LePE conv on the
    attention *input*, output ``Linear`` with bias.

    Args:
        dim: Channels ``C``.
        num_heads: Heads (the reference uses 8 regardless of width).
        lepe_kernel: Kernel of the depthwise LePE conv (odd, >= 1).
        qkv_bias: Bias on the qkv projection (the reference has none).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, lepe_kernel: int = 5, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"Full attention dim ({dim}) must be a positive multiple of num_heads ({num_heads})."
            )
        if lepe_kernel < 1 or lepe_kernel % 2 == 0:
            raise ValueError(f"lepe_kernel must be odd and >= 1, got {lepe_kernel}.")
        self.dim = dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(
                f"FullAttentionLePE expects (B, {self.dim}, H, W), got {tuple(x.shape)}."
            )
        b, c, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(tokens).reshape(b, -1, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale d^-1/2
        out = out.transpose(1, 2).reshape(b, -1, c)
        out = out + self.lepe(x).flatten(2).transpose(1, 2)
        return self.proj(out).transpose(1, 2).reshape(b, c, height, width)
