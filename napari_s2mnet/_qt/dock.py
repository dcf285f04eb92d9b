"""Shared dock furniture: a scrolling body, an in-widget progress row, and the one-dock window.

Every S2M-Net widget puts its controls in a scroll area, so that its dock never forces the
napari window taller than the screen (the window's minimum height is the sum of the docks'
minimum heights); at 1366 x 768 a long panel scrolls instead of pushing others off-screen.
"""

from __future__ import annotations

import napari
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QScrollArea,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

MIN_BODY_HEIGHT = 160  # a dock can shrink to this; its content then scrolls


class _VerticalScroll(QScrollArea):
    """A scroll area that scrolls vertically only and is never narrower than its content.

    A plain QScrollArea's minimum width ignores its widget's, so a narrow dock clipped the
    panel's right edge (no horizontal scroll bar by design).
    """

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        body = self.widget()
        if body is not None:
            width = (
                body.minimumSizeHint().width()
                + self.verticalScrollBar().sizeHint().width()
                + 2 * self.frameWidth()
            )
            hint.setWidth(max(hint.width(), width))
        return hint


def scrolling_body(owner: QWidget) -> QVBoxLayout:
    """Give ``owner`` a vertical scroll area and return the layout to fill with controls."""
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = _VerticalScroll(owner)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setMinimumHeight(MIN_BODY_HEIGHT)
    body = QWidget()
    body.setObjectName("s2mnet_body")
    scroll.setWidget(body)
    outer.addWidget(scroll)
    owner.body = body  # tests and screenshots measure the content's own height
    owner.scroll_area = scroll
    layout = QVBoxLayout(body)
    layout.setContentsMargins(4, 4, 4, 4)
    layout.setSpacing(4)
    return layout


class ProgressRow(QWidget):
    """A progress bar with the work done in words ("slice 2/5: tile 12/48") beside it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setMaximumHeight(16)
        self.bar.setTextVisible(True)
        self.bar.setFormat("%p%")
        self.detail = QLabel("")
        self.detail.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar, 2)
        layout.addWidget(self.detail, 3)
        self.reset()

    def reset(self, text: str = "") -> None:
        """Empty bar, ``text`` as detail."""
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.detail.setText(text)

    def busy(self, text: str) -> None:
        """An indeterminate bar until the first report arrives."""
        self.bar.setRange(0, 0)
        self.detail.setText(text)

    def report(self, done: int, total: int, text: str = "") -> None:
        """Show ``done`` of ``total`` work units and the detail ``text``."""
        if _deleted(self.bar):
            return  # a late report of a job whose window was closed
        total = max(int(total), 1)
        self.bar.setRange(0, total)
        self.bar.setValue(min(max(int(done), 0), total))
        self.detail.setText(text or f"{done}/{total}")
        self.detail.setToolTip(self.detail.text())

    def finish(self, text: str, complete: bool = True) -> None:
        """A full (``complete``) or empty bar with a final ``text``; the total of the last
        report stays (the result can arrive before or after the last progress signal)."""
        top = max(self.bar.maximum(), 1)
        self.bar.setRange(0, top)
        self.bar.setValue(top if complete else 0)
        self.detail.setText(text)

    @property
    def value(self) -> int:
        """The bar's value (for tests)."""
        return self.bar.value()

    @property
    def maximum(self) -> int:
        """The bar's maximum (for tests)."""
        return self.bar.maximum()


def _deleted(widget: QWidget) -> bool:
    """Whether Qt already deleted ``widget`` (its Python wrapper outlives it)."""
    try:
        widget.objectName()
    except RuntimeError:
        return True
    return False


class S2MNetWidget(QWidget):
    """The whole plugin in one dock: Segment, Fine-tune and Export as tabs.

    The three widgets are the same classes as the separate dock entries and share the viewer's
    model session, so a model fine-tuned in one tab is the one the Segment tab uses.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        from napari_s2mnet._qt.export import ExportWidget
        from napari_s2mnet._qt.finetune import FinetuneWidget
        from napari_s2mnet._qt.segment import SegmentWidget

        self.viewer = napari_viewer
        self.segment = SegmentWidget(napari_viewer)
        self.finetune = FinetuneWidget(napari_viewer)
        self.export = ExportWidget(napari_viewer)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.segment, "Segment")
        self.tabs.addTab(self.finetune, "Fine-tune")
        self.tabs.addTab(self.export, "Export")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
