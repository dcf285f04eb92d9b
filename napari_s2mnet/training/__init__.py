"""Fine-tuning and training: a generator that yields progress and returns the best model.

- :mod:`~napari_s2mnet.training.config`: :class:`FinetuneConfig`, :class:`TrainReport`,
  :class:`FinetuneResult`, :class:`ResumeState`, :class:`FinetuneControl` (torch-free).
- :mod:`~napari_s2mnet.training.data`: (image, labels) pairs -> normalised items, the
  validation split, the data fingerprint.
- :mod:`~napari_s2mnet.training.sampler`: random crops and augmentation.
- :mod:`~napari_s2mnet.training.metrics`: Dice, validation, :func:`evaluate_dice`.
- :mod:`~napari_s2mnet.training.step`: one run's mechanics (``_Run``: step, validation,
  snapshot / restore).
- :mod:`~napari_s2mnet.training.loop`: :func:`finetune` and :func:`train`.

Torch is imported inside functions so that widgets can import the config dataclasses cheaply.
"""

from napari_s2mnet.training.config import (
    DEFAULT_EPOCHS,
    FinetuneConfig,
    FinetuneControl,
    FinetuneResult,
    LoopState,
    ResumeState,
    TrainReport,
)
from napari_s2mnet.training.data import _Data as _Data
from napari_s2mnet.training.data import _fg_index as _fg_index
from napari_s2mnet.training.data import _Item as _Item
from napari_s2mnet.training.data import _prepare_data as _prepare_data
from napari_s2mnet.training.loop import _lr_factor as _lr_factor
from napari_s2mnet.training.loop import finetune, train
from napari_s2mnet.training.metrics import evaluate_dice
from napari_s2mnet.training.sampler import _Sampler as _Sampler
from napari_s2mnet.training.step import _Run as _Run

__all__ = [
    "DEFAULT_EPOCHS",
    "FinetuneConfig",
    "FinetuneControl",
    "FinetuneResult",
    "LoopState",
    "ResumeState",
    "TrainReport",
    "evaluate_dice",
    "finetune",
    "train",
]

# The ``_`` names above are internals the tests reach; patch them in their own modules
# (``step._make_loss``, ``loop._lr_factor``), where the run looks them up.
