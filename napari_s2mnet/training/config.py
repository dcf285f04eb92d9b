"""Settings, reports and results of a fine-tuning run (torch-free: the widgets import them).

:class:`FinetuneConfig` is the single source of the widget's defaults; :class:`TrainReport` is
yielded after every step; :class:`FinetuneResult` is what a run returns, with a
:class:`ResumeState` when it can be continued; :class:`FinetuneControl` stops a run from any
thread.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from napari_s2mnet.checkpoint import ModelBundle

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "DEFAULT_EPOCHS",
    "SCOPES",
    "FinetuneConfig",
    "FinetuneControl",
    "FinetuneResult",
    "LoopState",
    "ResumeState",
    "TrainReport",
]

DEFAULT_EPOCHS = 30
SCOPES = ("all", "decoder+head", "head+norm")
# Interactive (correct-and-fine-tune) presets, chosen from benchmarks/hitl_annotator.py and the
# per-step cost of each scope (docs/benchmarks.md): see FinetuneConfig.interactive. The CPU
# trains decoder+head (2.2x cheaper steps, the best F1 at k = 5 with the instance-head model)
# at lr 1e-3 (three unseen sets x 3 seeds: larger lifts at k = 5 than 3e-4 on every set, no k
# below zero-shot); the GPU preset does the same ~210 steps (not measured on a GPU). Neither holds
# corrections out for validation: with 5, 10, 20 or every corrected object of the annotator's
# pool, best-state selection on the held-out few picked early states and lowered instance F1
# against training to the end on all corrections (docs/benchmarks.md, "Validation in a 60-s
# fine-tune"); the final state is checked on the corrected regions and their surroundings
# instead (never worse by surprise). ``val_fraction`` > 0 turns validation back on.
INTERACTIVE_CPU: dict[str, Any] = {
    "seconds": 60.0,
    "epochs": None,
    "crop_size": 128,
    "batch_size": 2,
    "lr": 1e-3,
    "scope": "decoder+head",
    "warmup_fraction": 0.05,
    "val_fraction": 0.0,
    # Batch-norm statistics of the returned model from the user's whole images, not from the
    # last training crops (three sets: same lifts at k = 5, far less spread at k = 1-2).
    "recalibrate_batchnorm": True,
}
# The GPU preset is the CPU preset's optimisation run to the step count the CPU preset was
# measured at (201-229 steps in 60 s, docs/benchmarks.md), which a GPU reaches in seconds: more
# steps on five corrections did not lift more (decoder+head, ~415 steps), and with all weights at
# lr 3e-4 (this preset until 2026-12-06) ~400 steps lowered Dice below the 200-step result and, at
# k = 2, below zero-shot. The step schedule rules; the 60 s only cut a slow GPU short.
INTERACTIVE_GPU: dict[str, Any] = dict(INTERACTIVE_CPU, epochs=21)


def _is_gpu(device: str) -> bool:
    """Whether ``device`` names (or ``"auto"`` resolves to) a GPU; no torch import for "cpu"."""
    if device == "cpu":
        return False
    if device != "auto":
        return True
    from napari_s2mnet.devices import resolve_device

    return resolve_device("auto").type != "cpu"


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
        recalibrate_batchnorm: After training, recompute the batch-norm running statistics of
            the returned state from the training images as inference sees them (whole-image
            tiles, no augmentation) instead of keeping the running average of the last
            training crops. The interactive presets turn it on: with crops centred on one or
            two corrections those statistics are a few augmented crops of one neighbourhood,
            and they changed the labels elsewhere by several Dice points from seed to seed
            (docs/benchmarks.md, "Batch-norm statistics after a fine-tune").
        sync_batchnorm: Use ``SyncBatchNorm`` in data-parallel CUDA runs.
        max_recoveries: Divergence recoveries (restore + halve the learning rate) before the
            run stops with ``"diverged"``.
        divergence_factor: A loss above this multiple of the running median counts as exploding.
        scope: Which weights train: ``"all"``, ``"decoder+head"`` (the encoder is frozen: a
            cheaper backward pass) or ``"head+norm"`` (the output head and every normalisation
            layer's scale and shift).
        uncorrected_weight: With ``corrected`` masks (see :func:`finetune`): weight of the mean
            loss over the pixels outside the corrected regions (the model's own, unchecked
            output) against 1 for the mean loss over the corrected pixels: with the default 1 a
            small correction counts as much as the rest of the crop (measured against 3 with
            three annotator sets x three seeds, docs/benchmarks.md). ``0`` ignores the rest,
            which lets deletions alone teach "background everywhere" (docs/methods.md).
        diameter: Typical object diameter in pixels in these images (``None``: taken as the
            model's training diameter, i.e. no rescaling). Images are rescaled by
            ``model diameter / diameter`` so objects reach the network at the size it was
            trained on (as :class:`~napari_s2mnet.inference.InferenceConfig` does).
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
    recalibrate_batchnorm: bool = False
    sync_batchnorm: bool = False
    max_recoveries: int = 3
    divergence_factor: float = 10.0
    scope: str = "all"
    uncorrected_weight: float = 1.0
    diameter: float | None = None

    @classmethod
    def interactive(cls, device: str = "auto", **overrides: Any) -> FinetuneConfig:
        """Defaults for correct-and-fine-tune in the viewer (measured, docs/benchmarks.md).

        A time budget instead of epochs, a higher learning rate, small crops and batches, so the
        first loss point comes within seconds; on a GPU the same run is capped at the ~210 steps
        it was measured at on the CPU. ``device`` is resolved to pick the CPU or the GPU preset.
        """
        gpu = _is_gpu(device)
        base: dict[str, Any] = dict(INTERACTIVE_GPU if gpu else INTERACTIVE_CPU)
        base["device"] = device
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Raise ``ValueError`` with an actionable message for out-of-range settings."""
        checks = [
            (
                self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1),
                f"epochs must be a positive integer or None, got {self.epochs!r}",
            ),
            (
                self.seconds is None or self.seconds > 0,
                f"seconds must be positive or None, got {self.seconds!r}",
            ),
            (
                self.steps_per_epoch >= 1,
                f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.crop_size >= 16, f"crop_size must be >= 16 pixels, got {self.crop_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}"),
            (
                0 <= self.warmup_fraction < 1,
                f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}",
            ),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.val_fraction < 0.9,
                f"val_fraction must be in [0, 0.9), got {self.val_fraction}",
            ),
            (
                self.val_every is None or self.val_every >= 1,
                f"val_every must be >= 1 or None, got {self.val_every}",
            ),
            (
                self.patience is None or self.patience >= 1,
                f"patience must be >= 1 or None, got {self.patience}",
            ),
            (
                0 <= self.foreground_fraction <= 1,
                f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}",
            ),
            (
                0 <= self.scale_jitter < 1,
                f"scale_jitter must be in [0, 1), got {self.scale_jitter}",
            ),
            (
                0 <= self.intensity_jitter < 1,
                f"intensity_jitter must be in [0, 1), got {self.intensity_jitter}",
            ),
            (self.max_recoveries >= 0, f"max_recoveries must be >= 0, got {self.max_recoveries}"),
            (
                self.divergence_factor > 1,
                f"divergence_factor must be > 1, got {self.divergence_factor}",
            ),
            (self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}"),
            (
                0 <= self.uncorrected_weight <= 10,
                f"uncorrected_weight must be in [0, 10], got {self.uncorrected_weight}",
            ),
            (
                self.diameter is None
                or (isinstance(self.diameter, int | float) and 2 <= self.diameter <= 2000),
                f"diameter must be a number of pixels in [2, 2000] or None (automatic), got "
                f"{self.diameter!r}",
            ),
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

    def epoch_of(self, step: int) -> int:
        """The (1-based) virtual epoch that step ``step`` belongs to; 0 for step 0 (the start)."""
        return (step - 1) // self.steps_per_epoch + 1


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
        corrected_before: Dice of the starting model on the corrected regions (all of them,
            trained on or held out), ``None`` without ``corrected`` masks.
        corrected_after: The same for the returned model.
        kept_previous: The returned model is the starting model, because the corrected data
            said the fine-tuned one was not better.
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
    corrected_before: float | None = None
    corrected_after: float | None = None
    kept_previous: bool = False


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
    loop: LoopState
    history: list[TrainReport]


