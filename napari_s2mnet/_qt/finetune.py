"""Fine-tune widget: train the active model on (image, corrected labels) pairs in the background."""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QWidget,
)
from superqt import QCollapsible

from napari_s2mnet._qt import _layers
from napari_s2mnet._qt._form import dataclass_form, form_values
from napari_s2mnet._qt._models import remember_model
from napari_s2mnet._qt._plot import LossPlot
from napari_s2mnet._qt._session import get_session
from napari_s2mnet._qt.dock import ProgressRow, scrolling_body
from napari_s2mnet.losses import LOSS_NAMES
from napari_s2mnet.training import DEFAULT_EPOCHS, FinetuneConfig
from napari_s2mnet.training.config import (
    SCOPES,
    FinetuneControl,
    FinetuneResult,
    ResumeState,
    TrainReport,
)

# A widget choice, not a config default: the value offered when the user switches the budget to
# seconds (FinetuneConfig has no time budget by default; its default is DEFAULT_EPOCHS epochs).
SECONDS_SUGGESTION = 60.0
ADVANCED_FIELDS = [
    "loss",
    "lr",
    "batch_size",
    "crop_size",
    "val_fraction",
    "uncorrected_weight",
    "seed",
    "allow_empty",
]
MAIN_FIELDS = ["scope", "diameter"]


def candidate_pairs(viewer: napari.viewer.Viewer) -> list[tuple[Image, Labels, bool]]:
    """(image, labels, checked-by-default) for every labels layer that has a matching image.

    A labels layer pairs with the image it was segmented from, else with the first image layer
    of the same spatial shape. Layers the user edited are checked by default.
    """
    images = [lyr for lyr in viewer.layers if isinstance(lyr, Image)]
    out = []
    for lab in viewer.layers:
        if not isinstance(lab, Labels):
            continue
        inf = _layers.info(lab)
        img = inf.source_layer()
        if img is None or img not in viewer.layers:
            img = next((im for im in images if _spatial_shape(im) == lab.data.shape), None)
        if img is not None:
            out.append((img, lab, inf.edited))
    return out


def _spatial_shape(image: Image) -> tuple[int, ...]:
    shape = tuple(image.data.shape)
    return shape[:-1] if image.rgb else shape


