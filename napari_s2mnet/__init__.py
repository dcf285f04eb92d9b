"""napari-s2mnet: S2M-Net interactive segmentation for napari.

Importing this package is cheap on purpose: it imports neither torch nor Qt, so napari starts
fast. The heavy parts live in submodules that are imported when used:

- :mod:`napari_s2mnet.model`: S2M-Net, the U-Net baseline, DSSAU-Net (``build_model``).
- :mod:`napari_s2mnet.losses`: MASL, SCC, Dice+BCE.
- :mod:`napari_s2mnet.morphology`: the morphology descriptors (compactness, tubularity, ...).
- :mod:`napari_s2mnet.inference`: ``segment(image, model) -> (labels, features)``.
- :mod:`napari_s2mnet.training`: ``finetune(pairs, model, config)``.
- :mod:`napari_s2mnet.checkpoint`: safetensors model files with their config.
- :mod:`napari_s2mnet.io`: label and feature export.

The public API is importable from the package itself and loaded on first use: ``segment``,
``segment_iter``, ``InferenceConfig`` (inference), ``finetune``, ``train``, ``FinetuneConfig``
(training), ``load_model``, ``save_model``, ``load_default_model`` (checkpoint).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first use (PEP 562), so ``import
# napari_s2mnet`` stays free of torch and Qt while ``napari_s2mnet.segment(...)`` just works.
_LAZY = {
    "segment": "napari_s2mnet.inference",
    "segment_iter": "napari_s2mnet.inference",
    "InferenceConfig": "napari_s2mnet.inference",
    "finetune": "napari_s2mnet.training",
    "train": "napari_s2mnet.training",
    "FinetuneConfig": "napari_s2mnet.training",
    "load_model": "napari_s2mnet.checkpoint",
    "save_model": "napari_s2mnet.checkpoint",
    "load_default_model": "napari_s2mnet.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access; cache it on the package."""
    module = _LAZY.get(name)
    if module is None:
        # AttributeError (not ImportError) so ``from napari_s2mnet import <submodule>`` still
        # falls back to importing the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
