"""Building blocks of the losses: target handling, stable BCE, morphological operators, the five
MASL components (methods.md §1.7.4) and the reference code's descriptors (§1.7.2).

Conventions: ``z`` are logits ``(B, C, H, W)``, ``p`` the probabilities (sigmoid for ``C == 1``,
softmax otherwise), ``y`` the one-hot / binary target as float ``(B, C, H, W)``. Every component
returns a per-sample tensor of shape ``(B,)`` so MASL can apply per-sample or per-batch modulation;
the batch value of a component is the mean over the batch. Everything runs in fp32.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: The ε of the MASL formulas (Dice/IoU smoothing, areas, normalisation).
EPS = 1e-6
#: Term inside the square root of the soft perimeter when ε sits outside it (keeps the gradient
#: finite at flat regions without biasing the perimeter: sqrt(1e-12) * 352^2 = 0.12 px).
SQRT_EPS_FIXED = 1e-12
#: Boundary-band kernel of the weighted BCE and of the reference irregularity (5x5).
BAND_KERNEL = 5
#: Scales and weights of the multi-scale gradient alignment (L_bnd).
BND_SCALES: tuple[int, ...] = (1, 2, 4)
BND_WEIGHTS: tuple[float, ...] = (0.5, 0.3, 0.2)
#: Log terms are clamped like torch's BCE so a saturated prediction never gives inf/NaN.
_LOG_MIN = -100.0


def fp32_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast: the losses and MASL's weights must never run in fp16/bf16."""
    if device.type in ("cuda", "cpu", "mps", "xpu"):
        try:
            return torch.autocast(device_type=device.type, enabled=False)
        except RuntimeError:  # pragma: no cover - backend without autocast support
            pass
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def prepare_inputs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``logits`` / ``target`` and return ``(z, y, fg)`` in fp32.

    Args:
        logits: ``(B, C, H, W)``; ``C == 1`` is binary (sigmoid), ``C >= 2`` multi-class (softmax).
        target: binary: ``(B, 1, H, W)`` or ``(B, H, W)`` with values in ``[0, 1]`` (bool, int or
            float); multi-class: ``(B, H, W)`` (or ``(B, 1, H, W)``) integer class ids in
            ``[0, C)``, or a float one-hot ``(B, C, H, W)``.

    Returns:
        ``z`` float32 logits, ``y`` float32 target ``(B, C, H, W)``, ``fg`` bool ``(B, H, W)``
        (binary: ``y > 0.5``; multi-class: the union of the non-background classes).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be torch tensors.")
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (B, C, H, W), got {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}.")
    b, c, h, w = logits.shape
    z = logits.float()
    if target.device != logits.device:
        target = target.to(logits.device)
    if c == 1:
        if target.ndim == 3:
            target = target.unsqueeze(1)
        if target.shape != (b, 1, h, w):
            raise ValueError(
                f"binary target must have shape (B, 1, H, W) or (B, H, W) = {(b, 1, h, w)}, "
                f"got {tuple(target.shape)}."
            )
        y = target.float()
        if y.numel() and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                "binary target values must lie in [0, 1] (0 = background, 1 = object)."
            )
        return z, y, y[:, 0] > 0.5
    if target.ndim == 4 and target.shape[1] == c and target.is_floating_point():
        y = target.float()
        return z, y, y[:, 1:].sum(1) > 0.5
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 3 or target.shape != (b, h, w):
        raise ValueError(
            f"multi-class target must be (B, H, W) class ids = {(b, h, w)} (or one-hot "
            f"(B, C, H, W)), got {tuple(target.shape)}."
        )
    if target.is_floating_point():
        raise TypeError(
            "multi-class target must hold integer class ids (torch.long); "
            "convert with target.long()."
        )
    ids = target.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= c):
        raise ValueError(
            f"class ids must lie in [0, {c - 1}] for {c} output channels, got "
            f"[{int(ids.min())}, {int(ids.max())}]."
        )
    y = F.one_hot(ids, c).permute(0, 3, 1, 2).float()
    return z, y, ids > 0


def probabilities(z: Tensor) -> Tensor:
    """Sigmoid for one channel, softmax over channels otherwise."""
    return torch.sigmoid(z) if z.shape[1] == 1 else torch.softmax(z, dim=1)


