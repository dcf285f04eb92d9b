"""The training run: :func:`finetune` (a generator of progress reports) and :func:`train`.

``finetune(pairs, model, config)`` trains a *copy* of ``model`` on in-memory (image, labels)
pairs and yields a :class:`TrainReport` after every optimisation step (often enough for a live
plot). Its return value (``StopIteration.value``; napari's ``thread_worker`` emits it as
``returned``) is a :class:`FinetuneResult` holding the best state seen.

Stopping: :meth:`FinetuneControl.stop` (from any thread) ends the run at the next step and the
generator still *returns* the best state so far (``stopped_reason="cancelled"``);
``generator.close()`` abandons the run and returns nothing. The input bundle is never modified.

Optimisation follows the paper's recipe (methods.md §1.8): Adam, linear learning-rate warm-up then
cosine decay, gradient clipping at global norm 1.0, L2 weight decay on conv/linear weights, the
loss's learnable weights (MASL) in the optimiser without decay and clamped after every step. A
guard restores the last good state and halves the learning rate after a non-finite or exploding
loss, and stops with ``"diverged"`` after repeated failures.

The same code runs data-parallel under ``torchrun`` (see :mod:`napari_s2mnet._ddp`).

:class:`_Run` holds the network, loss, optimiser and sampler of a run (one step's mechanics);
:class:`_Finetune` drives it, its loop state a :class:`LoopState`.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.checkpoint import ModelBundle
from napari_s2mnet.training.config import (
    FinetuneConfig,
    FinetuneControl,
    FinetuneResult,
    LoopState,
    ResumeState,
    TrainReport,
    _check_resume,
    _Interrupter,
    _StopNow,
)
from napari_s2mnet.training.data import _fingerprint, _prepare_data
from napari_s2mnet.training.metrics import (
    _dice_from_stats,
    _dice_stats,
    _predict_classes,
)
from napari_s2mnet.training.region import unfreeze
from napari_s2mnet.training.step import _Run
from napari_s2mnet.training.summary import _result_metadata, _summary

if TYPE_CHECKING:  # pragma: no cover
    import torch


__all__ = ["finetune", "train", "warm_up"]

_SNAPSHOT_EVERY = 10  # steps between "last good state" snapshots
_WORSE = 0.005  # Dice drop on the corrected regions that counts as worse
# Dice drop around them (on uncorrected pixels) that counts as broken. Measured: fine-tunes on
# two corrections that were not worse on the test images lowered it by 0.11-0.24 (whole-image
# batch-norm statistics), one that learnt "background everywhere" by 0.64 (docs/benchmarks.md).
_CONTEXT_DROP = 0.3


def warm_up() -> None:
    """Import what the first fine-tuning step needs (torch.optim pulls in torch._dynamo, several
    seconds on a laptop CPU; the losses). The Fine-tune widget calls it in the background when
    it opens, so pressing Run shows a loss point within seconds.

    Never raises: a warm-up that fails (or is cut off when napari quits mid-import) only means
    the first Run imports these itself, so it must not print a traceback at exit."""
    try:
        import torch

        from napari_s2mnet.losses import build_loss  # noqa: F401

        torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    except Exception:  # see the docstring
        return


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


def _resolve(device: str) -> torch.device:
    from napari_s2mnet.devices import resolve_device

    return resolve_device(device)


class _Finetune:
    """One run of :func:`finetune`, driven by it: ``start``, ``step`` until :attr:`reason` is
    set, ``finish``. Everything carried from step to step lives in :attr:`state`
    (:class:`LoopState`), which is what a resumed run takes over.
    """

    def __init__(
        self,
        pairs: Sequence[Any],
        model: ModelBundle,
        config: FinetuneConfig | None,
        control: FinetuneControl | threading.Event | None,
        val_pairs: Sequence[Any] | None,
        names: Sequence[str] | None,
        resume: ResumeState | None,
        corrected: Sequence[Any] | None = None,
    ) -> None:
        import torch

        from napari_s2mnet import _ddp
        from napari_s2mnet.checkpoint import model_hash

        if not isinstance(model, ModelBundle):
            raise TypeError(
                f"model must be a ModelBundle (see checkpoint.load_model / "
                f"new_model), got {type(model).__name__}."
            )
        config = copy.deepcopy(
            config
            if config is not None
            else (resume.config if isinstance(resume, ResumeState) else FinetuneConfig())
        )
        config.validate()
        device = _resolve(config.device)
        ctx = _ddp.init_from_env(device.type)
        if ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        if resume is not None and ctx.enabled:
            raise ValueError(
                "resume is not supported in data-parallel runs; continue on one "
                "process or start a new run from the saved model."
            )
        data = _prepare_data(pairs, model, config, names, val_pairs, corrected)
        self.key = _fingerprint(data) if resume is not None else ""
        if resume is not None:
            config = _check_resume(resume, model, config, self.key)
        self.model = model  # the caller's: never modified
        self.config, self.device, self.ctx, self.data, self.control = (
            config,
            device,
            ctx,
            data,
            control,
        )
        self.parent = resume.parent if resume is not None else model_hash(model)
        self.parent_meta = resume.parent_metadata if resume is not None else model.metadata
        self.work = ModelBundle(
            model=copy.deepcopy(model.model),
            config=copy.deepcopy(model.config),
            normalization=copy.deepcopy(model.normalization),
            metadata=copy.deepcopy(model.metadata),
        )
        self.run = _Run(self.work, data, config, device, ctx)
        self.total = config.total_steps
        self.val_every = config.val_every or config.steps_per_epoch
        self.history: list[TrainReport] = list(resume.history) if resume is not None else []
        self.resumed = resume is not None
        if resume is None:
            self.state = LoopState(last_good=self.run.snapshot())
        else:
            self.run.restore(
                {
                    "model": resume.net,
                    "opt": resume.optimizer,
                    "loss": resume.loss,
                    "scaler": resume.scaler,
                }
            )
            torch.set_rng_state(resume.rng)
            if resume.cuda_rng is not None and device.type == "cuda":
                torch.cuda.set_rng_state(resume.cuda_rng, device)
            self.state = copy.deepcopy(resume.loop)  # a copy: the state can be resumed again
        self.t0 = time.perf_counter() - (resume.elapsed if resume is not None else 0.0)
        self.reason: str | None = None  # why the run ends, once it does
        self.publishing = isinstance(control, FinetuneControl) and not ctx.enabled
        self.stop_flag = torch.zeros(
            3, dtype=torch.float64, device=device if ctx.enabled else "cpu"
        )
        # Stop within one layer of the forward pass, not at the end of the step: hooks raise
        # _StopNow (one process only: a rank leaving a collective early would hang the others).
        self.interrupter = (
            _Interrupter(self.run.net, control) if control is not None and not ctx.enabled else None
        )
        # Where a resumed run picks up: random streams and buffers as of this step's start.
        self.rng_at_step = torch.get_rng_state()
        self.cuda_rng_at_step = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.buffers_at_step: dict[str, Any] = {}
        self.in_step = False
        self.kept_why = ""  # why finish() put the starting model back

    # -- helpers

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def report(self, **kw: Any) -> TrainReport:
        r = TrainReport(**kw)
        self.history.append(r)
        return r

    def weights(self) -> dict[str, Any]:
        """A copy of the network's current weights (and buffers)."""
        return {k: v.detach().clone() for k, v in self.run.net.state_dict().items()}

    def stop_asked(self) -> bool:
        c = self.control
        if c is None:
            return False
        return c.is_set() if isinstance(c, threading.Event) else c.stop_requested

    def publish(self, weights: dict[str, Any], at_step: int) -> None:
        """Let :meth:`FinetuneControl.stop_now` hand ``weights`` out without waiting for us."""
        if not self.publishing:
            return
        s = self.state
        snap = (weights, at_step, s.best_val, s.init_val, self.elapsed(), s.step)

        def make() -> FinetuneResult:
            weights, best_step, best_val, init_val, elapsed, steps = snap
            net = copy.deepcopy(self.model.model)  # the caller's model: never touched by the run
            net.load_state_dict(weights)
            net.to(self.device).eval()
            meta = _result_metadata(
                self.parent_meta,
                self.parent,
                self.config,
                self.data,
                steps,
                best_step,
                best_val,
                init_val,
                "cancelled",
                elapsed,
                self.device,
                self.ctx,
            )
            bundle = ModelBundle(
                model=net,
                config=copy.deepcopy(self.model.config),
                normalization=copy.deepcopy(self.model.normalization),
                metadata=meta,
            )
            summary = _summary(
                "cancelled", steps, best_val, init_val, best_step, elapsed, self.data
            )
            return FinetuneResult(
                bundle=bundle,
                history=list(self.history),
                best_val_dice=best_val,
                stopped_reason="cancelled",
                initial_val_dice=init_val,
                steps=steps,
                best_step=best_step,
                elapsed=elapsed,
                message=summary,
            )

        self.control._publish(make)

    # -- the run

    def start(self) -> TrainReport:
        """Validate the starting model (or redo a validation a stop interrupted); first report."""
        s, cfg = self.state, self.config
        if not self.resumed:
            s.init_val = s.best_val = self.run.validate()
            s.corrected_before, s.context_before = self.run.corrected_scores()
            s.best_state = self.weights()
            mode_text = f"data-parallel x{self.ctx.world_size}, " if self.ctx.enabled else ""
            msg = (
                f"training on {len(self.data.info)} image(s) with {self.data.n_objects} "
                f"objects, {cfg.budget_text()}, {mode_text}device {self.device}; "
                f"{self.data.split}"
            )
            if s.init_val is not None:
                msg += f"; starting validation Dice {s.init_val:.3f}"
            if s.corrected_before is not None:
                msg += f"; starting Dice on the corrected regions {s.corrected_before:.3f}"
        else:
            msg = f"resuming at step {s.step} ({cfg.budget_text()}, device {self.device})"
            if s.pending_val:  # the stopped run was interrupted in this validation
                self.validate()
        return self.report(
            step=s.step,
            epoch=cfg.epoch_of(s.step),
            total_steps=self.total,
            loss=float("nan"),
            val_dice=s.init_val,
            best_val_dice=s.best_val,
            lr=0.0,
            elapsed=self.elapsed(),
            message=msg,
        )

    def _limit(self, elapsed: float) -> str | None:
        """Why the run ends before the next step (budget, stop request), or ``None``."""
        cfg, ctx = self.config, self.ctx
        # One all-reduce per step keeps every rank's decisions identical.
        want_stop = 1.0 if self.stop_asked() else 0.0
        time_up = cfg.seconds is not None and elapsed >= cfg.seconds
        if self.total is not None and self.state.step >= self.total:
            return "completed"
        if ctx.enabled:
            flag = self.stop_flag
            flag.zero_()
            flag[0], flag[1] = want_stop, float(time_up)
            ctx.all_reduce_sum(flag)
            want_stop, time_up = float(flag[0]) > 0, float(flag[1]) > 0
        if want_stop:
            return "cancelled"
        if time_up:
            return "time budget"
        return None

    def _lr(self, elapsed: float) -> float:
        """The scheduled learning rate of this step (times the recoveries' scale), applied."""
        cfg = self.config
        progress = elapsed / cfg.seconds if cfg.seconds is not None else 0.0
        if self.total is not None and cfg.seconds is not None:
            progress = 0.0  # both budgets: the step schedule rules, time only cuts short
        factor = _lr_factor(
            progress, self.state.step, cfg.warmup_fraction, self.total, cfg.min_lr / cfg.lr
        )
        lr = cfg.lr * factor * self.state.lr_scale
        self.run.set_lr(lr)
        return lr

    def _agree(self, loss_value: float) -> tuple[float, bool]:
        """Mean loss over ranks and whether the step is bad (non-finite on any rank)."""
        import torch

        bad_local = 0.0 if math.isfinite(loss_value) else 1.0
        if not self.ctx.enabled:
            return loss_value, bad_local > 0
        agg = torch.tensor(
            [loss_value if bad_local == 0 else 0.0, bad_local, 1.0],
            dtype=torch.float64,
            device=self.device,
        )
        self.ctx.all_reduce_sum(agg)
        bad = float(agg[1]) > 0
        return (float(agg[0]) / self.ctx.world_size if not bad else float("nan")), bad

    def step(self) -> TrainReport | None:
        """One optimisation step (with its validation when due) and its report; ``None``, with
        :attr:`reason` set, when the budget or a stop request ends the run first."""
        import torch

        s, cfg, run = self.state, self.config, self.run
        elapsed = self.elapsed()
        self.rng_at_step = torch.get_rng_state()
        if self.device.type == "cuda":
            self.cuda_rng_at_step = torch.cuda.get_rng_state(self.device)
        self.reason = self._limit(elapsed)
        if self.reason is not None:
            return None
        lr = self._lr(elapsed)
        if self.interrupter is not None:  # a stop inside the forward pass must not leave
            # BatchNorm statistics of a step that never happened
            self.buffers_at_step = {k: b.detach().clone() for k, b in run.net.named_buffers()}
        self.in_step = True
        x, y, w = run.batch_weighted(s.step)
        loss, logits = run.forward_loss(x, y, w)
        loss_mean, bad = self._agree(float(loss.detach()))
        exploding = (
            not bad
            and len(s.good_losses) >= 10
            and loss_mean > cfg.divergence_factor * float(np.median(s.good_losses))
        )
        message = ""
        if not bad and not exploding:
            run.backward(loss)
            grad_norm = run.clip_and_step()
            if not math.isfinite(grad_norm) and not run.amp:
                bad = True  # non-finite gradients: the weights may already be damaged
        if exploding:
            s.exploding_run += 1
            if s.exploding_run >= 3:
                bad = True
                message = (
                    f"loss exploded ({loss_mean:.3g} > {cfg.divergence_factor:g} x the "
                    "running median for 3 steps)"
                )
            else:
                message = f"skipped an outlier step (loss {loss_mean:.3g})"
        else:
            s.exploding_run = 0
        s.step += 1
        self.in_step = False

        if bad:
            message = self.recover(
                message
                or ("non-finite loss" if not math.isfinite(loss_mean) else "non-finite gradients")
            )
            if self.reason == "diverged":
                return self.report(
                    step=s.step,
                    epoch=cfg.epoch_of(s.step),
                    total_steps=self.total,
                    loss=loss_mean,
                    lr=lr,
                    elapsed=self.elapsed(),
                    best_val_dice=s.best_val,
                    message=message,
                )
        else:
            if not exploding:
                s.good_losses.append(loss_mean)
                if not run.val_tiles:  # without validation the result is the last state
                    self.publish(self.weights(), s.step)
            if s.step % _SNAPSHOT_EVERY == 0:
                s.last_good = run.snapshot()
                s.last_good_step = s.step

        train_dice = None
        if not bad:
            pred = _predict_classes(logits.float(), run.num_classes, run.threshold)
            tgt = y[:, 0].round().to(pred.dtype) if run.num_classes == 1 else y
            train_dice = _dice_from_stats(_dice_stats(pred.long(), tgt.long(), run.num_classes))
        val = None
        if run.val_tiles and s.step % self.val_every == 0 and not bad:
            val = self.validate()
        elapsed = self.elapsed()
        est_total = self.total
        if est_total is None and cfg.seconds is not None and elapsed > 0:
            est_total = max(s.step, round(s.step * cfg.seconds / elapsed))
        if val is not None and cfg.patience is not None and s.since_best >= cfg.patience:
            self.reason = "early stopping"  # after this report
        return self.report(
            step=s.step,
            epoch=cfg.epoch_of(s.step),
            total_steps=est_total,
            loss=loss_mean,
            components=run.components(),
            train_dice=train_dice,
            val_dice=val,
            best_val_dice=s.best_val,
            lr=lr,
            elapsed=elapsed,
            message=message,
        )

    def validate(self) -> float | None:
        """Validate now; keep the best state; count validations without improvement."""
        s = self.state
        s.pending_val = True
        val = self.run.validate()
        s.pending_val = False
        if s.best_val is None or val > s.best_val:
            improved = s.best_val is None or val >= s.best_val + self.config.min_delta
            s.best_val, s.best_step = val, s.step
            s.best_state = self.weights()
            s.since_best = 0 if improved else s.since_best + 1
            self.publish(s.best_state, s.step)
        else:
            s.since_best += 1
        return val

    def recover(self, what: str) -> str:
        """After a bad step: restore the last good state and halve the learning rate, or stop
        (:attr:`reason` ``"diverged"``) after too many recoveries. Returns the message."""
        s, cfg = self.state, self.config
        s.recoveries += 1
        s.exploding_run = 0
        self.run.restore(s.last_good)
        if s.recoveries > cfg.max_recoveries:
            self.reason = "diverged"
            return (
                f"{what} at step {s.step}; training diverged after {cfg.max_recoveries} "
                f"recoveries: stopping and keeping the last good state (step "
                f"{s.last_good_step})."
            )
        s.lr_scale *= 0.5
        if not self.run.val_tiles:
            self.publish(self.weights(), s.last_good_step)
        return (
            f"{what} at step {s.step}: restored the last good state (step "
            f"{s.last_good_step}) and halved the learning rate to "
            f"{cfg.lr * s.lr_scale:.2e}"
        )

    def drop_step(self) -> None:
        """A stop inside the forward pass: the optimiser has not applied this step; undo its
        BatchNorm statistics too."""
        self.reason = "cancelled"
        self.run.opt.zero_grad(set_to_none=True)
        if self.in_step and self.buffers_at_step:
            for name, buf in self.run.net.named_buffers():
                buf.copy_(self.buffers_at_step[name])

    def detach(self) -> None:
        """Remove the stop hooks and the published result (the returned model carries none)."""
        if self.interrupter is not None:
            self.interrupter.remove()
        if self.publishing:
            self.control._publish(None)

    def resume_state(self) -> ResumeState:
        """What continuing this run needs (after Stop or the time budget)."""
        s = self.state
        snap = self.run.snapshot()
        # Not copied: nothing later mutates the snapshots or the best state (they are replaced
        # by fresh copies), and a resumed run deep-copies them in turn.
        loop = replace(s, good_losses=deque(s.good_losses, maxlen=s.good_losses.maxlen))
        return ResumeState(
            config=copy.deepcopy(self.config),
            model_config=self.model.config.to_dict(),
            data_key=self.key or _fingerprint(self.data),
            parent=self.parent,
            parent_metadata=self.parent_meta,
            step=s.step,
            elapsed=self.elapsed(),
            net=snap["model"],
            optimizer=snap["opt"],
            loss=snap["loss"],
            scaler=snap["scaler"],
            rng=self.rng_at_step,
            cuda_rng=self.cuda_rng_at_step,
            loop=loop,
            history=list(self.history),
        )

    def _check_corrected(self, best_step: int) -> tuple[float | None, bool]:
        """Dice of the state about to be returned on the corrected regions, and whether the
        starting model is put back because that state is worse there (never worse by
        surprise). With held-out corrected regions, validation already chose the state."""
        s, run = self.state, self.run
        if s.corrected_before is None or best_step == 0:
            return s.corrected_before, False
        after, context = run.corrected_scores()
        run.net.eval()
        # Around the corrections the labels are the model's own output, left as they were: a
        # model that learned "background everywhere" from deletions breaks them there.
        broke_context = (
            context is not None
            and s.context_before is not None
            and context < s.context_before - _CONTEXT_DROP
        )
        worse = not run.val_tiles and after is not None and after < s.corrected_before - _WORSE
        if not (worse or broke_context):
            return after, False
        run.net.load_state_dict(self.model.model.state_dict())
        why = (
            f"it changed the labels around your corrections that you left as they were "
            f"(Dice there {s.context_before:.2f} -> {context:.2f})"
            if broke_context
            else "it was worse on the corrected regions"
        )
        self.kept_why = (
            f"its Dice on the corrected regions {after:.2f}, but "
            if after is not None and broke_context
            else ""
        ) + why
        return s.corrected_before, True

    def finish(self) -> tuple[TrainReport, FinetuneResult]:
        """The final validation when due, the best state loaded, metadata; the last report and
        the result."""
        s, cfg, run = self.state, self.config, self.run
        reason = self.reason or "completed"
        if s.best_state is None:  # stopped during the first validation
            s.best_state = self.weights()
        resumable = None
        if reason in ("cancelled", "time budget") and s.step > 0 and not self.ctx.enabled:
            resumable = self.resume_state()
        best_val, best_step, best_state = s.best_val, s.best_step, s.best_state
        # Final validation when the last step was not validated (the best state may be the
        # last). Not after Stop: the user wants it now, so the best validated state is kept.
        final_val = None
        if (
            run.val_tiles
            and reason not in ("diverged", "cancelled")
            and s.step % self.val_every != 0
            and s.step > 0
        ):
            val = final_val = run.validate()
            if best_val is None or val > best_val:
                best_val, best_step = val, s.step
                best_state = self.weights()
        if run.val_tiles:
            run.net.load_state_dict(best_state)
        elif reason == "diverged":
            best_step = s.last_good_step
        else:
            best_step = s.step
        unfreeze(run.net)
        if cfg.recalibrate_batchnorm and best_step > 0:
            run.recalibrate_batchnorm()
        after, kept = self._check_corrected(best_step)
        chosen_step = best_step  # what validation chose, for the summary
        if kept:
            best_step = 0
        if run.net is not self.work.model:  # SyncBatchNorm was swapped in: plain modules back
            from napari_s2mnet.model import build_model

            plain = build_model(self.work.config)
            plain.load_state_dict(run.net.state_dict())
            run.net = plain.to(self.device)
        run.net.eval()
        elapsed = self.elapsed()
        self.work.model = run.net
        self.work.metadata = _result_metadata(
            self.parent_meta,
            self.parent,
            cfg,
            self.data,
            s.step,
            best_step,
            best_val,
            s.init_val,
            reason,
            elapsed,
            self.device,
            self.ctx,
        )
        summary = _summary(reason, s.step, best_val, s.init_val, chosen_step, elapsed, self.data)
        if s.corrected_before is not None and after is not None:
            summary += f"; Dice on the corrected regions {s.corrected_before:.3f} -> {after:.3f}"
            if kept:
                summary += (
                    f"; the starting model is kept: the fine-tuned one was not better "
                    f"({self.kept_why})"
                )
        last = self.report(
            step=s.step,
            epoch=cfg.epoch_of(s.step),
            total_steps=s.step,
            loss=float("nan"),
            val_dice=final_val,
            best_val_dice=best_val,
            lr=0.0,
            elapsed=elapsed,
            message=summary,
        )
        return last, FinetuneResult(
            bundle=self.work,
            history=self.history,
            best_val_dice=best_val,
            stopped_reason=reason,
            initial_val_dice=s.init_val,
            steps=s.step,
            best_step=best_step,
            elapsed=elapsed,
            message=summary,
            resume=resumable,
            corrected_before=s.corrected_before,
            corrected_after=after,
            kept_previous=kept or (best_step == 0 and s.step > 0),
        )


