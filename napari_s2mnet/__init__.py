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
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "segment"]


def segment(image, model=None, config=None, **kwargs):  # type: ignore[no-untyped-def]
    """Segment ``image`` with ``model`` (default: the bundled model); see :func:`napari_s2mnet.inference.segment`."""
    from napari_s2mnet.inference import segment as _segment

    return _segment(image, model, config, **kwargs)