class FinetuneWidget(QWidget):
    """Dock widget: fine-tune on corrected labels with a live loss plot, Stop, Revert, Save."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.worker: Any = None
        self.control: FinetuneControl | None = None
        self.last_result: FinetuneResult | None = None
        self._resume: ResumeState | None = None  # the last run that stopped or ran out of time
        self._resume_pairs: list[tuple[Image, Labels]] = []
        self._resume_corrected: list[Any] | None = None
        self._stopped_early = False  # Stop already settled this run's model (stop_now)
        self._returned = False
        self._final_status = ""  # the status to show once the interrupted step has finished
        self._steps_seen = 0
        self._timed = False  # the running job has a time budget (its step total is an estimate)
        # Check marks the user set, per labels layer; the others follow "edited".
        self._user_checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._listed_edited: weakref.WeakSet = weakref.WeakSet()

        self.pairs = QListWidget()
        self.pairs.setMinimumHeight(48)
        self.pairs.setMaximumHeight(96)  # about four pairs; more scroll
        self.refresh_pairs = PushButton(text="Refresh")
        defaults = FinetuneConfig.interactive("cpu")  # the device is resolved at Run
        by_time = defaults.seconds is not None and defaults.epochs is None
        self.budget_mode = ComboBox(
            label="budget", choices=["seconds", "epochs"], value="seconds" if by_time else "epochs"
        )
        self.budget_value = FloatSpinBox(
            label="amount",
            min=1,
            max=100000,
            step=1,
            value=_budget_default(defaults, self.budget_mode.value),
        )
        self.advanced = dataclass_form(
            FinetuneConfig,
            ADVANCED_FIELDS,
            labels={"lr": "learning rate", "allow_empty": "use empty images as background"},
            options={
                "loss": {"choices": list(LOSS_NAMES)},
                "lr": {"min": 1e-6, "max": 1e-1, "step": 1e-5},
                "crop_size": {"min": 32, "max": 1024, "step": 32},
                "val_fraction": {"min": 0.0, "max": 0.5, "step": 0.05},
                "uncorrected_weight": {"min": 0.0, "max": 10.0, "step": 0.5},
            },
            tooltips={
                "uncorrected_weight": "loss weight of pixels you did not correct (the "
                "model's own output); 0 ignores them"
            },
        )
        self.main_form = dataclass_form(
            FinetuneConfig,
            MAIN_FIELDS,
            labels={"scope": "train", "diameter": "object diameter (px)"},
            options={
                "scope": {"choices": list(SCOPES)},
                "diameter": {"min": 2.0, "max": 2000.0, "step": 1.0},
            },
            placeholder={"diameter": 30.0},
            tooltips={
                "scope": "which weights learn: all; decoder+head (faster steps); "
                "head+norm (fastest, smallest change)",
                "diameter": "typical object diameter in pixels; auto = as the model was "
                "trained (no rescaling)",
            },
        )
        _set_form(self.advanced, defaults)
        _set_form(self.main_form, defaults)
        self.run_button = PushButton(text="Fine-tune")
        self.stop_button = PushButton(text="Stop (keep best)", enabled=False)
        self.continue_button = PushButton(
            text="Continue",
            enabled=False,
            tooltip="continue the last stopped or timed-out run where it ended, for the budget "
            "above (same pairs and settings)",
        )
        self.revert_button = PushButton(text="Revert model", enabled=False)
        self.save_button = PushButton(text="Save model...")
        self.progress = ProgressRow()
        self.plot = LossPlot()
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.status = QLabel("Correct labels with napari's paint tools, then fine-tune.")
        self.status.setWordWrap(True)

        collapsible = QCollapsible("Advanced")
        collapsible.addWidget(self.advanced.native)
        self.collapsible = collapsible

        def row(*widgets: Any) -> QWidget:
            box = Container(widgets=list(widgets), layout="horizontal", labels=False)
            box.margins = (0, 0, 0, 0)
            return box.native

        budget = Container(widgets=[self.budget_mode, self.budget_value], layout="horizontal")
        budget.margins = (0, 0, 0, 0)
        layout = scrolling_body(self)
        header = QHBoxLayout()
        header.addWidget(QLabel("Training pairs (image ↔ labels):"), 1)
        header.addWidget(self.refresh_pairs.native)
        layout.addLayout(header)
        layout.addWidget(self.pairs)
        layout.addWidget(budget.native)
        layout.addWidget(self.main_form.native)
        layout.addWidget(row(self.run_button, self.stop_button, self.continue_button))
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(row(self.revert_button, self.save_button))
        layout.addWidget(self.model_label)
        layout.addWidget(self.status)
        layout.addWidget(collapsible)
        layout.addStretch(1)

        self.refresh_pairs.changed.connect(self.update_pairs)
        self.budget_mode.changed.connect(
            lambda mode: setattr(
                self.budget_value, "value", _budget_default(FinetuneConfig(), mode)
            )
        )
        self.run_button.changed.connect(lambda: self.run())
        self.continue_button.changed.connect(lambda: self.run(resume=True))
        self.stop_button.changed.connect(self.stop)
        self.revert_button.changed.connect(self.revert)
        self.save_button.changed.connect(lambda: self.save_model())
        self.session.changed.connect(self._show_model)
        self.pairs.itemChanged.connect(self._item_changed)
        # Rebuild after a paint stroke once _layers has marked the layer edited (its handler
        # may run after ours), and once per burst of strokes.
        self._edit_timer = QTimer(self)
        self._edit_timer.setSingleShot(True)
        self._edit_timer.setInterval(0)
        self._edit_timer.timeout.connect(self._check_edited)
        self._layer_watch = _layers.LayerWatcher(
            napari_viewer.layers, self.update_pairs, per_layer={"paint": self._on_paint}
        )
        self.update_pairs()
        self._show_model()
        _warm_up_in_background()

    # -- pairs ---------------------------------------------------------------------------------
    def update_pairs(self, *_: Any) -> None:
        """Re-list the (image, labels) pairs: the user's check marks stay, the rest follow edits."""
        self.pairs.blockSignals(True)  # only the user's clicks count as choices
        try:
            self.pairs.clear()
            self._pair_objs: list[tuple[Image, Labels]] = []
            self._listed_edited = weakref.WeakSet(
                lyr
                for lyr in self.viewer.layers
                if isinstance(lyr, Labels) and _layers.info(lyr).edited
            )
            for img, lab, edited in candidate_pairs(self.viewer):
                item = QListWidgetItem(
                    f"{img.name}  ↔  {lab.name}" + ("  (edited)" if edited else "")
                )
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                checked = self._user_checks.get(lab, edited)
                item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
                self.pairs.addItem(item)
                self._pair_objs.append((img, lab))
        finally:
            self.pairs.blockSignals(False)

    def _item_changed(self, item: QListWidgetItem) -> None:
        row = self.pairs.row(item)
        if 0 <= row < len(self._pair_objs):
            self._user_checks[self._pair_objs[row][1]] = item.checkState() == Qt.CheckState.Checked

    def _on_paint(self, *_: Any) -> None:
        self._edit_timer.start()

    def _check_edited(self) -> None:
        """Re-list when a labels layer became edited since the list was built."""
        for lyr in self.viewer.layers:
            if (
                isinstance(lyr, Labels)
                and lyr not in self._listed_edited
                and _layers.info(lyr).edited
            ):
                self.update_pairs()
                return

    def _items(self) -> list[tuple[tuple[Image, Labels], QListWidgetItem]]:
        objs = getattr(self, "_pair_objs", [])
        return [(objs[i], self.pairs.item(i)) for i in range(min(len(objs), self.pairs.count()))]

    def set_checked(self, labels_layer: Labels, checked: bool = True) -> None:
        """Check or uncheck the pair of ``labels_layer`` (used by tests and scripts)."""
        for (_img, lab), item in self._items():
            if lab is labels_layer:
                item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)

    def selected_pairs(self) -> list[tuple[Image, Labels]]:
        """The checked (image, labels) pairs."""
        return [p for p, item in self._items() if item.checkState() == Qt.CheckState.Checked]

    # -- config and run ------------------------------------------------------------------------
    def config(self) -> FinetuneConfig:
        """The fine-tuning config the widget currently describes."""
        values = {**form_values(self.advanced), **form_values(self.main_form)}
        if self.budget_mode.value == "seconds":  # the GPU preset keeps its step cap
            values.update(seconds=float(self.budget_value.value))
        else:
            values.update(epochs=int(self.budget_value.value), seconds=None)
        return FinetuneConfig.interactive("auto", **values)

    def run(self, resume: bool = False) -> Any:
        """Start fine-tuning on the checked pairs; returns the worker.

        ``resume=True`` continues the last run that was stopped or ran out of time, on its own
        pairs and settings, for the budget now in the widget (counted from where it ended).
        """
        from napari_s2mnet._qt._workers import start_worker
        from napari_s2mnet.training import finetune

        if self.worker is not None:
            show_warning("Fine-tuning is already running.")
            return None
        state = self._resume if resume else None
        if resume and state is None:
            show_warning("There is no stopped or timed-out run to continue.")
            return None
        pairs = list(self._resume_pairs) if state is not None else self.selected_pairs()
        if not pairs:
            show_warning(
                "Check at least one (image, labels) pair. Segment an image and correct "
                "its labels with napari's paint tools first."
            )
            return None
        try:
            model = self.session.active()
        except (ValueError, OSError) as exc:
            show_error(f"No usable model: {exc}")
            return None
        data = [(np.asarray(img.data), np.asarray(lab.data)) for img, lab in pairs]
        names = [f"{img.name} / {lab.name}" for img, lab in pairs]
        corrected = corrected_masks(pairs) if state is None else self._resume_corrected
        if state is not None:
            config = _continued(state, self.budget_mode.value, float(self.budget_value.value))
            self.status.setText(f"Continuing from step {state.step} ({config.budget_text()})...")
        else:
            config = self.config()
            self.plot.clear()
            self.progress.busy("preparing the training data...")
            self.status.setText(f"Fine-tuning on {len(pairs)} pair(s)...")
        self._timed = config.seconds is not None
        self.control = FinetuneControl()
        self._stopped_early, self._final_status, self._steps_seen = False, "", 0
        self._returned = False  # the run's result is in: later reports must not touch the status
        self._resume_pairs = pairs
        self._resume_corrected = corrected
        self._resume = None
        self.run_button.enabled, self.stop_button.enabled = False, True
        self.continue_button.enabled = False
        self.worker = start_worker(
            finetune,
            data,
            model,
            config,
            control=self.control,
            names=names,
            resume=state,
            corrected=corrected,
            desc="S2M-Net fine-tune",
            on_yield=self._report,
            on_return=self._done,
            on_finish=self._finished,
            on_error=self._errored,
            on_cancel=self.stop,  # the activity dock's Cancel does what Stop does
        )
        self.worker.aborted.connect(self._aborted)
        return self.worker

    def stop(self) -> None:
        """Stop now, keeping the best state so far.

        The core hands that state out at once (``FinetuneControl.stop_now``); the step in
        flight (a CPU backward pass can take seconds) finishes in the background, and Run
        stays disabled until it has.
        """
        control = self.control
        if control is None or self._stopped_early:
            return
        self.stop_button.enabled = False
        result = control.stop_now()
        self._stopped_early = True  # from here on the worker's reports and result are ignored
        if result is not None:
            text = self._adopt(result)
        elif self._steps_seen == 0:
            text = "Stopped before any step: the previous model stays active."
        else:
            text = "Stopped with no improvement: the starting model is kept."
        self._final_status = text
        self.status.setText(f"{text} Finishing the interrupted step...")

    def _report(self, report: TrainReport) -> None:
        if self._stopped_early:
            return  # the interrupted step: not the model the user now has
        self._steps_seen = max(self._steps_seen, int(report.step))
        total = max(int(report.total_steps or 0), 1)
        estimate = "~" if self._timed else ""  # a time budget's step count is an estimate
        self.progress.report(
            int(report.step),
            total,
            f"step {int(report.step)}/{estimate}{total}, epoch {report.epoch}",
        )
        self.plot.add_point(
            int(report.step), float(report.loss), report.train_dice, report.val_dice
        )
        if report.message and not self._returned:
            self.status.setText(report.message)

    def _done(self, result: FinetuneResult) -> None:
        self._resume = result.resume  # also after Stop: the run's own end
        self._returned = True
        if self._stopped_early:
            return  # Stop already settled the model; this late result would add it twice
        self.status.setText(self._adopt(result))

    def _adopt(self, result: FinetuneResult) -> str:
        """Make a run's result the active model unless it is the starting model; status text."""
        self.last_result = result
        reason = str(result.stopped_reason)
        verb = "Stopped" if reason == "cancelled" else "Done"
        best = result.best_val_dice
        best_txt = (
            f", best validation Dice {best:.3f}" if best is not None and math.isfinite(best) else ""
        )
        scores = _score_text(result)
        if result.steps == 0:
            return f"{verb} before any step: the previous model stays active."
        if result.kept_previous or result.best_step == 0:
            # The corrected (or validation) data said the fine-tuned model was not better.
            where = (
                "the regions you corrected and the labels around them"
                if result.corrected_before is not None
                else "the held-out part of the labels"
            )
            show_info("S2M-Net fine-tuning: no improvement; the starting model is kept.")
            return (
                f"{verb} ({reason}{best_txt}): no improvement: the starting model is kept "
                f"(the fine-tuned model did not do better on {where}). {scores}"
            ).strip()
        self.session.set_active(result.bundle, "fine-tuned in this session")
        self.revert_button.enabled = self.session.can_revert
        show_info("S2M-Net fine-tuning finished; the new model is active.")
        return (
            f"{verb} ({reason}, state of step {result.best_step}{best_txt}). {scores}The "
            "fine-tuned model is now active for Segment; Revert restores the previous one."
        )

    def _errored(self, exc: BaseException) -> None:
        # start_worker already shows the error as a napari notification.
        if self._stopped_early:
            self._final_status += f" (The interrupted step then failed: {exc})"
        else:
            self.status.setText(f"Failed: {exc}")

    def _aborted(self) -> None:
        if not self._stopped_early:
            self.status.setText("Cancelled: the previous model is still active.")

    def _finished(self) -> None:
        self.worker = None
        self.control = None
        self.run_button.enabled, self.stop_button.enabled = True, False
        self.continue_button.enabled = self._resume is not None
        self.revert_button.enabled = self.session.can_revert
        self.progress.finish(f"{self._steps_seen} steps done", complete=self._steps_seen > 0)
        if self._stopped_early:
            self.status.setText(self._final_status)

    # -- model management ----------------------------------------------------------------------
    def revert(self) -> None:
        """Go back to the previous model."""
        if self.session.can_revert:
            self.session.revert()
            self.status.setText("Reverted to the previous model.")
        self.revert_button.enabled = self.session.can_revert

    def save_model(self, path: str | Path | None = None) -> Path | None:
        """Save the active model to one ``.safetensors`` file (asks for a path if none)."""
        from napari_s2mnet.checkpoint import save_model

        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save model", "s2mnet_finetuned.safetensors", "S2M-Net model (*.safetensors)"
            )
            if not path:
                return None
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        try:
            save_model(self.session.active(), path)
        except (OSError, ValueError) as exc:
            show_error(f"Could not save the model to {path}: {exc}")
            return None
        self.status.setText(f"Saved model to {path}")
        remember_model(path, self.session.active().name)  # listed in Segment's model picker
        self.session.changed.emit()
        return path

    def _show_model(self, *_: Any) -> None:
        self.model_label.setText(self.session.describe())
        self.revert_button.enabled = self.session.can_revert


