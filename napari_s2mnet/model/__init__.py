"""Segmentation networks: S2M-Net, a U-Net baseline of equal size, DSSAU-Net.

Use :func:`build_model` with a :class:`ModelConfig`; ``python -m napari_s2mnet.model --summary``
prints parameter counts.
"""

from napari_s2mnet.model.registry import (
    ModelConfig,
    available_models,
    build_model,
    count_parameters,
    register_model,
)

__all__ = ["ModelConfig", "available_models", "build_model", "count_parameters", "register_model"]