@dataclass
class LoopState:
    """What the training loop carries from step to step (and a resumed run takes over).

    Attributes:
        step: Optimisation steps done.
        lr_scale: Factor on the scheduled learning rate (halved by every recovery).
        recoveries: Divergence recoveries so far.
        exploding_run: Consecutive steps whose loss was an outlier (skipped).
        good_losses: Recent finite, non-outlier losses (their median defines an outlier).
        last_good: Snapshot (weights, optimiser, loss, scaler) a recovery restores.
        last_good_step: Step of ``last_good``.
        init_val: Validation Dice of the starting model.
        best_val: Best validation Dice so far.
        best_step: Step of ``best_state``.
        best_state: Weights with the best validation Dice.
        since_best: Validations without an improvement of at least ``min_delta``.
        pending_val: A validation was under way (a stop inside it is redone on resume).
        corrected_before: Dice of the starting model on all corrected regions.
        context_before: Its Dice around them (uncorrected pixels of the scoring tiles).
    """

    step: int = 0
    lr_scale: float = 1.0
    recoveries: int = 0
    exploding_run: int = 0
    good_losses: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    last_good: dict[str, Any] | None = None
    last_good_step: int = 0
    init_val: float | None = None
    best_val: float | None = None
    best_step: int = 0
    best_state: dict[str, Any] | None = None
    since_best: int = 0
    pending_val: bool = False
    corrected_before: float | None = None
    context_before: float | None = None