def _log1m_softmax(z: Tensor) -> Tensor:
    """``log(1 - softmax(z))`` without cancellation for the dominant channel."""
    m = z.amax(1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(1, keepdim=True)
    is_max = torch.zeros_like(z).scatter_(1, z.argmax(1, keepdim=True), 1.0)
    rest = (e * (1.0 - is_max)).sum(1, keepdim=True)  # exact sum of the other channels
    others = torch.where(is_max.bool(), rest, s - e)  # s - e >= 1 for non-max channels
    return torch.log(others.clamp_min(torch.finfo(z.dtype).tiny)) - torch.log(s)


def bce_elementwise(z: Tensor, y: Tensor) -> Tensor:
    """Element-wise ``-[y log p + (1 - y) log(1 - p)]`` computed from logits.

    Binary: ``binary_cross_entropy_with_logits``; multi-class: per-channel BCE of the softmax with
    log-softmax terms (stable for saturated logits).
    """
    if z.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")
    logp = F.log_softmax(z, dim=1).clamp_min(_LOG_MIN)
    log1mp = _log1m_softmax(z).clamp_min(_LOG_MIN)
    return -(y * logp + (1.0 - y) * log1mp)


# --------------------------------------------------------------------------------------------
# Morphological operators (stride-1 'SAME' max-pools as in the reference code)
# --------------------------------------------------------------------------------------------


def dilate(m: Tensor, k: int) -> Tensor:
    """Grey dilation with a ``k x k`` square (odd ``k``); the border is not padded with zeros."""
    return F.max_pool2d(m, k, stride=1, padding=k // 2)


def erode(m: Tensor, k: int) -> Tensor:
    """Grey erosion with a ``k x k`` square (odd ``k``)."""
    return -F.max_pool2d(-m, k, stride=1, padding=k // 2)


def boundary_band(m: Tensor, k: int = BAND_KERNEL) -> Tensor:
    """``clip(dilate_k(m) - erode_k(m), 0, 1)``: a band of width ~k around every boundary."""
    return (dilate(m, k) - erode(m, k)).clamp(0.0, 1.0)


def diff(m: Tensor, step: int, dim: int) -> Tensor:
    """Forward difference ``f(i + step) - f(i)`` over valid positions along ``dim``."""
    n = m.shape[dim]
    return m.narrow(dim, step, n - step) - m.narrow(dim, 0, n - step)


def diff2(m: Tensor, dim: int) -> Tensor:
    """Central second difference ``f(i+1) - 2 f(i) + f(i-1)`` over valid positions."""
    n = m.shape[dim]
    return m.narrow(dim, 2, n - 2) - 2.0 * m.narrow(dim, 1, n - 2) + m.narrow(dim, 0, n - 2)


def soft_perimeter(m: Tensor, *, eps_inside_sqrt: bool = False) -> Tensor:
    """Per-sample soft perimeter ``sum sqrt(dy^2 + dx^2 + e) + EPS`` over ``(C, H, W)``.

    Forward differences with a zero appended at the last row / column (§1.7.2).
    ``eps_inside_sqrt=True`` is the reference code (``e = EPS``, adds ``sqrt(EPS) * H * W`` to
    every perimeter); the default puts ``EPS`` outside and only ``1e-12`` inside.
    """
    dy = F.pad(m[..., 1:, :] - m[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(m[..., :, 1:] - m[..., :, :-1], (0, 1, 0, 0))
    inner = EPS if eps_inside_sqrt else SQRT_EPS_FIXED
    return torch.sqrt(dy * dy + dx * dx + inner).sum(dim=(1, 2, 3)) + EPS


def _mean_per_sample(t: Tensor) -> Tensor:
    if t.numel() == 0:
        return t.new_zeros(t.shape[0])
    return t.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# The five MASL components (per sample, shape (B,))
# --------------------------------------------------------------------------------------------


def loss_core(z: Tensor, p: Tensor, y: Tensor, bce: Tensor | None = None) -> Tensor:
    """``0.4 Dice + 0.3 IoU + 0.3 wBCE``; the BCE weighs the GT's 5x5 boundary band 6x."""
    dims = (1, 2, 3)
    inter = (y * p).sum(dims)
    sy, sp = y.sum(dims), p.sum(dims)
    dice = 1.0 - (2.0 * inter + EPS) / (sy + sp + EPS)
    iou = 1.0 - (inter + EPS) / (sy + sp - inter + EPS)
    bce = bce_elementwise(z, y) if bce is None else bce
    wbce = _mean_per_sample((1.0 + 5.0 * boundary_band(y)) * bce)
    return 0.4 * dice + 0.3 * iou + 0.3 * wbce


def loss_bnd(p: Tensor, y: Tensor) -> Tensor:
    """Multi-scale gradient alignment: ``sum_s w_s (mean|D^s_y y - D^s_y p| + mean|D^s_x ...|)``."""
    out = p.new_zeros(p.shape[0])
    for s, w in zip(BND_SCALES, BND_WEIGHTS, strict=True):
        for dim in (2, 3):
            if p.shape[dim] > s:
                out = out + w * _mean_per_sample((diff(y, s, dim) - diff(p, s, dim)).abs())
    return out


def loss_str(p: Tensor, y: Tensor, c: Tensor, *, eps_inside_sqrt: bool = False) -> Tensor:
    """Shape consistency ``c * |kappa(y) - kappa(p)|``, bounded by ``c / (4 pi)``.

    The spec's ``kappa = (A + EPS) / (P^2 + EPS)`` (``A = sum m``, ``P`` the soft perimeter) has
    no upper bound: a crop without a boundary (all foreground, or one object larger than the crop)
    has ``P ~ 0`` and gives ``kappa ~ 1e9``, which swamps every other term and can fool the
    divergence guard. The default uses the saturating form ``kappa' = A / (P^2 + 4 pi A)``, which
    equals ``kappa / (1 + 4 pi kappa)``: nearly ``kappa`` for the usual crops with many objects
    (``kappa << 1 / (4 pi)``), monotone in it, and never above ``1 / (4 pi)`` (the value of a
    disc's isoperimetric ratio, reached only without a boundary).
    ``eps_inside_sqrt=True`` (reference-code parity) keeps the spec's formula; its perimeter has
    the floor ``sqrt(EPS) * H * W``, so it is bounded by ``1e6 / (H W)`` there.

    Args:
        c: Compactness of the ground truth, ``(B,)`` (per sample or the batch value repeated).
    """
    dims = (1, 2, 3)

    def kappa(m: Tensor) -> Tensor:
        area = m.sum(dims)
        per2 = soft_perimeter(m, eps_inside_sqrt=eps_inside_sqrt) ** 2
        if eps_inside_sqrt:
            return (area + EPS) / (per2 + EPS)
        return area / (per2 + 4.0 * math.pi * area + EPS)  # 0 for an empty map

    return c * (kappa(y) - kappa(p)).abs()


def focal_gamma(scale: Tensor) -> Tensor:
    """Focusing parameter of L_sca from the foreground fraction: 3 (< 5 %), 2 (< 20 %), else 1.5."""
    return torch.where(
        scale < 0.05,
        torch.full_like(scale, 3.0),
        torch.where(scale < 0.20, torch.full_like(scale, 2.0), torch.full_like(scale, 1.5)),
    )


def loss_sca(z: Tensor, p: Tensor, y: Tensor, scale: Tensor, bce: Tensor | None = None) -> Tensor:
    """Scale-aware focal loss ``mean[(1 - p_t)^gamma BCE]``, gamma from :func:`focal_gamma`."""
    gamma = focal_gamma(scale).view(-1, 1, 1, 1)
    pt = y * p + (1.0 - y) * (1.0 - p)
    bce = bce_elementwise(z, y) if bce is None else bce
    return _mean_per_sample((1.0 - pt).clamp_min(0.0).pow(gamma) * bce)


def loss_tex(p: Tensor, y: Tensor) -> Tensor:
    """Second-order texture term ``mean|D2_y y - D2_y p| + mean|D2_x y - D2_x p|``."""
    out = p.new_zeros(p.shape[0])
    for dim in (2, 3):
        if p.shape[dim] > 2:
            out = out + _mean_per_sample((diff2(y, dim) - diff2(p, dim)).abs())
    return out


# --------------------------------------------------------------------------------------------
# Reference-code descriptors (§1.7.2), for parity experiments only
# --------------------------------------------------------------------------------------------


def reference_descriptors(y: Tensor) -> dict[str, Tensor]:
    """The released code's descriptors per sample, **unclipped**, on ``y`` (all channels).

    Exactly §1.7.2: soft perimeter with ε inside the square root, "tubularity" = 3x3 erosion
    area / area (inverted: a disk scores higher than a thin line), irregularity from second
    differences of the 5x5 boundary band. The code clips after averaging over the batch; clip
    per sample for per-sample modulation.

    Returns:
        ``{"compactness", "tubularity", "irregularity", "scale"}`` -> ``(B,)`` tensors.
    """
    with torch.no_grad():
        y = y.float()
        dims = (1, 2, 3)
        h, w = y.shape[-2:]
        area = y.sum(dims) + EPS
        per = soft_perimeter(y, eps_inside_sqrt=True)
        comp = 4.0 * math.pi * area / (per**2 + EPS)
        tub = erode(y, 3).sum(dims) / area
        band = boundary_band(y, BAND_KERNEL)
        irr = y.new_zeros(y.shape[0])
        for dim in (2, 3):
            if y.shape[dim] > 2:
                irr = irr + _mean_per_sample(diff2(band, dim).abs())
        return {
            "compactness": comp,
            "tubularity": tub,
            "irregularity": irr,
            "scale": area / (h * w),
        }