def _continued(state: ResumeState, mode: str, amount: float) -> FinetuneConfig:
    """The stopped run's config with its budget raised by ``amount`` seconds or epochs."""
    import dataclasses

    cfg = state.config
    if mode == "seconds":
        return dataclasses.replace(cfg, seconds=state.elapsed + amount, epochs=None)
    done = math.ceil(state.step / cfg.steps_per_epoch)
    return dataclasses.replace(cfg, epochs=done + max(1, int(amount)), seconds=None)


def _budget_default(cfg: FinetuneConfig, mode: str) -> float:
    """The budget the config implies for ``mode`` (``SECONDS_SUGGESTION`` for seconds if none)."""
    if mode == "epochs":
        return float(cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS)
    return float(cfg.seconds if cfg.seconds is not None else SECONDS_SUGGESTION)


def corrected_masks(pairs: list[tuple[Image, Labels]]) -> list[Any] | None:
    """Per pair, the corrected region of its labels layer (what the user painted, filled or
    erased, grown to the objects it touched); ``None`` for a pair without paint strokes (its
    labels all count). ``None`` when no pair has strokes: train on the whole labels."""
    from napari_s2mnet.training.region import grow_corrected

    out: list[Any] = []
    for _img, lab in pairs:
        painted = _layers.info(lab).painted
        data = np.asarray(lab.data)
        out.append(
            grow_corrected(data, painted)
            if painted is not None and painted.shape == data.shape and painted.any()
            else None
        )
    return out if any(m is not None for m in out) else None


def _score_text(result: FinetuneResult) -> str:
    """Before/after scores on the corrected regions, in plain words (empty without)."""
    before, after = result.corrected_before, result.corrected_after
    if before is None or after is None:
        return ""
    return f"On the regions you corrected: Dice {before:.2f} before, {after:.2f} after. "


def _set_form(form: Any, cfg: FinetuneConfig) -> None:
    """Show ``cfg``'s values in a form built by :func:`dataclass_form`."""
    for w in form:
        w.value = getattr(cfg, w.name)


def _warm_up_in_background() -> None:
    """Import torch's optimiser machinery while the user corrects labels (seconds on a CPU),
    so Run shows its first loss point quickly."""
    import threading

    from napari_s2mnet.training.loop import warm_up

    threading.Thread(target=warm_up, name="s2mnet-warm-up", daemon=True).start()
