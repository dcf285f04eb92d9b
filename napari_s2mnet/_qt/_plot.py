"""A small live plot of training loss and validation Dice (matplotlib Qt canvas)."""

from __future__ import annotations

import math

from qtpy.QtWidgets import QVBoxLayout, QWidget


class LossPlot(QWidget):
    """Loss (left axis) and train/validation Dice (right axis) against the training step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax = self.figure.add_subplot(111)
        self.ax_dice = self.ax.twinx()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(180)
        self.clear()

    def clear(self) -> None:
        """Forget all points."""
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.dice_steps: list[int] = []
        self.train_dice: list[float] = []
        self.val_dice: list[float] = []
        self._draw()

    def add_point(self, step: int, loss: float, train_dice: float | None = None,
                  val_dice: float | None = None) -> None:
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
        self.ax.clear()
        self.ax_dice.clear()
        self.ax.set_xlabel("step", fontsize=8)
        self.ax.set_ylabel("loss", fontsize=8, color="tab:blue")
        self.ax_dice.set_ylabel("Dice", fontsize=8, color="tab:green")
        self.ax_dice.set_ylim(0, 1)
        self.ax.tick_params(labelsize=7)
        self.ax_dice.tick_params(labelsize=7)
        if self.steps:
            self.ax.plot(self.steps, self.losses, color="tab:blue", lw=1.2, label="loss")
        if self.dice_steps:
            self.ax_dice.plot(self.dice_steps, self.train_dice, color="tab:olive", lw=1,
                              ls="--", label="train Dice")
            self.ax_dice.plot(self.dice_steps, self.val_dice, color="tab:green", lw=1.5,
                              marker=".", label="val Dice")
        self.canvas.draw_idle()
