"""The truncated 2-D spectral filter of SSTM as matrix products with a fixed DFT basis.

S2M-Net's spectral branch (``SpectralFilter``, ``mode="crop"``) computes
``irfft2(rfft2(x) * F, s=(H, W))`` where the real filter ``F`` is zero everywhere except on
``Kh`` rows and the first ``Q = Kw//2 + 1`` columns of the ``rfft2`` half plane. Only those
``Kh x Q`` coefficients matter, so the transform is exactly (up to float rounding)

1. a real DFT along the columns restricted to ``Q`` frequencies (``W -> 2Q`` real numbers),
2. a complex DFT along the rows restricted to the ``Kh`` kept row frequencies,
3. the filter, and the same two steps inverted (``irfft``'s Hermitian weights included).

Each step is one ``matmul`` with a small constant matrix, which:

* exports to ONNX / ``torch.export`` as plain ``MatMul`` (no complex tensors, no ``DFT`` op);
* runs in channels-last layout without any copy (contractions over H or W with C innermost);
* costs ``O(HWC(Kh + Q))``, less than the full-size FFT pair plus the layout copies.

The matrices depend only on ``(H, W, rows, Q)`` and are cached per shape (not while a graph is
being traced or exported, so no traced tensor is ever cached).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _tracing() -> bool:
    """True while torch.compile / torch.export / torch.jit trace the model."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if getattr(compiler, "is_compiling", lambda: False)():
            return True
        if getattr(compiler, "is_exporting", lambda: False)():
            return True
    return bool(torch.jit.is_tracing())


def dft_bases(h: int, w: int, rows: np.ndarray, q: int) -> tuple[np.ndarray, ...]:
    """The four real matrices of :func:`truncated_spectral_filter` (float64).

    Args:
        h: Input height H.
        w: Input width W.
        rows: The ``Kh`` kept row frequencies as indices of the unshifted spectrum (distinct,
            in ``[0, H)``), in the order of the filter's rows.
        q: Number of kept column frequencies ``0 .. q - 1`` (``q <= W // 2 + 1``).

    Returns:
        ``col_fwd (2Q, W)``: ``[cos; -sin]`` of the column rDFT;
        ``row_fwd (2Kh, H)``: ``[cos; sin]`` of the row DFT at the kept frequencies;
        ``row_inv (2H, Kh)``: ``[cos^T; sin^T]`` for the inverse row DFT;
        ``col_inv (W, 2Q)``: the inverse column rDFT with ``irfft``'s Hermitian weights and the
        ``1 / (H W)`` normalisation (``norm="backward"``).
    """
    if q > w // 2 + 1:
        raise ValueError(f"q={q} exceeds the {w // 2 + 1} columns of a width-{w} rfft.")
    cols = np.arange(q, dtype=np.float64)
    phi = 2.0 * math.pi * np.outer(cols, np.arange(w)) / w  # (Q, W)
    theta = 2.0 * math.pi * np.outer(np.asarray(rows, dtype=np.float64), np.arange(h)) / h
    col_fwd = np.concatenate([np.cos(phi), -np.sin(phi)])
    row_fwd = np.concatenate([np.cos(theta), np.sin(theta)])
    row_inv = np.concatenate([np.cos(theta).T, np.sin(theta).T])
    # irfft: DC and (even W) Nyquist count once and their imaginary parts are ignored (sin = 0
    # there), every other column stands for itself and its conjugate mirror.
    weight = np.full(q, 2.0)
    weight[0] = 1.0
    if w % 2 == 0 and q == w // 2 + 1:
        weight[-1] = 1.0
    scale = weight[:, None] / (h * w)
    col_inv = np.concatenate([np.cos(phi) * scale, -np.sin(phi) * scale]).T
    return col_fwd, row_fwd, row_inv, col_inv


_CACHE: dict[tuple, tuple[Tensor, ...]] = {}
_CACHE_SIZE = 64  # distinct (shape, device, dtype) keys kept


def torch_bases(
    h: int, w: int, rows: tuple[int, ...], q: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """:func:`dft_bases` as tensors on ``device``; cached per shape in eager mode."""
    key = (h, w, rows, q, str(device), dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit

    def make() -> tuple[Tensor, ...]:
        mats = dft_bases(h, w, np.array(rows), q)
        return tuple(torch.tensor(m, dtype=dtype, device=device) for m in mats)

    if _tracing():  # constants of the traced graph; never cached
        return make()
    # Made outside inference_mode so that the cached tensors also serve training later.
    with torch.inference_mode(False):
        bases = make()
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = bases
    return bases


def truncated_spectral_filter(x: Tensor, filt: Tensor, rows: tuple[int, ...]) -> Tensor:
    """``irfft2(rfft2(x) * F, s=(H, W))`` for a filter ``F`` living on ``Kh x Q`` coefficients.

    Args:
        x: ``(B, C, H, W)`` float32 input (any memory layout; channels-last is copy-free).
        filt: ``(C, Kh, Q)`` real filter: row ``i`` applies at row frequency ``rows[i]`` of the
            unshifted spectrum, column ``j`` at column frequency ``j``.
        rows: The ``Kh`` row indices (Python ints: they fix the basis, not data).

    Returns:
        ``(B, C, H, W)`` float32, in channels-last memory layout.
    """
    # Python ints fix the basis; the batch stays symbolic (-1) so exported graphs keep it dynamic.
    c, h, w = (int(n) for n in x.shape[1:])
    kh, q = int(filt.shape[1]), int(filt.shape[2])
    col_fwd, row_fwd, row_inv, col_inv = torch_bases(h, w, tuple(rows), q, x.device, x.dtype)
    xt = x.permute(0, 2, 3, 1).reshape(-1, w, c)  # free for channels-last input
    x1 = torch.matmul(col_fwd, xt)  # (B*H, 2Q, C): [Re | Im] of the column rDFT
    m = torch.matmul(row_fwd, x1.reshape(-1, h, 2 * q * c)).reshape(-1, 2, kh, 2, q, c)
    f = filt.permute(1, 2, 0)  # (Kh, Q, C)
    # (cos - i sin)(Xr + i Xi) with the cos / sin products from one matmul
    yr = (m[:, 0, :, 0] + m[:, 1, :, 1]) * f
    yi = (m[:, 0, :, 1] - m[:, 1, :, 0]) * f
    v = torch.stack([yr, yi], dim=2).reshape(-1, kh, 2 * q * c)
    p = torch.matmul(row_inv, v).reshape(-1, 2, h, 2, q, c)
    # (cos + i sin)(Yr + i Yi)
    zr = p[:, 0, :, 0] - p[:, 1, :, 1]
    zi = p[:, 0, :, 1] + p[:, 1, :, 0]
    z = torch.stack([zr, zi], dim=2).reshape(-1, 2 * q, c)
    out = torch.matmul(col_inv, z)  # (B*H, W, C)
    return out.reshape(-1, h, w, c).permute(0, 3, 1, 2)


__all__ = ["dft_bases", "torch_bases", "truncated_spectral_filter"]
