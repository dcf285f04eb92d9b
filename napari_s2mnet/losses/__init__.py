"""Segmentation losses: MASL (S2M-Net), the SCC spectral add-on, and a Dice + BCE baseline.

Every loss is an ``nn.Module`` called as ``loss(logits, target) -> scalar`` on logits
``(B, C, H, W)`` (``C == 1``: binary, sigmoid; ``C >= 2``: multi-class, softmax) and exposes
``last_components: dict[str, float]`` for logging. Losses with learnable weights (MASL) have
``clamp_weights_()``; call it after every optimiser step.

>>> loss = build_loss("masl+scc", num_classes=1, lam=0.25)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "COMPONENTS",
    "LOSS_NAMES",
    "MASL",
    "DiceBCELoss",
    "SCCLoss",
    "build_loss",
    "spectral_correlation",
]

#: Names accepted by :func:`build_loss` (torch-free: the widget and the CLI offer them).
LOSS_NAMES: tuple[str, ...] = ("masl", "dicebce", "masl+scc", "dicebce+scc")

# The losses import torch; they load on first use (PEP 562) so LOSS_NAMES stays cheap to import.
_LAZY = {
    "COMPONENTS": "napari_s2mnet.losses.masl",
    "MASL": "napari_s2mnet.losses.masl",
    "DiceBCELoss": "napari_s2mnet.losses.basic",
    "SCCLoss": "napari_s2mnet.losses.scc",
    "spectral_correlation": "napari_s2mnet.losses.scc",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # AttributeError lets ``from ... import <submodule>`` import it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _kwarg_names(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n in params if n not in ("self", "num_classes", "spatial_loss")}


def build_loss(name: str, num_classes: int = 1, **kw: Any) -> nn.Module:
    """Build a loss by name.

    Args:
        name: ``"masl"``, ``"dicebce"``, ``"masl+scc"`` or ``"dicebce+scc"`` (case and spaces
            ignored).
        num_classes: 1 for binary models, the number of classes (incl. background) otherwise.
        **kw: Options of the spatial loss (:class:`MASL` / :class:`DiceBCELoss`) and, for the
            ``+scc`` names, of :class:`SCCLoss` (``lam``, ``variant``, ``log_magnitude``,
            ``include_background``); each keyword goes to the loss that has it.

    Raises:
        ValueError: Unknown name or keyword.
    """
    key = str(name).lower().replace(" ", "")
    if key not in LOSS_NAMES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
    from napari_s2mnet.losses.basic import DiceBCELoss
    from napari_s2mnet.losses.masl import MASL
    from napari_s2mnet.losses.scc import SCCLoss

    base, _, extra = key.partition("+")
    spatial_cls = {"masl": MASL, "dicebce": DiceBCELoss}[base]
    spatial_keys = _kwarg_names(spatial_cls)
    scc_keys = _kwarg_names(SCCLoss) if extra == "scc" else set()
    unknown = set(kw) - spatial_keys - scc_keys
    if unknown:
        raise ValueError(
            f"Unknown option(s) {sorted(unknown)} for loss {key!r}; "
            f"valid options: {sorted(spatial_keys | scc_keys)}."
        )
    spatial = spatial_cls(num_classes, **{k: v for k, v in kw.items() if k in spatial_keys})
    if extra == "scc":
        return SCCLoss(spatial, **{k: v for k, v in kw.items() if k in scc_keys})
    return spatial
