"""Model registry: architecture name -> builder + options dataclass.

Every architecture (S2M-Net, the U-Net baseline, DSSAU-Net) registers itself here, so the
inference engine, training, checkpoints, the CLI and the widgets treat them alike.

Contract of a built model (a :class:`~napari_s2mnet.model.base.SegmentationNet`, which
implements the checks, padding and cropping once):

* ``forward(x)`` takes ``(B, in_channels, H, W)`` float32 and returns logits
  ``(B, num_classes, H, W)`` for any ``H, W >= 1`` (it pads to its stride and crops back);
* attribute ``stride: int``: the size multiple the network works on internally (tiling aligns to it);
* ``num_classes == 1`` means binary (sigmoid); ``>= 2`` means multi-class softmax incl. background;
* a binary model built with ``ModelConfig(instance_head=True)`` returns ``out_channels =
  1 + len(INSTANCE_CHANNELS)`` logits: foreground, then the instance head's boundary and distance
  (:mod:`napari_s2mnet.instances`), all sigmoid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network (stored in every checkpoint).

    Attributes:
        arch: Registry name (``"s2mnet"``, ``"unet"``, ``"dssau"``, ...).
        in_channels: Number of input channels the network expects.
        num_classes: 1 for binary (sigmoid output), >= 2 for multi-class softmax incl. background.
        options: Architecture-specific options; validated against the architecture's options
            dataclass (unknown keys are an error).
        instance_head: Binary models only: the network also predicts the instance maps of
            :data:`napari_s2mnet.instances.INSTANCE_CHANNELS` (inner boundary and normalised
            distance, one sigmoid logit each) after the foreground logit, so inference can
            separate touching objects by seeded watershed. Files without the key have none.
    """

    arch: str = "s2mnet"
    in_channels: int = 3
    num_classes: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    instance_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        out = {
            "arch": self.arch,
            "in_channels": int(self.in_channels),
            "num_classes": int(self.num_classes),
            "options": _jsonable(self.options),
        }
        if self.instance_head:  # absent otherwise: files of models without it stay as before
            out["instance_head"] = True
        return out

    @property
    def instance_channels(self) -> int:
        """Extra output channels of the instance head (0 without one)."""
        from napari_s2mnet.instances import INSTANCE_CHANNELS

        return len(INSTANCE_CHANNELS) if self.instance_head else 0

    @property
    def out_channels(self) -> int:
        """Channels the network returns: ``num_classes + instance_channels``."""
        return int(self.num_classes) + self.instance_channels

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown keys."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown model config keys {sorted(unknown)}.")
        return cls(**data)

    @property
    def binary(self) -> bool:
        """True for single-output sigmoid models."""
        return self.num_classes == 1


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture."""

    name: str
    builder: Callable[[ModelConfig, Any], nn.Module]
    options_cls: type
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, options_cls: type, description: str) -> Callable:
    """Decorator registering ``builder(config, options) -> nn.Module`` under ``name``."""

    def deco(builder: Callable[[ModelConfig, Any], nn.Module]) -> Callable:
        _REGISTRY[name] = ModelSpec(name, builder, options_cls, description)
        return builder

    return deco


def _ensure_builtin() -> None:
    # Importing the architecture modules registers them (torch is imported here, not earlier).
    import importlib

    for module in ("s2mnet", "unet", "dssau"):
        importlib.import_module(f"napari_s2mnet.model.{module}")


def available_models() -> dict[str, str]:
    """Registered architecture names -> one-line descriptions."""
    _ensure_builtin()
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}


def get_spec(name: str) -> ModelSpec:
    """Look up an architecture; a clear error lists the known names."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown architecture {name!r}. Known architectures: {', '.join(sorted(_REGISTRY))}."
        ) from None


def resolve_options(config: ModelConfig) -> Any:
    """The architecture's options dataclass filled from ``config.options`` (defaults elsewhere)."""
    spec = get_spec(config.arch)
    names = {f.name for f in dataclasses.fields(spec.options_cls)}
    unknown = set(config.options) - names
    if unknown:
        raise ValueError(
            f"Unknown option(s) {sorted(unknown)} for architecture {config.arch!r}; "
            f"valid options: {sorted(names)}."
        )
    opts = dict(config.options)
    for f in dataclasses.fields(spec.options_cls):
        # JSON turns tuples into lists: restore tuples where the default is a tuple.
        if f.name in opts and isinstance(opts[f.name], list):
            opts[f.name] = tuple(opts[f.name])
    return spec.options_cls(**opts)


def build_model(config: ModelConfig) -> nn.Module:
    """Build the network described by ``config`` (random initialisation)."""
    if config.in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {config.in_channels}.")
    if config.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {config.num_classes}.")
    if config.instance_head and config.num_classes != 1:
        raise ValueError(
            f"instance_head needs a binary model (num_classes=1), got num_classes="
            f"{config.num_classes}; multi-class models give semantic labels."
        )
    spec = get_spec(config.arch)
    return spec.builder(config, resolve_options(config))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
