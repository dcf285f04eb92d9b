"""MASL: the Morphology-Aware Adaptive Segmentation Loss of S2M-Net (methods.md §1.7).

``L = sum_i w_i a_i L_i / (sum_i w_i a_i + eps)`` over the components ``core, bnd, str, sca, tex``.

* ``w_i``: learnable scalars (``nn.Parameter`` owned by the criterion, initialised to 1, 1, 1,
  0.5, 0.5). Add ``criterion.parameters()`` to the optimiser (no weight decay) and call
  :meth:`MASL.clamp_weights_` after every optimiser step (projection to ``[0.1, 10]``). Unlike the
  released Keras code, where the loss layer's variables never reach the optimiser, these do
  train. ``learned_weights=False`` keeps them fixed (buffers).
* ``a_i``: modulation from ground-truth descriptors (no gradient), computed by
  :func:`napari_s2mnet.morphology.batch_descriptors` on the (union) foreground:
  ``a_core = 1 + 0.5 c``, ``a_bnd = 1 + 1.5 t + c``, ``a_str = 1 + t``, ``a_sca = 1 + 1.5 i``,
  ``a_tex = 1 + i`` (c compactness, t tubularity, i irregularity). Per-batch mean by default
  (as the code), ``per_sample=True`` for per-sample ``a_{i,b}`` applied to per-sample losses.
* ``reference_formulas=True`` swaps in the released code's formulas for parity experiments: the
  descriptors of §1.7.2 computed in torch (erosion "tubularity", which is inverted; ε inside the
  perimeter's square root; second-difference irregularity), on all target channels as the code
  does, and ε inside the square root of L_str's soft perimeter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from napari_s2mnet.losses import components as C

#: Component names in canonical order.
COMPONENTS: tuple[str, ...] = ("core", "bnd", "str", "sca", "tex")
#: Initial weights (methods.md §1.7.1).
INITIAL_WEIGHTS: dict[str, float] = {"core": 1.0, "bnd": 1.0, "str": 1.0, "sca": 0.5, "tex": 0.5}
#: Projection interval of the learnable weights.
WEIGHT_MIN, WEIGHT_MAX = 0.1, 10.0
#: Modulation a_i = 1 + sum_d coef[d] * descriptor_d (paper defaults, §1.7.3).
MODULATION: dict[str, dict[str, float]] = {
    "core": {"compactness": 0.5},
    "bnd": {"tubularity": 1.5, "compactness": 1.0},
    "str": {"tubularity": 1.0},
    "sca": {"irregularity": 1.5},
    "tex": {"irregularity": 1.0},
}


class MASL(nn.Module):
    """Morphology-Aware Adaptive Segmentation Loss.

    Args:
        num_classes: 1 for binary (sigmoid) logits, >= 2 for multi-class softmax logits
            (channel-summed formulas against one-hot targets; descriptors on the union of the
            non-background classes).
        components: Subset of ``("core", "bnd", "str", "sca", "tex")``, e.g. ``("core", "bnd")``
            for the EndoVis multi-class configuration.
        learned_weights: ``True``: ``w_i`` are ``nn.Parameter``; ``False``: fixed buffers.
        modulation: ``False`` sets every ``a_i = 1`` (ablation "no morphology modulation").
        per_sample: Per-sample ``a_{i,b}`` (and per-sample compactness / foreground fraction in
            L_str / L_sca) instead of one batch value.
        reference_formulas: Reproduce the released code's descriptor and perimeter formulas.
        initial_weights: Override some of :data:`INITIAL_WEIGHTS`.

    Call as ``loss(logits, target)``; after each call :attr:`last_components` holds the
    components, ``w_<name>``, ``alpha_<name>`` and ``total`` as floats.
    """

    def __init__(
        self,
        num_classes: int = 1,
        *,
        components: Sequence[str] = COMPONENTS,
        learned_weights: bool = True,
        modulation: bool = True,
        per_sample: bool = False,
        reference_formulas: bool = False,
        initial_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if isinstance(components, str):
            components = (components,)
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components:
            raise ValueError(
                f"components must be a non-empty subset of {COMPONENTS}, got {tuple(components)}."
            )
        # canonical order, no duplicates
        self.components: tuple[str, ...] = tuple(c for c in COMPONENTS if c in set(components))
        init = dict(INITIAL_WEIGHTS)
        if initial_weights:
            bad = set(initial_weights) - set(COMPONENTS)
            if bad:
                raise ValueError(f"initial_weights has unknown components {sorted(bad)}.")
            init.update({k: float(v) for k, v in initial_weights.items()})
        self.num_classes = int(num_classes)
        self.learned_weights = bool(learned_weights)
        self.modulation = bool(modulation)
        self.per_sample = bool(per_sample)
        self.reference_formulas = bool(reference_formulas)
        w = torch.tensor([init[c] for c in self.components], dtype=torch.float32)
        if self.learned_weights:
            self.weights = nn.Parameter(w)
        else:
            self.register_buffer("weights", w)
        self.last_components: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------
    def clamp_weights_(self) -> None:
        """Project the weights to ``[0.1, 10]``; call after every optimiser step."""
        with torch.no_grad():
            self.weights.clamp_(WEIGHT_MIN, WEIGHT_MAX)

    @property
    def weight_dict(self) -> dict[str, float]:
        """Current weights by component name."""
        return dict(zip(self.components, self.weights.detach().cpu().tolist(), strict=True))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, components={self.components}, "
            f"learned_weights={self.learned_weights}, modulation={self.modulation}, "
            f"per_sample={self.per_sample}, reference_formulas={self.reference_formulas}"
        )

    # ---------------------------------------------------------------------------------------
    def _needs_descriptors(self) -> set[str]:
        need: set[str] = set()
        if self.modulation:
            for c in self.components:
                need.update(MODULATION[c])
        if "str" in self.components:
            need.add("compactness")
        if "sca" in self.components:
            need.add("scale")
        return need

    def descriptors(self, y: Tensor, fg: Tensor) -> dict[str, Tensor]:
        """Ground-truth descriptors ``(B,)`` as used for modulation (after batch averaging).

        Args:
            y: float target ``(B, C, H, W)`` (one-hot for multi-class).
            fg: bool foreground ``(B, H, W)`` (union of the non-background classes).
        """
        b = y.shape[0]
        if self.reference_formulas:
            raw = C.reference_descriptors(y)
            if self.per_sample:
                return {k: v.clamp(0.0, 1.0) for k, v in raw.items()}
            return {k: v.mean().clamp(0.0, 1.0).expand(b) for k, v in raw.items()}
        from napari_s2mnet.morphology import batch_descriptors

        # Scikit-image on the CPU; no gradient (ground truth only).
        arrays = batch_descriptors(fg.detach().cpu().numpy())
        out = {}
        for k, v in arrays.items():
            vals = v if self.per_sample else np.full(b, v.mean())
            out[k] = torch.as_tensor(vals, dtype=torch.float32, device=y.device)
        return out

    def alphas(self, desc: dict[str, Tensor], batch: int, device: torch.device) -> Tensor:
        """Modulation ``a_{i,b}`` as a ``(num_components, B)`` tensor."""
        rows = []
        for c in self.components:
            a = torch.ones(batch, device=device)
            if self.modulation:
                for name, coef in MODULATION[c].items():
                    a = a + coef * desc[name]
            rows.append(a)
        return torch.stack(rows)

    # ---------------------------------------------------------------------------------------
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """MASL of ``logits`` ``(B, C, H, W)`` against ``target`` (see :func:`components.prepare_inputs`)."""
        if logits.ndim == 4 and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"MASL was built for num_classes={self.num_classes} but logits have "
                f"{logits.shape[1]} channels."
            )
        with C.fp32_context(logits.device):
            z, y, fg = C.prepare_inputs(logits, target)
            b = z.shape[0]
            p = C.probabilities(z)
            need = self._needs_descriptors()
            desc = self.descriptors(y, fg) if need else {}
            bce = C.bce_elementwise(z, y) if {"core", "sca"} & set(self.components) else None
            eps_in = self.reference_formulas
            parts: list[Tensor] = []
            for c in self.components:
                if c == "core":
                    parts.append(C.loss_core(z, p, y, bce))
                elif c == "bnd":
                    parts.append(C.loss_bnd(p, y))
                elif c == "str":
                    parts.append(C.loss_str(p, y, desc["compactness"], eps_inside_sqrt=eps_in))
                elif c == "sca":
                    parts.append(C.loss_sca(z, p, y, desc["scale"], bce))
                else:
                    parts.append(C.loss_tex(p, y))
            losses = torch.stack(parts)  # (K, B)
            alpha = self.alphas(desc, b, z.device)  # (K, B), no gradient
            w = self.weights.float().view(-1, 1)
            wa = w * alpha
            # Per-sample weighted average; with batch-constant alphas this equals
            # sum_i w_i a_i mean_b(L_ib) / (sum_i w_i a_i + eps).
            total = ((wa * losses).sum(0) / (wa.sum(0) + C.EPS)).mean()
        self._log(losses, alpha, total)
        return total

    def _log(self, losses: Tensor, alpha: Tensor, total: Tensor) -> None:
        # One device->host transfer for everything that is logged.
        vals = (
            torch.cat(
                [
                    losses.detach().mean(1),
                    self.weights.detach().float(),
                    alpha.mean(1),
                    total.detach().view(1),
                ]
            )
            .cpu()
            .tolist()
        )
        k = len(self.components)
        out: dict[str, float] = {}
        for i, c in enumerate(self.components):
            out[c] = vals[i]
            out[f"w_{c}"] = vals[k + i]
            out[f"alpha_{c}"] = vals[2 * k + i]
        out["total"] = vals[3 * k]
        self.last_components = out