def _check_resume(
    state: ResumeState, model: ModelBundle, config: FinetuneConfig | None, data_key: str
) -> FinetuneConfig:
    """The config to continue with; a clear error when the run cannot be continued as asked."""
    if not isinstance(state, ResumeState):
        raise TypeError(
            f"resume must be a ResumeState (FinetuneResult.resume), got {type(state).__name__}."
        )
    if model.config.to_dict() != state.model_config:
        raise ValueError(
            "resume: the model's architecture differs from the stopped run's; pass "
            "the bundle the run returned (FinetuneResult.bundle)."
        )
    if config is None:
        return copy.deepcopy(state.config)
    budget = ("epochs", "seconds")
    changed = [
        f.name
        for f in fields(FinetuneConfig)
        if f.name not in budget and getattr(config, f.name) != getattr(state.config, f.name)
    ]
    if changed:
        raise ValueError(
            f"resume: only the budget (epochs, seconds) may change when a run is "
            f"continued, but {', '.join(changed)} differ(s); start a new fine-tune "
            "from the returned model instead."
        )
    if data_key != state.data_key:
        raise ValueError(
            "resume: the training pairs differ from those of the stopped run "
            "(images, labels or validation split changed); start a new fine-tune "
            "from the returned model instead."
        )
    return copy.deepcopy(config)


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
        self._ended = False  # a run that used this control has finished

    def _begin_run(self) -> None:
        """Called when a run starts: a control whose earlier run has ended is reset, so a stop
        meant for that run does not end this one at step 0. (A stop requested before the first
        run still applies: that is Stop pressed before training began.)"""
        with self._lock:
            if self._ended:
                self._event.clear()
                self._make_result = None
                self._ended = False

    def _end_run(self) -> None:
        with self._lock:
            self._ended = True

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
