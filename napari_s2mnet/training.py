"""Fine-tuning and training: a generator that yields progress and returns the best model.

``finetune(pairs, model, config)`` trains a *copy* of ``model`` on in-memory (image, labels)
pairs and yields a :class:`TrainReport` after every optimisation step (often enough for a live
plot). Its return value (``StopIteration.value``; napari's ``thread_worker`` emits it as
``returned``) is a :class:`FinetuneResult` holding the best state seen.

Stopping: :meth:`FinetuneControl.stop` (from any thread) ends the run at the next step and the
generator still *returns* the best state so far (``stopped_reason="cancelled"``);
``generator.close()`` abandons the run and returns nothing. The input bundle is never modified.

The data pipeline normalises each image exactly as :mod:`napari_s2mnet.inference` does (the
bundle's :class:`~napari_s2mnet.preprocess.NormalizationConfig` over the whole image, per channel),
then samples random crops, weighted toward labelled pixels, with flips / 90-degree rotations,
scale jitter and intensity jitter (gain, offset, gamma). Instance labels become a binary
foreground for binary models; multi-class models take semantic labels (class ids).

Optimisation follows the paper's recipe (methods.md §1.8): Adam, linear learning-rate warm-up then
cosine decay, gradient clipping at global norm 1.0, L2 weight decay on conv/linear weights, the
loss's learnable weights (MASL) in the optimiser without decay and clamped after every step. A
guard restores the last good state and halves the learning rate after a non-finite or exploding
loss, and stops with ``"diverged"`` after repeated failures.

The same code runs data-parallel under ``torchrun`` (see :mod:`napari_s2mnet._ddp`).

Torch is imported inside functions so that widgets can import the config dataclasses cheaply.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.checkpoint import ModelBundle

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from napari_s2mnet._ddp import DistContext

__all__ = [
    "DEFAULT_EPOCHS",
    "FinetuneConfig",
    "FinetuneControl",
    "FinetuneResult",
    "ResumeState",
    "TrainReport",
    "evaluate_dice",
    "finetune",
    "train",
    "train_paths",
]

DEFAULT_EPOCHS = 30
STOP_REASONS = ("completed", "time budget", "early stopping", "cancelled", "diverged")
_VAL_MAX_PIXELS = 4_000_000  # validation runs on at most this many pixels (a subset of tiles)
_SNAPSHOT_EVERY = 10  # steps between "last good state" snapshots
_MIN_VAL_OBJECTS = 3
_MIN_BAND = 32  # smallest held-out band / remaining training strip, in pixels


# --------------------------------------------------------------------------------------------
# public dataclasses


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning / training run (the single source of the widget's defaults).

    Attributes:
        epochs: Number of (virtual) epochs of ``steps_per_epoch`` steps. When neither ``epochs``
            nor ``seconds`` is given, ``DEFAULT_EPOCHS`` (30) epochs are run; when both are
            given, the run stops at whichever limit comes first.
        seconds: Wall-clock budget in seconds (the learning-rate schedule follows elapsed time).
        steps_per_epoch: Optimisation steps per virtual epoch (``steps_per_epoch * batch_size``
            random crops); validation and early stopping work per epoch.
        batch_size: Crops per step (per process in data-parallel runs).
        crop_size: Side of the square training crops in pixels.
        lr: Peak learning rate (Adam; paper 1e-4).
        min_lr: Learning rate at the end of the cosine decay.
        warmup_fraction: Fraction of the budget used for the linear warm-up.
        grad_clip: Global gradient-norm clip (``0`` disables).
        weight_decay: L2 weight decay on conv/linear weights (not on biases, norms or loss weights).
        loss: ``"masl"``, ``"dicebce"``, ``"masl+scc"`` or ``"dicebce+scc"``.
        loss_options: Extra keyword arguments for :func:`napari_s2mnet.losses.build_loss`.
        val_fraction: Share of the data held out for validation (whole images when there are at
            least 5 images/slices, else a band at the bottom/right of each image). ``0`` disables
            validation. Without enough objects no validation is done and the report says so.
        val_every: Steps between validations (default: once per epoch).
        patience: Stop after this many validations without a Dice improvement of at least
            ``min_delta`` (``None`` disables early stopping).
        min_delta: Smallest Dice gain that counts as an improvement for early stopping.
        seed: Random seed; the same seed gives the same losses on the CPU.
        device: ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        allow_empty: Use images without any labelled object as background-only examples
            (otherwise they are rejected with an error).
        amp: Mixed precision (float16 autocast + gradient scaling) on CUDA; ignored elsewhere.
        channel_axis: Axis of the image channels when it cannot be inferred from the labels'
            shape (``None``: inferred; RGB(A) images end with the channel axis).
        foreground_fraction: Share of crops centred near a labelled pixel (the rest are uniform).
        augment: Random flips / rot90, scale and intensity jitter.
        scale_jitter: Crops are zoomed by a factor in ``[1/(1+j), 1+j]``.
        intensity_jitter: Gain and gamma in ``[1/(1+j), 1+j]``, offset in ``[-j/2, j/2]``.
        freeze_batchnorm: Keep batch-norm layers in eval mode (running statistics are not
            updated); useful for fine-tuning with tiny batches.
        sync_batchnorm: Use ``SyncBatchNorm`` in data-parallel CUDA runs.
        max_recoveries: Divergence recoveries (restore + halve the learning rate) before the
            run stops with ``"diverged"``.
        divergence_factor: A loss above this multiple of the running median counts as exploding.
    """

    epochs: int | None = None
    seconds: float | None = None
    steps_per_epoch: int = 10
    batch_size: int = 4
    crop_size: int = 256
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 1e-4
    loss: str = "masl"
    loss_options: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.2
    val_every: int | None = None
    patience: int | None = 10
    min_delta: float = 1e-3
    seed: int = 0
    device: str = "auto"
    allow_empty: bool = False
    amp: bool = True
    channel_axis: int | None = None
    foreground_fraction: float = 0.8
    augment: bool = True
    scale_jitter: float = 0.2
    intensity_jitter: float = 0.2
    freeze_batchnorm: bool = False
    sync_batchnorm: bool = False
    max_recoveries: int = 3
    divergence_factor: float = 10.0

    def validate(self) -> None:
        """Raise ``ValueError`` with an actionable message for out-of-range settings."""
        checks = [
            (self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
             f"epochs must be a positive integer or None, got {self.epochs!r}"),
            (self.seconds is None or self.seconds > 0,
             f"seconds must be positive or None, got {self.seconds!r}"),
            (self.steps_per_epoch >= 1, f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.crop_size >= 16, f"crop_size must be >= 16 pixels, got {self.crop_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}"),
            (0 <= self.warmup_fraction < 1,
             f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.val_fraction < 0.9,
             f"val_fraction must be in [0, 0.9), got {self.val_fraction}"),
            (self.val_every is None or self.val_every >= 1,
             f"val_every must be >= 1 or None, got {self.val_every}"),
            (self.patience is None or self.patience >= 1,
             f"patience must be >= 1 or None, got {self.patience}"),
            (0 <= self.foreground_fraction <= 1,
             f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}"),
            (0 <= self.scale_jitter < 1, f"scale_jitter must be in [0, 1), got {self.scale_jitter}"),
            (0 <= self.intensity_jitter < 1,
             f"intensity_jitter must be in [0, 1), got {self.intensity_jitter}"),
            (self.max_recoveries >= 0, f"max_recoveries must be >= 0, got {self.max_recoveries}"),
            (self.divergence_factor > 1,
             f"divergence_factor must be > 1, got {self.divergence_factor}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg + ".")

    @property
    def total_steps(self) -> int | None:
        """Planned number of steps (``None`` for a pure time budget)."""
        if self.epochs is not None:
            return self.epochs * self.steps_per_epoch
        if self.seconds is not None:
            return None
        return DEFAULT_EPOCHS * self.steps_per_epoch

    def budget_text(self) -> str:
        """Human-readable budget, e.g. ``"30 epochs x 10 steps"`` or ``"60 s"``."""
        parts = []
        if self.epochs is not None or self.seconds is None:
            parts.append(f"{self.epochs or DEFAULT_EPOCHS} epochs x {self.steps_per_epoch} steps")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " or ".join(parts)


@dataclass
class TrainReport:
    """Progress of a run, yielded after every step (and at the start and the end).

    Attributes:
        step: Optimisation steps done so far (0 in the start report).
        epoch: Current virtual epoch (1-based; 0 in the start report).
        total_steps: Planned steps; for a time budget an estimate from the speed so far.
        loss: Loss of this step (mean over processes), ``nan`` when not a training step.
        components: The loss's components and learnable weights (``weight_<name>``).
        train_dice: Dice of the thresholded predictions on this step's batch.
        val_dice: Validation Dice when a validation ran at this step, else ``None``.
        best_val_dice: Best validation Dice so far (``None`` without validation).
        lr: Learning rate used in this step.
        elapsed: Seconds since the start.
        message: Information or a warning for the user (empty for ordinary steps).
    """

    step: int
    epoch: int
    total_steps: int | None
    loss: float
    components: dict[str, float] = field(default_factory=dict)
    train_dice: float | None = None
    val_dice: float | None = None
    best_val_dice: float | None = None
    lr: float = 0.0
    elapsed: float = 0.0
    message: str = ""


@dataclass
class FinetuneResult:
    """What a run returns.

    Attributes:
        bundle: The trained model with the best state seen (best validation Dice, or the last
            good state without validation), in eval mode, with updated metadata.
        history: Every :class:`TrainReport` of the run.
        best_val_dice: Best validation Dice (``None`` without validation).
        initial_val_dice: Validation Dice of the starting model (``None`` without validation).
        stopped_reason: ``"completed"``, ``"time budget"``, ``"early stopping"``,
            ``"cancelled"`` or ``"diverged"``.
        steps: Optimisation steps done.
        best_step: Step of the returned state (0 = the starting model).
        elapsed: Seconds the run took.
        message: One-line summary for the user.
    """

    bundle: ModelBundle
    history: list[TrainReport]
    best_val_dice: float | None
    stopped_reason: str
    initial_val_dice: float | None = None
    steps: int = 0
    best_step: int = 0
    elapsed: float = 0.0
    message: str = ""
    resume: ResumeState | None = field(default=None, repr=False)


@dataclass(repr=False)
class ResumeState:
    """Everything a stopped run needs to continue exactly where it stopped (in memory).

    Held by :attr:`FinetuneResult.resume` after a run ended by Stop or by its time budget; pass
    it back as ``finetune(..., resume=state)`` with the same pairs. Continuing reproduces the
    uninterrupted run (same weights on the CPU) when the budget is unchanged; ``epochs`` and
    ``seconds`` may be raised to train for longer. Not written to disk: it holds the optimiser's
    moments and two extra copies of the weights.
    """

    config: FinetuneConfig
    model_config: dict[str, Any]
    data_key: str
    parent: str
    parent_metadata: dict[str, Any]
    step: int
    elapsed: float
    net: dict[str, Any]
    optimizer: dict[str, Any]
    loss: dict[str, Any]
    scaler: dict[str, Any]
    rng: Any
    cuda_rng: Any
    loop: dict[str, Any]
    history: list[TrainReport]


class FinetuneControl:
    """Cooperative stop for :func:`finetune`: ``stop()`` may be called from any thread.

    The run ends at its next step and the generator *returns* a :class:`FinetuneResult` with the
    best state so far (``stopped_reason="cancelled"``). :meth:`stop_now` also hands that result
    back at once, without waiting for the step in flight (a CPU backward pass can take seconds).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._make_result: Callable[[], FinetuneResult | None] | None = None

    def stop(self) -> None:
        """Ask the run to stop at the next step."""
        self._event.set()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._event.is_set()

    def stop_now(self) -> FinetuneResult | None:
        """Ask the run to stop and return, at once, the result it stands to return.

        That is the best validated state so far (or, without validation, the last applied
        step), built from a snapshot the training loop publishes after each change, so this
        never waits for the worker thread. ``None`` while the result would be the starting model
        unchanged (no step applied yet, or no validated improvement). The run itself still
        finishes its step in flight and returns its own result, which the caller may ignore.
        """
        self.stop()
        with self._lock:
            make = self._make_result
        return make() if make is not None else None

    def _publish(self, make: Callable[[], FinetuneResult | None] | None) -> None:
        with self._lock:
            self._make_result = make


class _StopNow(Exception):
    """Raised inside the network by :class:`_Interrupter` when a stop is requested."""


class _Interrupter:
    """Forward pre-hooks on every module that raise :class:`_StopNow` once ``control`` asks to
    stop, so Stop does not wait for the rest of the forward pass.

    Backward is not interrupted: an exception raised from a gradient hook of S2M-Net in a worker
    thread (where napari runs the training) makes the process abort at exit with torch 2.13
    ("terminate called without an active exception"), so a stop during backward waits for it.
    """

    def __init__(self, net: nn.Module, control: FinetuneControl | threading.Event) -> None:
        self.control = control
        self.handles = [m.register_forward_pre_hook(self._check) for m in net.modules()]

    def _check(self, *_: Any) -> None:
        c = self.control
        if c.is_set() if isinstance(c, threading.Event) else c.stop_requested:
            raise _StopNow

    def remove(self) -> None:
        """Detach every hook (the returned model must carry none)."""
        for h in self.handles:
            h.remove()
        self.handles = []


# --------------------------------------------------------------------------------------------
# data preparation


@dataclass
class _Item:
    """One image of the training or validation set, ready for cropping.

    ``image`` is ``(S, C, Y, X)`` float32 normalised (S planes of a stack, C image channels);
    ``target`` is ``(S, Y, X)`` class ids (binary: 0/1); ``fg`` holds flat indices of foreground
    pixels (subsampled) for crops weighted toward labelled regions.
    """

    image: np.ndarray
    target: np.ndarray
    fg: np.ndarray
    name: str


@dataclass
class _Data:
    train: list[_Item]
    val: list[_Item]
    split: str  # how validation was chosen, for the user
    info: list[dict[str, Any]]  # provenance per input image
    n_objects: int


def _layout_for(image: np.ndarray, labels: np.ndarray, channel_axis: int | None,
                given: Any, name: str) -> Any:
    """The :class:`~napari_s2mnet.inference.ImageLayout` of ``image``.

    Given explicitly (per pair or ``config.channel_axis``), or inferred from the labels' shape:
    the channel axis is the image axis whose removal gives the labels' shape (the last axis
    first; a last axis of 3 or 4 is RGB(A), as napari reads it).
    """
    from napari_s2mnet.inference import ImageLayout

    if given is not None:
        return given
    if channel_axis is not None:
        return ImageLayout(channel_axis=channel_axis)
    if image.shape == labels.shape:
        return ImageLayout()
    if image.ndim == labels.ndim + 1:
        for ax in (image.ndim - 1, 0, *range(1, image.ndim - 1)):
            if tuple(np.delete(np.array(image.shape), ax)) == labels.shape:
                if ax == image.ndim - 1 and image.shape[-1] in (3, 4):
                    return ImageLayout(rgb=True)
                return ImageLayout(channel_axis=ax)
    raise ValueError(
        f"{name}: image shape {image.shape} does not match labels shape {labels.shape}. Labels "
        "must cover the image's spatial shape, (Y, X) or a stack (Z, Y, X); a channel axis "
        "(e.g. RGB last) is allowed in the image only. Set channel_axis if it is ambiguous."
    )


def _normalized_planes(
    image: np.ndarray, labels: np.ndarray, layout: Any, bundle: ModelBundle, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Image planes ``(S, C, Y, X)`` normalised exactly as inference does, labels ``(S, Y, X)``.

    Uses the inference engine's own layout plan (channel selection: alpha dropped, RGB to gray
    for 1-channel models, gray replicated to multi-channel models) and statistics (whole image /
    stack, per channel), so a model sees the same values in training and in use.
    """
    from napari_s2mnet import inference as inf
    from napari_s2mnet.preprocess import apply_normalization, pixel_samples, stats_from_samples

    try:
        arr = inf._check_array(image)
        lay = inf._resolve_layout(arr, layout)
        plan = inf._plan(arr, lay, int(bundle.config.in_channels), [])
        inf._check_finite(plan)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    spatial = plan.view.shape[:-1]
    if tuple(spatial) != tuple(labels.shape):
        raise ValueError(
            f"{name}: the image's spatial shape {tuple(spatial)} (shape {image.shape}, layout "
            f"{lay}) differs from the labels' shape {labels.shape}; they must match."
        )
    stats = stats_from_samples(plan.select(pixel_samples(plan.view, plan.view.ndim - 1)),
                               bundle.normalization)
    base = apply_normalization(plan.select(plan.view), stats, channel_axis=-1)
    post = getattr(plan, "post", None)  # normalised channels -> model channels (gray repeated)
    if post is not None:
        base = post(base)
    elif getattr(plan, "repeat", 1) > 1:
        base = np.repeat(base, plan.repeat, axis=-1)
    ny, nx = spatial[-2:]
    planes = np.ascontiguousarray(
        np.moveaxis(base.reshape(-1, ny, nx, base.shape[-1]), -1, 1), dtype=np.float32)
    if planes.shape[1] != int(bundle.config.in_channels):  # pragma: no cover - inference contract
        raise ValueError(f"{name}: got {planes.shape[1]} channels for a model with "
                         f"{bundle.config.in_channels}.")
    return planes, labels.reshape(-1, ny, nx)


def _count_objects(mask: np.ndarray) -> int:
    """Connected foreground components summed over the planes of ``mask`` (S, Y, X)."""
    from scipy import ndimage

    return int(sum(ndimage.label(plane)[1] for plane in mask))


def _unpack(pair: Any, i: int, names: Sequence[str] | None, role: str) -> tuple[Any, Any, str, Any]:
    from napari_s2mnet.inference import ImageLayout

    if not isinstance(pair, tuple | list) or not 2 <= len(pair) <= 4:
        raise TypeError(f"{role} pair #{i} must be a tuple (image, labels[, name][, layout]), "
                        f"got {type(pair).__name__}.")
    name = str(names[i]) if names is not None and i < len(names) else f"image {i}"
    layout = None
    for extra in pair[2:]:
        if isinstance(extra, ImageLayout):
            layout = extra
        elif isinstance(extra, str):
            name = extra
        elif extra is not None:
            raise TypeError(f"{role} pair #{i}: extra entries must be a name (str) or an "
                            f"ImageLayout, got {type(extra).__name__}.")
    return pair[0], pair[1], name, layout


def _prepare(
    pairs: Sequence[Any],
    bundle: ModelBundle,
    config: FinetuneConfig,
    names: Sequence[str] | None,
    role: str,
) -> tuple[list[_Item], list[dict[str, Any]]]:
    """Normalise and check the pairs; one :class:`_Item` per pair (all planes kept)."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], np.ndarray):
        pairs = [pairs]  # a single (image, labels) pair
    if not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"No {role} data: give a list of (image, labels) pairs.")
    ncls = bundle.config.num_classes
    items: list[_Item] = []
    info: list[dict[str, Any]] = []
    for i, pair in enumerate(pairs):
        image, labels, name, layout = _unpack(pair, i, names, role)
        if image is None or labels is None:
            raise TypeError(f"{name}: image and labels must be arrays, not None.")
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise ValueError(f"{name}: labels must hold whole numbers (label ids); got "
                                 f"fractional or non-finite {labels.dtype} values.")
            labels = labels.astype(np.int64)
        elif labels.dtype.kind not in "biu":
            raise TypeError(f"{name}: labels dtype {labels.dtype} is not an integer type.")
        if labels.ndim < 2:
            raise ValueError(f"{name}: labels must be 2-D (Y, X) or a stack (..., Y, X), got "
                             f"shape {labels.shape}.")
        if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
            raise ValueError(f"{name}: labels contain negative values; use 0 for background and "
                             "positive ids for objects.")
        lay = _layout_for(image, labels, config.channel_axis, layout, name)
        planes, lab = _normalized_planes(image, labels, lay, bundle, name)
        if ncls == 1:
            target = (lab > 0).astype(np.uint8)
        else:
            top = int(lab.max()) if lab.size else 0
            if top >= ncls:
                raise ValueError(
                    f"{name}: labels contain the value {top} but the model has {ncls} classes "
                    f"(0..{ncls - 1}); multi-class models are trained on semantic labels "
                    "(label value = class id)."
                )
            target = lab.astype(np.uint8 if ncls <= 255 else np.int32)
        n_obj = _count_objects(target > 0)
        if n_obj == 0 and role == "training" and not config.allow_empty:
            raise ValueError(
                f"{name} has no labelled objects (its labels are all 0). Label at least one "
                "object, remove this image, or allow images without objects as background-only "
                "examples (allow_empty=True)."
            )
        items.append(_Item(planes, target, _fg_index(target), name))
        info.append({"name": name, "shape": list(image.shape), "dtype": str(image.dtype),
                     "n_objects": n_obj, "planes": int(target.shape[0])})
    if role == "training" and not any(it.fg.size for it in items):
        raise ValueError("None of the training images has a labelled object; label some objects.")
    return items, info


def _fg_index(target: np.ndarray, limit: int = 1_000_000) -> np.ndarray:
    idx = np.flatnonzero(target.reshape(-1) > 0)
    if idx.size > limit:  # a strided subset keeps memory bounded on huge stacks
        idx = idx[:: math.ceil(idx.size / limit)]
    return idx


def _sub_item(item: _Item, rows: slice, cols: slice, suffix: str) -> _Item:
    image = np.ascontiguousarray(item.image[:, :, rows, cols])
    target = np.ascontiguousarray(item.target[:, rows, cols])
    return _Item(image, target, _fg_index(target), f"{item.name} {suffix}")


def _split(items: list[_Item], config: FinetuneConfig) -> tuple[list[_Item], list[_Item], str]:
    """Hold out validation data: whole planes when there are >= 5, else a band of each image."""
    if config.val_fraction <= 0:
        return items, [], "no validation (val_fraction = 0)"
    planes = [(i, s) for i, it in enumerate(items) for s in range(it.target.shape[0])]
    with_obj = [(i, s) for i, s in planes if items[i].target[s].any()]
    if len(planes) >= 5 and len(with_obj) >= 2:
        rng = np.random.default_rng([config.seed, 7])
        n_val = max(1, round(config.val_fraction * len(planes)))
        order = [with_obj[k] for k in rng.permutation(len(with_obj))]
        val_set = set(order[:min(n_val, len(with_obj) - 1)])
        train, val = [], []
        for i, it in enumerate(items):
            keep = [s for s in range(it.target.shape[0]) if (i, s) not in val_set]
            held = [s for s in range(it.target.shape[0]) if (i, s) in val_set]
            for sel, out, tag in ((keep, train, "train"), (held, val, "val")):
                if sel:
                    img = np.ascontiguousarray(it.image[sel])
                    tgt = np.ascontiguousarray(it.target[sel])
                    out.append(_Item(img, tgt, _fg_index(tgt), f"{it.name} ({tag})"))
        n_obj = sum(_count_objects(v.target > 0) for v in val)
        return train, val, (f"validation on {len(val_set)} of {len(planes)} images/slices "
                            f"({n_obj} objects)")
    # Few images: hold out a band (bottom rows or right columns, the longer side) of each one.
    train, val = [], []
    n_val_obj = 0
    for it in items:
        h, w = it.target.shape[-2:]
        along_rows = h >= w
        size = h if along_rows else w
        band = round(config.val_fraction * size)
        if band < _MIN_BAND or size - band < _MIN_BAND:
            train.append(it)
            continue
        cut = size - band
        full = slice(None)
        tr = _sub_item(it, slice(0, cut), full, "(train)") if along_rows else \
            _sub_item(it, full, slice(0, cut), "(train)")
        va = _sub_item(it, slice(cut, None), full, "(val)") if along_rows else \
            _sub_item(it, full, slice(cut, None), "(val)")
        train.append(tr)
        val.append(va)
        n_val_obj += _count_objects(va.target > 0)
    has_train_fg = any(it.fg.size for it in train)
    if n_val_obj < _MIN_VAL_OBJECTS or not has_train_fg:
        total = sum(_count_objects(it.target > 0) for it in items)
        return items, [], (f"no validation: too little data ({total} labelled objects; "
                           f"need >= {_MIN_VAL_OBJECTS} in a held-out {config.val_fraction:.0%} "
                           "band); the result is the last state")
    return train, val, (f"validation on the last {config.val_fraction:.0%} of each image "
                        f"({n_val_obj} objects)")


def _prepare_data(
    pairs: Sequence[Any],
    bundle: ModelBundle,
    config: FinetuneConfig,
    names: Sequence[str] | None,
    val_pairs: Sequence[Any] | None,
) -> _Data:
    items, info = _prepare(pairs, bundle, config, names, "training")
    n_objects = sum(d["n_objects"] for d in info)
    if val_pairs is not None:
        val, _ = _prepare(val_pairs, bundle, config, None, "validation")
        n_val = sum(_count_objects(v.target > 0) for v in val)
        return _Data(items, val, f"validation on {len(val)} given images ({n_val} objects)",
                     info, n_objects)
    train, val, split = _split(items, config)
    return _Data(train, val, split, info, n_objects)


# --------------------------------------------------------------------------------------------
# crop sampling and augmentation


def _window(plane: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``plane[..., y0:y0+h, x0:x0+w]`` with mirror padding where the window leaves the image."""
    ny, nx = plane.shape[-2:]
    ys, ye, xs, xe = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    out = plane[..., ys:ye, xs:xe]
    pad = ((ys - y0, y0 + h - ye), (xs - x0, x0 + w - xe))
    if any(p for pp in pad for p in pp):
        mode = "symmetric" if min(out.shape[-2:]) > 1 else "edge"
        out = np.pad(out, ((0, 0),) * (out.ndim - 2) + pad, mode=mode)
    return out


def _resize(arr: np.ndarray, size: int, labels: bool) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    if labels:
        t = F.interpolate(t[:, None], size=(size, size), mode="nearest-exact")[0, 0]
        return t.numpy().astype(arr.dtype)
    down = t.shape[-1] > size
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return t[0].numpy()


class _Sampler:
    """Random training crops; crop ``g`` of step ``k`` depends only on (seed, k, g)."""

    def __init__(self, data: _Data, config: FinetuneConfig) -> None:
        self.items = data.train
        self.cfg = config
        fg = np.array([it.fg.size for it in self.items], dtype=np.float64)
        area = np.array([it.target.size for it in self.items], dtype=np.float64)
        self.p_fg = fg / fg.sum() if fg.sum() else None
        self.p_area = area / area.sum()

    def crop(self, step: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Crop number ``index`` (global index within the step) of step ``step``."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, index])
        size = cfg.crop_size
        scale = 1.0
        if cfg.augment and cfg.scale_jitter > 0:
            scale = math.exp(rng.uniform(-1, 1) * math.log1p(cfg.scale_jitter))
        win = max(8, round(size / scale))
        if self.p_fg is not None and rng.random() < cfg.foreground_fraction:
            item = self.items[rng.choice(len(self.items), p=self.p_fg)]
            flat = int(item.fg[rng.integers(item.fg.size)])
            s, y, x = np.unravel_index(flat, item.target.shape)
            jitter = rng.integers(-(win // 4), win // 4 + 1, size=2)
            cy, cx = int(y) + int(jitter[0]), int(x) + int(jitter[1])
        else:
            item = self.items[rng.choice(len(self.items), p=self.p_area)]
            s = rng.integers(item.target.shape[0])
            cy = int(rng.integers(item.target.shape[1]))
            cx = int(rng.integers(item.target.shape[2]))
        y0, x0 = cy - win // 2, cx - win // 2
        img = _window(item.image[s], y0, x0, win, win)
        tgt = _window(item.target[s], y0, x0, win, win)
        if win != size:
            img = _resize(img, size, labels=False)
            tgt = _resize(tgt, size, labels=True)
        if cfg.augment:
            k = int(rng.integers(4))
            img, tgt = np.rot90(img, k, axes=(-2, -1)), np.rot90(tgt, k, axes=(-2, -1))
            if rng.random() < 0.5:
                img, tgt = img[..., ::-1], tgt[..., ::-1]
            img = self._intensity(np.array(img, dtype=np.float32), rng)
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(tgt)

    def _intensity(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = self.cfg.intensity_jitter
        if j <= 0:
            return img
        lj = math.log1p(j)
        gamma = math.exp(rng.uniform(-lj, lj))
        gain = math.exp(rng.uniform(-lj, lj))
        offset = rng.uniform(-j / 2, j / 2)
        lo, hi = float(img.min()), float(img.max())
        if hi > lo:  # gamma on the crop's own range keeps negative values meaningful
            img = lo + (hi - lo) * ((img - lo) / (hi - lo)) ** gamma
        return (img * gain + offset).astype(np.float32)

    def batch(self, step: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        crops = [self.crop(step, start + i) for i in range(count)]
        return np.stack([c[0] for c in crops]), np.stack([c[1] for c in crops])


# --------------------------------------------------------------------------------------------
# metrics


def _dice_stats(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per foreground class (intersection, predicted, true) pixel counts, float64 ``(K, 3)``."""
    import torch

    classes = [1] if num_classes == 1 else list(range(1, num_classes))
    rows = []
    for c in classes:
        p, t = pred == c, target == c
        rows.append(torch.stack([(p & t).sum(), p.sum(), t.sum()]).to(torch.float64))
    return torch.stack(rows)


def _dice_from_stats(stats: torch.Tensor) -> float:
    """Mean Dice over classes present in the prediction or the ground truth (1.0 if none)."""
    denom = stats[:, 1] + stats[:, 2]
    present = denom > 0
    if not bool(present.any()):
        return 1.0
    return float((2 * stats[present, 0] / denom[present]).mean())


def _predict_classes(logits: torch.Tensor, num_classes: int, threshold: float) -> torch.Tensor:
    """Class map ``(B, H, W)``: thresholded sigmoid (binary) or argmax (multi-class)."""
    if num_classes == 1:
        return (logits[:, 0].float().sigmoid() > threshold).long()
    return logits.argmax(dim=1)


def _val_tiles(items: list[_Item], tile: int) -> list[tuple[int, int, int, int, int, int]]:
    """Non-overlapping tiles (item, plane, y0, x0, h, w) of side ``tile`` covering the data."""
    tiles = []
    for i, it in enumerate(items):
        ns, ny, nx = it.target.shape
        for s in range(ns):
            for y0 in range(0, ny, tile):
                for x0 in range(0, nx, tile):
                    tiles.append((i, s, y0, x0, min(tile, ny - y0), min(tile, nx - x0)))
    total = sum(t[4] * t[5] for t in tiles)
    if total > _VAL_MAX_PIXELS:  # a fixed, evenly spread subset keeps validation cheap
        keep = max(1, int(len(tiles) * _VAL_MAX_PIXELS / total))
        tiles = [tiles[k] for k in np.linspace(0, len(tiles) - 1, keep).round().astype(int)]
    return tiles


def _evaluate(
    net: nn.Module,
    items: list[_Item],
    tiles: list[tuple[int, int, int, int, int, int]],
    num_classes: int,
    threshold: float,
    device: torch.device,
    ctx: DistContext | None = None,
    amp: bool = False,
) -> float:
    """Dice of ``net`` on validation tiles (pixels pooled over all tiles; ranks share the work)."""
    import torch

    was_training = net.training
    net.eval()
    k = 1 if num_classes == 1 else num_classes - 1
    stats = torch.zeros(k, 3, dtype=torch.float64)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    with torch.no_grad():
        for i, s, y0, x0, h, w in tiles[rank::world]:
            it = items[i]
            img = it.image[s, :, y0:y0 + h, x0:x0 + w]
            x = torch.from_numpy(np.ascontiguousarray(img))[None].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = net(x)
            pred = _predict_classes(logits.float(), num_classes, threshold)[0].cpu()
            tgt = torch.from_numpy(np.ascontiguousarray(it.target[s, y0:y0 + h, x0:x0 + w]))
            stats += _dice_stats(pred.long(), tgt.long(), num_classes)
    if ctx is not None and ctx.enabled:
        stats = ctx.all_reduce_sum(stats.to(device)).cpu()
    net.train(was_training)
    return _dice_from_stats(stats)


def evaluate_dice(
    model: ModelBundle,
    pairs: Sequence[Any],
    *,
    device: str = "cpu",
    channel_axis: int | None = None,
) -> float:
    """Foreground Dice of ``model`` on (image, labels) pairs, pooled over all pixels.

    Images are normalised exactly as in training (and inference); binary models use the bundle's
    threshold, multi-class models the mean Dice over foreground classes.
    """
    from napari_s2mnet.devices import resolve_device

    cfg = FinetuneConfig(channel_axis=channel_axis, allow_empty=True)
    items, _ = _prepare(pairs, model, cfg, None, "evaluation")
    dev = resolve_device(device)
    net = model.model
    orig = next(iter(net.parameters())).device
    net.to(dev)
    try:
        return _evaluate(net, items, _val_tiles(items, model.tile_size),
                         model.config.num_classes, model.threshold, dev)
    finally:
        net.to(orig)


# --------------------------------------------------------------------------------------------
# the training run


def _make_loss(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    """The criterion (a separate function so tests can substitute one)."""
    from napari_s2mnet.losses import build_loss

    return build_loss(name, num_classes, **options)


def _set_bn_eval(net: nn.Module) -> None:
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _lr_factor(progress: float, step: int, warmup: float, total: int | None, floor: float) -> float:
    """Warm-up then cosine, as a factor of the peak lr (``floor`` = min_lr / lr)."""
    if total is not None:
        warm_steps = max(1, round(warmup * total)) if warmup > 0 else 0
        if step < warm_steps:
            return (step + 1) / warm_steps
        p = (step - warm_steps) / max(1, total - warm_steps)
    else:
        if progress < warmup:
            return max(progress / warmup, 0.01)
        p = (progress - warmup) / max(1e-9, 1 - warmup)
    p = min(max(p, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


class _Run:
    """State of one run; :func:`finetune` drives it. Also used by the data-parallel tests."""

    def __init__(
        self,
        bundle: ModelBundle,
        data: _Data,
        config: FinetuneConfig,
        device: torch.device,
        ctx: DistContext,
    ) -> None:
        import torch

        from napari_s2mnet import _ddp
        from napari_s2mnet.devices import supports_amp

        self.cfg = config
        self.device = device
        self.ctx = ctx
        self.data = data
        self.num_classes = bundle.config.num_classes
        self.threshold = bundle.threshold
        self.amp = bool(config.amp and supports_amp(device))
        torch.manual_seed(config.seed + 1000 * ctx.rank)  # dropout differs per rank on purpose
        self.net = bundle.model
        if config.sync_batchnorm and ctx.enabled and device.type == "cuda":
            self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(self.net))
        self.net.to(device)
        self.set_train_mode()
        self.ddp = _ddp.wrap_model(self.net, ctx, device, bundle.config.in_channels)
        self.loss_fn = _make_loss(config.loss, self.num_classes, dict(config.loss_options))
        self.loss_fn.to(device)
        self.loss_fn.train()
        decay, no_decay = [], []
        for p in self.net.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if self.loss_params:  # MASL's learnable weights: optimised, never decayed
            groups.append({"params": self.loss_params, "weight_decay": 0.0})
        self.opt = torch.optim.Adam(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.sampler = _Sampler(data, config)
        # Validate on tiles of the size the model will segment with (its first training crop).
        tile = bundle.trained_tile_size or config.crop_size
        self.val_tiles = _val_tiles(data.val, tile) if data.val else []

    def set_train_mode(self) -> None:
        self.net.train()
        if self.cfg.freeze_batchnorm:
            _set_bn_eval(self.net)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the batch of ``step`` as tensors on the device."""
        import torch

        b = self.cfg.batch_size
        x, y = self.sampler.batch(step, self.ctx.rank * b, b)
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        if self.num_classes == 1:
            yt = torch.from_numpy(y.astype(np.float32))[:, None].to(self.device)
        else:
            yt = torch.from_numpy(y.astype(np.int64)).to(self.device)
        return xt, yt

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.ddp(x)
        # Losses run in float32 on the logits (MASL's learnable weights never see fp16).
        return self.loss_fn(logits.float(), y), logits.detach()

    def backward(self, loss: torch.Tensor) -> None:
        from napari_s2mnet import _ddp

        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        _ddp.average_gradients(self.loss_params, self.ctx)

    def clip_and_step(self) -> float:
        """Unscale, clip, step, clamp MASL weights; returns the gradient norm before clipping."""
        import torch

        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups[:2] for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.scaler.step(self.opt)
        self.scaler.update()
        clamp = getattr(self.loss_fn, "clamp_weights_", None)
        if callable(clamp):
            clamp()
        return norm

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def components(self) -> dict[str, float]:
        """The loss's last components (MASL: components, ``w_*`` weights, ``alpha_*``)."""
        out: dict[str, float] = {}
        for k, v in dict(getattr(self.loss_fn, "last_components", {}) or {}).items():
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        weights = getattr(self.loss_fn, "weight_dict", None)
        if isinstance(weights, dict):
            for k, v in weights.items():
                out.setdefault(f"w_{k}", float(v))
        return out

    def validate(self) -> float | None:
        if not self.val_tiles:
            return None
        dice = _evaluate(self.net, self.data.val, self.val_tiles,
                         self.num_classes, self.threshold, self.device, self.ctx,
                         self.amp)
        self.set_train_mode()
        return dice

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "opt": copy.deepcopy(self.opt.state_dict()),
            "loss": {k: v.detach().clone() for k, v in self.loss_fn.state_dict().items()},
            "scaler": copy.deepcopy(self.scaler.state_dict()),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self.net.load_state_dict(snap["model"])
        self.opt.load_state_dict(copy.deepcopy(snap["opt"]))
        self.loss_fn.load_state_dict(snap["loss"])
        if snap["scaler"]:
            self.scaler.load_state_dict(snap["scaler"])


def _resolve(device: str) -> torch.device:
    from napari_s2mnet.devices import resolve_device

    return resolve_device(device)


def _data_key(data: _Data) -> str:
    """Fingerprint of the prepared training and validation data (for :class:`ResumeState`)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for items in (data.train, data.val):
        h.update(str(len(items)).encode())
        for it in items:
            for arr in (it.image, it.target):
                h.update(f"{arr.dtype}{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _check_resume(state: ResumeState, model: ModelBundle, config: FinetuneConfig | None,
                  data_key: str) -> FinetuneConfig:
    """The config to continue with; a clear error when the run cannot be continued as asked."""
    if not isinstance(state, ResumeState):
        raise TypeError(f"resume must be a ResumeState (FinetuneResult.resume), "
                        f"got {type(state).__name__}.")
    if model.config.to_dict() != state.model_config:
        raise ValueError("resume: the model's architecture differs from the stopped run's; pass "
                         "the bundle the run returned (FinetuneResult.bundle).")
    if config is None:
        return copy.deepcopy(state.config)
    budget = ("epochs", "seconds")
    changed = [f.name for f in fields(FinetuneConfig) if f.name not in budget
               and getattr(config, f.name) != getattr(state.config, f.name)]
    if changed:
        raise ValueError(f"resume: only the budget (epochs, seconds) may change when a run is "
                         f"continued, but {', '.join(changed)} differ(s); start a new fine-tune "
                         "from the returned model instead.")
    if data_key != state.data_key:
        raise ValueError("resume: the training pairs differ from those of the stopped run "
                         "(images, labels or validation split changed); start a new fine-tune "
                         "from the returned model instead.")
    return copy.deepcopy(config)


def finetune(
    pairs: Sequence[Any],
    model: ModelBundle,
    config: FinetuneConfig | None = None,
    *,
    control: FinetuneControl | threading.Event | None = None,
    val_pairs: Sequence[Any] | None = None,
    names: Sequence[str] | None = None,
    resume: ResumeState | None = None,
) -> Generator[TrainReport, None, FinetuneResult]:
    """Fine-tune (or train) a copy of ``model`` on (image, labels) pairs.

    Args:
        pairs: ``(image, labels)`` numpy arrays (optionally ``(image, labels, name)``): 2-D
            images, multichannel images (channel axis inferred from the labels' shape or
            ``config.channel_axis``), or stacks ``(Z, Y, X)`` / ``(T, Y, X)`` sampled by slice with
            labels of the same spatial shape. Labels: instance ids (binary models) or class ids
            (multi-class models).
        model: The starting model; it is deep-copied and never modified.
        config: Settings (default :class:`FinetuneConfig`; with ``resume``, the stopped run's).
        control: A :class:`FinetuneControl` (or ``threading.Event``) to stop cooperatively; the
            generator then returns the best state so far with ``stopped_reason="cancelled"``.
        val_pairs: Explicit validation pairs (instead of holding out part of ``pairs``).
        names: Names of the pairs for the model's provenance metadata.
        resume: :attr:`FinetuneResult.resume` of a run that was stopped or ran out of time:
            continue it (weights, optimiser, schedule, random streams, best state) instead of
            starting afresh. Needs the same pairs; ``model`` gives the architecture only.

    Yields:
        A :class:`TrainReport` at the start (with the starting model's validation Dice), after
        every step, and at the end.

    Returns:
        A :class:`FinetuneResult` with the best state seen.

    Raises:
        ValueError / TypeError: Bad input (shapes, label values, images without objects unless
            ``allow_empty``, channels that do not fit the model, bad config values, a ``resume``
            state that does not fit the pairs or the config).
    """
    import torch

    from napari_s2mnet import _ddp
    from napari_s2mnet.checkpoint import model_hash

    if not isinstance(model, ModelBundle):
        raise TypeError(f"model must be a ModelBundle (see checkpoint.load_model / new_model), "
                        f"got {type(model).__name__}.")
    config = copy.deepcopy(config if config is not None else
                           (resume.config if isinstance(resume, ResumeState) else FinetuneConfig()))
    config.validate()
    device = _resolve(config.device)
    ctx = _ddp.init_from_env(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if resume is not None and ctx.enabled:
        raise ValueError("resume is not supported in data-parallel runs; continue on one process "
                         "or start a new run from the saved model.")
    data = _prepare_data(pairs, model, config, names, val_pairs)
    key = _data_key(data) if resume is not None else ""
    if resume is not None:
        config = _check_resume(resume, model, config, key)
    parent = resume.parent if resume is not None else model_hash(model)
    parent_meta = resume.parent_metadata if resume is not None else model.metadata
    work = ModelBundle(model=copy.deepcopy(model.model), config=copy.deepcopy(model.config),
                       normalization=copy.deepcopy(model.normalization),
                       metadata=copy.deepcopy(model.metadata))
    run = _Run(work, data, config, device, ctx)

    total = config.total_steps
    val_every = config.val_every or config.steps_per_epoch
    history: list[TrainReport] = list(resume.history) if resume is not None else []
    # Loop state that a resumed run takes over (ResumeState.loop).
    lp: dict[str, Any] = {
        "lr_scale": 1.0, "recoveries": 0, "exploding_run": 0, "good_losses": [],
        "last_good_step": 0, "init_val": None, "best_val": None, "best_step": 0,
        "since_best": 0, "pending_val": False,
    }
    if resume is not None:
        run.net.load_state_dict(resume.net)
        run.opt.load_state_dict(copy.deepcopy(resume.optimizer))
        run.loss_fn.load_state_dict(resume.loss)
        if resume.scaler:
            run.scaler.load_state_dict(resume.scaler)
        torch.set_rng_state(resume.rng)
        if resume.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(resume.cuda_rng, device)
        lp.update(copy.deepcopy(resume.loop))
    good_losses: deque[float] = deque(lp.pop("good_losses"), maxlen=50)
    # (lp holds a deep copy of resume.loop: the state can be resumed again.)
    last_good = lp.pop("last_good") if resume is not None else run.snapshot()
    best_state = lp.pop("best_state") if resume is not None else None
    step = resume.step if resume is not None else 0
    t0 = time.perf_counter() - (resume.elapsed if resume is not None else 0.0)

    def report(**kw: Any) -> TrainReport:
        r = TrainReport(**kw)
        history.append(r)
        return r

    def state_copy() -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in run.net.state_dict().items()}

    publishing = isinstance(control, FinetuneControl) and not ctx.enabled

    def publish(state: dict[str, Any], at_step: int) -> None:
        """Let :meth:`FinetuneControl.stop_now` hand ``state`` out without waiting for us."""
        if not publishing:
            return
        snap = (state, at_step, lp["best_val"], lp["init_val"], time.perf_counter() - t0, step)

        def make() -> FinetuneResult:
            weights, best_step, best_val, init_val, elapsed, steps = snap
            net = copy.deepcopy(model.model)  # the caller's model: never touched by this run
            net.load_state_dict(weights)
            net.to(device).eval()
            bundle = ModelBundle(model=net, config=copy.deepcopy(model.config),
                                 normalization=copy.deepcopy(model.normalization),
                                 metadata=_result_metadata(parent_meta, parent, config, data,
                                                           steps, best_step, best_val, init_val,
                                                           "cancelled", elapsed, device, ctx))
            summary = _summary("cancelled", steps, best_val, init_val, best_step, elapsed, data)
            return FinetuneResult(bundle=bundle, history=list(history), best_val_dice=best_val,
                                  stopped_reason="cancelled", initial_val_dice=init_val,
                                  steps=steps, best_step=best_step, elapsed=elapsed,
                                  message=summary)

        control._publish(make)  # type: ignore[union-attr]

    def stop_asked() -> bool:
        if control is None:
            return False
        return control.is_set() if isinstance(control, threading.Event) else control.stop_requested

    def validate_and_track() -> float | None:
        """Validate at ``step``; keep the best state; count validations without improvement."""
        nonlocal best_state
        lp["pending_val"] = True
        val = run.validate()
        lp["pending_val"] = False
        if lp["best_val"] is None or val > lp["best_val"]:
            improved = lp["best_val"] is None or val >= lp["best_val"] + config.min_delta
            lp["best_val"], lp["best_step"] = val, step
            best_state = state_copy()
            lp["since_best"] = 0 if improved else lp["since_best"] + 1
            publish(best_state, step)
        else:
            lp["since_best"] += 1
        return val

    reason = "completed"
    stop_flag = torch.zeros(3, dtype=torch.float64, device=device if ctx.enabled else "cpu")
    # Stop within one layer of the forward pass, not at the end of the step: hooks raise _StopNow
    # (one process only: a rank leaving a collective early would hang the others).
    interrupter = _Interrupter(run.net, control) if control is not None and not ctx.enabled \
        else None
    rng_at_step = torch.get_rng_state()
    cuda_rng_at_step = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    buffers_at_step: dict[str, Any] = {}
    in_step = False
    try:
        if resume is None:
            lp["init_val"] = lp["best_val"] = run.validate()
            best_state = state_copy()
            mode_text = f"data-parallel x{ctx.world_size}, " if ctx.enabled else ""
            msg = (f"training on {len(data.info)} image(s) with {data.n_objects} objects, "
                   f"{config.budget_text()}, {mode_text}device {device}; {data.split}")
            if lp["init_val"] is not None:
                msg += f"; starting validation Dice {lp['init_val']:.3f}"
        else:
            msg = f"resuming at step {step} ({config.budget_text()}, device {device})"
            if lp["pending_val"]:  # the stopped run was interrupted in this validation
                validate_and_track()
        yield report(step=step, epoch=0 if step == 0 else (step - 1) // config.steps_per_epoch + 1,
                     total_steps=total, loss=float("nan"), val_dice=lp["init_val"],
                     best_val_dice=lp["best_val"], lr=0.0, elapsed=time.perf_counter() - t0,
                     message=msg)
        while True:
            elapsed = time.perf_counter() - t0
            # Where a resumed run picks up: random streams and buffers as of this step's start.
            rng_at_step = torch.get_rng_state()
            if device.type == "cuda":
                cuda_rng_at_step = torch.cuda.get_rng_state(device)
            # One all-reduce per step keeps every rank's decisions identical.
            want_stop = 1.0 if stop_asked() else 0.0
            time_up = config.seconds is not None and elapsed >= config.seconds
            if total is not None and step >= total:
                reason = "completed"
                break
            if ctx.enabled:
                stop_flag.zero_()
                stop_flag[0], stop_flag[1] = want_stop, float(time_up)
                ctx.all_reduce_sum(stop_flag)
                want_stop, time_up = float(stop_flag[0]) > 0, float(stop_flag[1]) > 0
            if want_stop:
                reason = "cancelled"
                break
            if time_up:
                reason = "time budget"
                break

            progress = elapsed / config.seconds if config.seconds is not None else 0.0
            if total is not None and config.seconds is not None:
                progress = 0.0  # both budgets: the step schedule rules, time only cuts short
            factor = _lr_factor(progress, step, config.warmup_fraction, total, config.min_lr / config.lr)
            lr = config.lr * factor * lp["lr_scale"]
            run.set_lr(lr)

            if interrupter is not None:  # a stop inside the forward pass must not leave
                # BatchNorm statistics of a step that never happened
                buffers_at_step = {k: b.detach().clone() for k, b in run.net.named_buffers()}
            in_step = True
            x, y = run.batch(step)
            loss, logits = run.forward_loss(x, y)
            loss_value = float(loss.detach())
            # Agree across ranks on the mean loss and on whether this step is bad.
            bad_local = 0.0 if math.isfinite(loss_value) else 1.0
            if ctx.enabled:
                agg = torch.tensor([loss_value if bad_local == 0 else 0.0, bad_local, 1.0],
                                   dtype=torch.float64, device=device)
                ctx.all_reduce_sum(agg)
                bad = float(agg[1]) > 0
                loss_mean = float(agg[0]) / ctx.world_size if not bad else float("nan")
            else:
                bad = bad_local > 0
                loss_mean = loss_value
            exploding = (not bad and len(good_losses) >= 10
                         and loss_mean > config.divergence_factor * float(np.median(good_losses)))
            message = ""
            grad_norm = float("nan")
            if not bad and not exploding:
                run.backward(loss)
                grad_norm = run.clip_and_step()
                if not math.isfinite(grad_norm) and not run.amp:
                    bad = True  # non-finite gradients: the weights may already be damaged
            if exploding:
                lp["exploding_run"] += 1
                if lp["exploding_run"] >= 3:
                    bad = True
                    message = (f"loss exploded ({loss_mean:.3g} > {config.divergence_factor:g} x the "
                               "running median for 3 steps)")
                else:
                    message = f"skipped an outlier step (loss {loss_mean:.3g})"
            else:
                lp["exploding_run"] = 0
            step += 1
            in_step = False

            if bad:
                lp["recoveries"] += 1
                lp["exploding_run"] = 0
                what = message or ("non-finite loss" if not math.isfinite(loss_mean)
                                   else "non-finite gradients")
                if lp["recoveries"] > config.max_recoveries:
                    run.restore(last_good)
                    reason = "diverged"
                    yield report(step=step, epoch=(step - 1) // config.steps_per_epoch + 1,
                                 total_steps=total, loss=loss_mean, lr=lr,
                                 elapsed=time.perf_counter() - t0, best_val_dice=lp["best_val"],
                                 message=f"{what} at step {step}; training diverged after "
                                         f"{config.max_recoveries} recoveries: stopping and keeping "
                                         f"the last good state (step {lp['last_good_step']}).")
                    break
                run.restore(last_good)
                lp["lr_scale"] *= 0.5
                message = (f"{what} at step {step}: restored the last good state (step "
                           f"{lp['last_good_step']}) and halved the learning rate to "
                           f"{config.lr * lp['lr_scale']:.2e}")
                if not run.val_tiles:
                    publish(state_copy(), lp["last_good_step"])
            else:
                if not exploding:
                    good_losses.append(loss_mean)
                    if not run.val_tiles:  # without validation the result is the last state
                        publish(state_copy(), step)
                if step % _SNAPSHOT_EVERY == 0:
                    last_good = run.snapshot()
                    lp["last_good_step"] = step

            train_dice = None
            if not bad:
                pred = _predict_classes(logits.float(), run.num_classes, run.threshold)
                tgt = y[:, 0].round().to(pred.dtype) if run.num_classes == 1 else y
                train_dice = _dice_from_stats(_dice_stats(pred.long(), tgt.long(), run.num_classes))

            val = None
            if run.val_tiles and step % val_every == 0 and not bad:
                val = validate_and_track()
            elapsed = time.perf_counter() - t0
            est_total = total
            if est_total is None and config.seconds is not None and elapsed > 0:
                est_total = max(step, round(step * config.seconds / elapsed))
            yield report(step=step, epoch=(step - 1) // config.steps_per_epoch + 1,
                         total_steps=est_total, loss=loss_mean, components=run.components(),
                         train_dice=train_dice, val_dice=val, best_val_dice=lp["best_val"], lr=lr,
                         elapsed=elapsed, message=message)
            if val is not None and config.patience is not None and \
                    lp["since_best"] >= config.patience:
                reason = "early stopping"
                break
    except _StopNow:
        reason = "cancelled"  # mid-step: the optimiser has not applied this step
        run.opt.zero_grad(set_to_none=True)
        if in_step and buffers_at_step:
            for name, buf in run.net.named_buffers():
                buf.copy_(buffers_at_step[name])
    finally:
        if interrupter is not None:
            interrupter.remove()
        if publishing:
            control._publish(None)  # type: ignore[union-attr]

    if best_state is None:  # stopped during the first validation
        best_state = state_copy()
    resumable = None
    if reason in ("cancelled", "time budget") and step > 0 and not ctx.enabled:
        # Not copied: nothing below mutates these (the snapshots and the best state are fresh
        # copies), and a resumed run deep-copies them in turn.
        loop = {**lp, "good_losses": list(good_losses), "last_good": last_good,
                "best_state": best_state}
        resumable = ResumeState(
            config=copy.deepcopy(config), model_config=model.config.to_dict(),
            data_key=key or _data_key(data), parent=parent, parent_metadata=parent_meta,
            step=step, elapsed=time.perf_counter() - t0, net=state_copy(),
            optimizer=copy.deepcopy(run.opt.state_dict()),
            loss={k: v.detach().clone() for k, v in run.loss_fn.state_dict().items()},
            scaler=copy.deepcopy(run.scaler.state_dict()), rng=rng_at_step,
            cuda_rng=cuda_rng_at_step, loop=loop, history=list(history))

    best_val, best_step, init_val = lp["best_val"], lp["best_step"], lp["init_val"]
    # Final validation when the last step was not validated (the best state may be the last).
    final_val = None
    # Not after Stop: the user wants it now, so the best state validated so far is kept.
    if run.val_tiles and reason not in ("diverged", "cancelled") and step % val_every != 0 \
            and step > 0:
        val = final_val = run.validate()
        if best_val is None or val > best_val:
            best_val, best_step = val, step
            best_state = state_copy()
    if run.val_tiles:
        run.net.load_state_dict(best_state)
    elif reason == "diverged":
        best_step = lp["last_good_step"]
    else:
        best_step = step
    if run.net is not work.model:  # SyncBatchNorm was swapped in: hand back the plain modules
        from napari_s2mnet.model import build_model

        plain = build_model(work.config)
        plain.load_state_dict(run.net.state_dict())
        run.net = plain.to(device)
    run.net.eval()
    elapsed = time.perf_counter() - t0

    work.model = run.net
    work.metadata = _result_metadata(parent_meta, parent, config, data, step, best_step,
                                     best_val, init_val, reason, elapsed, device, ctx)
    summary = _summary(reason, step, best_val, init_val, best_step, elapsed, data)
    yield report(step=step, epoch=max(0, (step - 1) // config.steps_per_epoch + 1),
                 total_steps=step, loss=float("nan"), val_dice=final_val, best_val_dice=best_val,
                 lr=0.0, elapsed=elapsed, message=summary)
    return FinetuneResult(bundle=work, history=history, best_val_dice=best_val,
                          stopped_reason=reason, initial_val_dice=init_val, steps=step,
                          best_step=best_step, elapsed=elapsed, message=summary,
                          resume=resumable)


def _summary(reason: str, steps: int, best: float | None, init: float | None, best_step: int,
             elapsed: float, data: _Data) -> str:
    text = f"{reason}: {steps} steps in {elapsed:.0f} s"
    if best is None:
        return text + f"; {data.split}"
    text += f"; validation Dice {init:.3f} -> {best:.3f} (best at step {best_step})"
    if best_step == 0 and steps > 0:
        text += "; fine-tuning did not improve on the starting model, which is kept"
    return text


def _result_metadata(
    parent_meta: dict[str, Any], parent: str, config: FinetuneConfig, data: _Data, steps: int,
    best_step: int, best_val: float | None, init_val: float | None, reason: str, elapsed: float,
    device: torch.device, ctx: DistContext,
) -> dict[str, Any]:
    meta = copy.deepcopy(parent_meta)
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    base = str(meta.get("name", "model")).removesuffix(" (untrained)")
    meta["name"] = base if base.endswith("(fine-tuned)") else f"{base} (fine-tuned)"
    meta["created"] = now
    meta["parent"] = parent
    entry = {
        "date": now,
        "steps": steps,
        "best_step": best_step,
        "loss": config.loss,
        "n_images": len(data.info),
        "n_objects": data.n_objects,
        "best_val_dice": best_val,
        "initial_val_dice": init_val,
        "validation": data.split,
        "stopped_reason": reason,
        "seconds": round(elapsed, 2),
        "device": str(device),
        "world_size": ctx.world_size,
        "parent": parent,
        "config": {k: v for k, v in asdict(config).items() if k not in ("device",)},
        "data": data.info,
    }
    meta["history"] = [*list(meta.get("history", []) or []), entry]
    meta["trained_on"] = int(sum(int(h.get("n_images", 0)) for h in meta["history"]))
    metrics = dict(meta.get("metrics", {}) or {})
    if best_val is not None:
        metrics["val_dice"] = best_val
    meta["metrics"] = metrics
    meta["data"] = data.info
    return meta


def train(
    pairs: Sequence[Any],
    model: ModelBundle,
    config: FinetuneConfig | None = None,
    callback: Callable[[TrainReport], Any] | None = None,
    **kwargs: Any,
) -> FinetuneResult:
    """Run :func:`finetune` to the end, calling ``callback(report)`` for every report.

    Extra keyword arguments (``control``, ``val_pairs``, ``names``) go to :func:`finetune`.
    """
    from napari_s2mnet.inference import run_to_end

    return run_to_end(finetune(pairs, model, config, **kwargs), callback)


# --------------------------------------------------------------------------------------------
# command line


_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")


def _expand(paths: Sequence[Path], what: str) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise ValueError(f"No {what} files ({', '.join(_IMAGE_SUFFIXES)}) in folder {p}.")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what.capitalize()} path {p} does not exist.")
    return files


def _read(path: Path, labels: bool) -> np.ndarray:
    try:
        from napari_s2mnet import io as s2io
    except ImportError:  # pragma: no cover - io.py is written in parallel
        s2io = None
    if s2io is not None:
        return s2io.read_labels(path) if labels else s2io.read_image(path)
    if path.suffix.lower() == ".npy":  # pragma: no cover
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() in (".tif", ".tiff"):  # pragma: no cover
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio  # pragma: no cover

    return np.asarray(iio.imread(path))  # pragma: no cover


class _Progress:
    """A one-line progress bar on stderr (a line per validation when not a terminal)."""

    def __init__(self, stream: Any = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = 0.0

    def update(self, r: TrainReport) -> None:
        if r.message and (r.step == 0 or "restored" in r.message or "diverged" in r.message
                          or "skipped" in r.message):
            self._line(r.message)
        total = r.total_steps or max(r.step, 1)
        frac = min(1.0, r.step / total) if total else 0.0
        fill = int(frac * self.width)
        bar = "#" * fill + "-" * (self.width - fill)
        val = f" val {r.best_val_dice:.3f}" if r.best_val_dice is not None else ""
        loss = f" loss {r.loss:.4f}" if math.isfinite(r.loss) else ""
        text = f"[{bar}] {r.step}/{total}{loss}{val} lr {r.lr:.1e} {r.elapsed:.0f}s"
        if self.tty:
            self.stream.write("\r" + text.ljust(90))
            self.stream.flush()
        elif r.val_dice is not None or time.perf_counter() - self.last > 30:
            self._line(text)

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 90 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last = time.perf_counter()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def train_paths(
    images: Sequence[Path],
    labels: Sequence[Path],
    output: Path,
    *,
    model_path: Path | None = None,
    arch: str | None = None,
    epochs: int | None = None,
    seconds: float | None = None,
    loss: str | None = None,
    device: str = "auto",
    seed: int | None = None,
    num_classes: int | None = None,
    batch_size: int | None = None,
    crop_size: int | None = None,
    lr: float | None = None,
    val_fraction: float | None = None,
    allow_empty: bool = False,
    stream: Any = None,
) -> int:
    """Train or fine-tune from image/label files and save the model (the ``train`` command).

    Images and labels (files or folders) are paired in sorted order. ``model_path`` ``None``
    starts from the bundled model, ``"new"`` from a random initialisation of ``arch``
    (default ``"s2mnet"``; input channels taken from the images). Ctrl-C stops training and
    saves the best state so far. Under ``torchrun`` only rank 0 prints and saves.

    Returns:
        0 on success, 1 when training diverged (the last good state is still saved).
    """
    import signal

    from napari_s2mnet import _ddp
    from napari_s2mnet.checkpoint import load_default_model, load_model, new_model, save_model
    from napari_s2mnet.model.registry import ModelConfig

    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"The output must be a .safetensors file, got {out.name!r}.")
    if not out.parent.exists():
        raise FileNotFoundError(f"Output folder {out.parent} does not exist; create it first.")
    img_files = _expand(images, "image")
    lab_files = _expand(labels, "label")
    if len(img_files) != len(lab_files):
        raise ValueError(
            f"Found {len(img_files)} image file(s) but {len(lab_files)} label file(s); they are "
            "paired in sorted order, so give the same number of each (first images: "
            f"{[f.name for f in img_files[:3]]}, first labels: {[f.name for f in lab_files[:3]]})."
        )
    pairs = []
    for fi, fl in zip(img_files, lab_files, strict=True):
        pairs.append((_read(fi, labels=False), _read(fl, labels=True), fi.name))

    if model_path is not None and str(model_path).lower() == "new":
        img0, lab0 = np.asarray(pairs[0][0]), np.asarray(pairs[0][1])
        lay = _layout_for(img0, lab0, None, None, pairs[0][2])
        # RGB(A) -> 3 channels (alpha is dropped); another channel axis -> its length; else gray.
        c = 3 if lay.rgb else 1 if lay.channel_axis is None else int(img0.shape[lay.channel_axis])
        bundle = new_model(ModelConfig(arch=arch or "s2mnet", in_channels=c,
                                       num_classes=num_classes or 1))
    else:
        if arch is not None:
            raise ValueError("--arch only applies to a new model (--model new).")
        bundle = load_model(model_path) if model_path is not None else load_default_model()
        if num_classes is not None and num_classes != bundle.config.num_classes:
            raise ValueError(f"The model has {bundle.config.num_classes} classes, not "
                             f"{num_classes}; start a new model (--model new) to change it.")

    cfg = FinetuneConfig(epochs=epochs, seconds=seconds, device=device, allow_empty=allow_empty)
    overrides = {"loss": loss, "seed": seed, "batch_size": batch_size, "crop_size": crop_size,
                 "lr": lr, "val_fraction": val_fraction}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    ctx = _ddp.init_from_env(_resolve(device).type)
    main = ctx.is_main
    control = FinetuneControl()
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigint(signum: int, frame: Any) -> None:
            control.stop()
            signal.signal(signal.SIGINT, previous or signal.SIG_DFL)  # a second Ctrl-C kills

        previous = signal.signal(signal.SIGINT, _on_sigint)
    bar = _Progress(stream) if main else None
    try:
        result = train(pairs, bundle, cfg, callback=bar.update if bar else None, control=control,
                       names=[p[2] for p in pairs])
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if bar:
            bar.close()
    if main:
        save_model(result.bundle, out)
        s = stream or sys.stderr
        best = f"{result.best_val_dice:.3f}" if result.best_val_dice is not None else "n/a"
        s.write(f"{result.message}\nsteps: {result.steps}  best validation Dice: {best}  "
                f"time: {result.elapsed:.1f} s\nsaved: {out}\n")
        s.flush()
    ctx.barrier()
    _ddp.cleanup(ctx)
    return 1 if result.stopped_reason == "diverged" else 0
