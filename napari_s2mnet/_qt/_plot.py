"""A small live plot of training loss and validation Dice (matplotlib Qt canvas)."""

from __future__ import annotations

import math

from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

LOSS_COLOR = "tab:blue"
DICE_COLOR = "tab:green"


class LossPlot(QWidget):
    """Loss (left axis) and train/validation Dice (right axis) against the training step.

    The axes and lines are made once and only their data change: clearing a ``twinx`` axis
    would move its label and ticks back to the left, over the loss ticks. Lines carry markers
    so that the first report (one point) is visible.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self.figure = Figure(figsize=(4, 2.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.ax = self.figure.add_subplot(111)
        self.ax_dice = self.ax.twinx()
        self.ax.set_xlabel("step", fontsize=8)
        self.ax.set_ylabel("loss", fontsize=8, color=LOSS_COLOR)
        self.ax_dice.set_ylabel("Dice", fontsize=8, color=DICE_COLOR)
        self.ax_dice.yaxis.set_label_position("right")
        self.ax_dice.set_ylim(0, 1)
        self.ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        self.ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        self.ax.tick_params(labelsize=7)
        self.ax.tick_params(axis="y", colors=LOSS_COLOR)
        self.ax_dice.tick_params(labelsize=7)
        self.ax_dice.tick_params(axis="y", colors=DICE_COLOR)
        (self._loss_line,) = self.ax.plot(
            [], [], color=LOSS_COLOR, lw=1.2, marker="o", ms=2.5, label="loss"
        )
        (self._train_line,) = self.ax_dice.plot(
            [], [], color="tab:olive", lw=1, ls="--", marker="x", ms=3, label="train Dice"
        )
        (self._val_line,) = self.ax_dice.plot(
            [], [], color=DICE_COLOR, lw=1.5, marker="o", ms=3, label="val Dice"
        )
        # Above the axes, outside them: the legend never covers a curve.
        self.figure.legend(
            handles=[self._loss_line, self._train_line, self._val_line],
            loc="outside upper center",
            ncols=3,
            fontsize=6,
            frameon=False,
        )
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(150)
        self.clear()

    def clear(self) -> None:
        """Forget all points."""
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.dice_steps: list[int] = []
        self.train_dice: list[float] = []
        self.val_dice: list[float] = []
        self._draw()

    def add_point(
        self, step: int, loss: float, train_dice: float | None = None, val_dice: float | None = None
    ) -> None:
        """Append one report and redraw."""
        if loss is not None and math.isfinite(loss):
            self.steps.append(step)
            self.losses.append(float(loss))
        if train_dice is not None or val_dice is not None:
            self.dice_steps.append(step)
            self.train_dice.append(float("nan") if train_dice is None else float(train_dice))
            self.val_dice.append(float("nan") if val_dice is None else float(val_dice))
        self._draw()

    @property
    def n_points(self) -> int:
        """Number of loss points shown."""
        return len(self.steps)

    def _draw(self) -> None:
        self._loss_line.set_data(self.steps, self.losses)
        # Only the steps that have a value: validation runs less often than training reports.
        for line, values in ((self._train_line, self.train_dice), (self._val_line, self.val_dice)):
            pts = [(s, v) for s, v in zip(self.dice_steps, values, strict=True) if math.isfinite(v)]
            line.set_data([s for s, _ in pts], [v for _, v in pts])
        last = max([*self.steps, *self.dice_steps, 1])
        self.ax.set_xlim(0, last * 1.05 if last > 1 else 1.5)
        if self.losses:
            lo, hi = min(self.losses), max(self.losses)
            pad = 0.1 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1e-3)
            self.ax.set_ylim(lo - pad, hi + pad)
        else:
            self.ax.set_ylim(0, 1)
        self.canvas.draw_idle()
