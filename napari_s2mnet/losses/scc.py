"""Spectral Correlation Coefficient (SCC) objective (methods.md §2.2, reconstructed).

``L = L_spatial + lam * (1 - SCC)`` where SCC is the mean, over samples and (foreground)
classes, of a correlation between the orthonormal 2-D DFTs of the predicted probabilities and
the one-hot ground truth:

* ``"magnitude"`` (default): Pearson correlation of the magnitude spectra ``|F_P|``, ``|F_G|``
  over the frequency bins (``log(1 + |F|)`` with ``log_magnitude=True``). Translation
  invariant: it compares global shape / scale content, never location, so it is always paired
  with a spatial loss.
* ``"complex"``: ``Re <F_P, F_G> / (||F_P|| ||F_G||)``. By Parseval this *equals* the spatial
  cosine similarity ``<P, G> / (||P|| ||G||)``: nothing spectral about it (kept for ablations).
* ``"real_imag"``: Pearson over the concatenated ``[Re F; Im F]`` (close to ``"complex"``).

Pairs where either spectrum has (numerically) zero variance, e.g. an empty ground truth, are
skipped; when no pair is left the spectral term is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from napari_s2mnet.losses import components as C

VARIANTS: tuple[str, ...] = ("magnitude", "complex", "real_imag")
# Sums of squares below this are "zero variance" (an empty mask, a constant prediction).
_TINY = 1e-10


def spectral_correlation(
    pred: Tensor, target: Tensor, *, variant: str = "magnitude", log_magnitude: bool = False
) -> tuple[Tensor, Tensor]:
    """Correlation of the spectra of ``pred`` and ``target`` per leading index.

    Args:
        pred: ``(..., H, W)`` float maps (probabilities).
        target: Same shape (one-hot ground truth).
        variant: ``"magnitude"``, ``"complex"`` or ``"real_imag"``.
        log_magnitude: Use ``log(1 + |F|)`` (magnitude variant only).

    Returns:
        ``(scc, valid)``, both of shape ``pred.shape[:-2]``; ``scc`` is 0 where ``valid`` is False.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    fp = torch.fft.fft2(pred.float(), norm="ortho").flatten(-2)
    fg = torch.fft.fft2(target.float(), norm="ortho").flatten(-2)
    if variant == "complex":
        num = (fp * fg.conj()).real.sum(-1)
        sp = (fp.real**2 + fp.imag**2).sum(-1)
        sg = (fg.real**2 + fg.imag**2).sum(-1)
    else:
        if variant == "magnitude":
            a, b = fp.abs(), fg.abs()
            if log_magnitude:
                a, b = torch.log1p(a), torch.log1p(b)
        else:
            a = torch.cat([fp.real, fp.imag], dim=-1)
            b = torch.cat([fg.real, fg.imag], dim=-1)
        a = a - a.mean(-1, keepdim=True)
        b = b - b.mean(-1, keepdim=True)
        num = (a * b).sum(-1)
        sp, sg = (a * a).sum(-1), (b * b).sum(-1)
    valid = (sp > _TINY) & (sg > _TINY)
    denom = torch.sqrt(sp.clamp_min(_TINY) * sg.clamp_min(_TINY))
    scc = torch.where(valid, num / denom, torch.zeros_like(num))
    return scc, valid


class SCCLoss(nn.Module):
    """``spatial_loss(logits, target) + lam * (1 - SCC)``.

    Args:
        spatial_loss: Any loss of this package (``MASL``, ``DiceBCELoss``) called with the same
            ``(logits, target)``.
        lam: Weight of the spectral term (0.5 by default; sweep 0.1-1.0).
        variant: ``"magnitude"`` (default), ``"complex"`` or ``"real_imag"``.
        log_magnitude: ``log(1 + |F|)`` for the magnitude variant.
        include_background: Also correlate the background channel (``1 - p`` for binary).
    """

    def __init__(
        self,
        spatial_loss: nn.Module,
        lam: float = 0.5,
        variant: str = "magnitude",
        log_magnitude: bool = False,
        include_background: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        if not (lam >= 0):
            raise ValueError(f"lam must be >= 0, got {lam}.")
        self.spatial_loss = spatial_loss
        self.lam = float(lam)
        self.variant = variant
        self.log_magnitude = bool(log_magnitude)
        self.include_background = bool(include_background)
        self.last_components: dict[str, float] = {}

    def clamp_weights_(self) -> None:
        """Forward to the spatial loss (MASL's weight projection), if it has one."""
        fn = getattr(self.spatial_loss, "clamp_weights_", None)
        if fn is not None:
            fn()

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, variant={self.variant!r}, log_magnitude={self.log_magnitude}, "
            f"include_background={self.include_background}"
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Spatial loss plus the weighted spectral term."""
        spatial = self.spatial_loss(logits, target)
        with C.fp32_context(logits.device):
            z, y, _ = C.prepare_inputs(logits, target)
            p = C.probabilities(z)
            if z.shape[1] == 1:
                if self.include_background:
                    p = torch.cat([1.0 - p, p], dim=1)
                    y = torch.cat([1.0 - y, y], dim=1)
            elif not self.include_background:
                p, y = p[:, 1:], y[:, 1:]
            scc, valid = spectral_correlation(
                p, y, variant=self.variant, log_magnitude=self.log_magnitude
            )
            n_valid = valid.sum()
            if int(n_valid) > 0:
                mean_scc = scc[valid].mean()
                spectral = 1.0 - mean_scc
            else:  # nothing to compare (e.g. all-background batch)
                mean_scc = scc.sum() * 0.0
                spectral = mean_scc
            total = spatial.float() + self.lam * spectral
        comps = {
            k: v
            for k, v in getattr(self.spatial_loss, "last_components", {}).items()
            if k != "total"
        }
        vals = torch.stack(
            [spatial.detach().float(), mean_scc.detach(), spectral.detach(), total.detach()]
        )
        s, c, sp, t = vals.cpu().tolist()
        comps.update({"spatial": s, "scc": c, "spectral": sp, "total": t})
        self.last_components = comps
        return total
