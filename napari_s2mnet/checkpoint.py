"""Model files: one ``.safetensors`` file per model with its JSON config in the header.

(Skeleton: :class:`ModelBundle` and :func:`new_model` are final; ``save_model`` / ``load_model``
are implemented by the training work package.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from napari_s2mnet.model.registry import ModelConfig
from napari_s2mnet.preprocess import NormalizationConfig

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class ModelBundle:
    """A network together with everything needed to use it correctly.

    Attributes:
        model: The ``torch.nn.Module`` (see the contract in :mod:`napari_s2mnet.model.registry`).
        config: Architecture config (rebuilds ``model``).
        normalization: How input images are normalised (same in training and inference).
        metadata: Free-form JSON-serialisable provenance: ``name``, ``created``, ``parent``
            (hash of the model it was fine-tuned from), ``trained_on`` (number of images),
            ``history`` (list of training runs), ``threshold``, ``metrics``, ``data`` ...
    """

    model: nn.Module
    config: ModelConfig
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Human-readable model name."""
        return str(self.metadata.get("name", self.config.arch))

    @property
    def threshold(self) -> float:
        """Probability threshold for binary models (stored in the metadata, default 0.5)."""
        return float(self.metadata.get("threshold", 0.5))


def new_model(
    config: ModelConfig | None = None,
    normalization: NormalizationConfig | None = None,
    name: str | None = None,
) -> ModelBundle:
    """A randomly initialised model bundle for ``config`` (default: binary 3-channel S2M-Net)."""
    from napari_s2mnet.model import build_model

    config = config or ModelConfig()
    return ModelBundle(
        model=build_model(config),
        config=config,
        normalization=normalization or NormalizationConfig(),
        metadata={"name": name or f"{config.arch} (untrained)"},
    )