def finetune(
    pairs: Sequence[Any],
    model: ModelBundle,
    config: FinetuneConfig | None = None,
    *,
    control: FinetuneControl | threading.Event | None = None,
    val_pairs: Sequence[Any] | None = None,
    names: Sequence[str] | None = None,
    resume: ResumeState | None = None,
    corrected: Sequence[Any] | None = None,
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
        corrected: Learning from corrections: one mask per pair (bool, the labels' shape) of
            the pixels the user painted, filled or erased, or ``None`` for a pair whose labels
            are all checked. Crops are centred on corrected pixels, the loss counts there
            (``config.uncorrected_weight`` elsewhere), validation holds out corrected regions
            (when there are enough), and a state that scores worse on them than the starting
            model is not returned (see :mod:`napari_s2mnet.training.region`).

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
    job = _Finetune(pairs, model, config, control, val_pairs, names, resume, corrected)
    if isinstance(control, FinetuneControl):
        control._begin_run()  # reused after an earlier run: forget that run's stop
    try:
        yield job.start()
        while (report := job.step()) is not None:
            yield report
            if job.reason is not None:  # diverged, early stopping
                break
    except _StopNow:
        job.drop_step()
    finally:
        job.detach()
        if isinstance(control, FinetuneControl):
            control._end_run()
    last, result = job.finish()
    yield last
    return result


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
