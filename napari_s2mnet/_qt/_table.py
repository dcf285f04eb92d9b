"""The features table as a user sees it: units in the column names, one id column in napari's
table, a row click selects the object.

Labels layers keep the core's table (shape descriptors with generic names) in
``LabelsInfo.core``, where paint edits update it; ``layer.features`` holds
:func:`napari_s2mnet.measure.measurement_table` of it.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from napari.layers import Labels

HIDDEN_COLUMNS = ("Index", "index")  # napari's row number and the status bar's id column
MIN_ROWS = 10  # rows the dock opens with
SMALLEST_ROWS = 3  # rows it can be shrunk to (small screens)


def is_core_table(df: Any) -> bool:
    """Whether ``df`` is a core table (generic names) rather than a presented one."""
    return df is not None and ("scale" in df.columns or "scale_3d" in df.columns)


def core_features(layer: Labels) -> Any:
    """The core table of ``layer`` (what paint edits update)."""
    from napari_s2mnet._qt import _layers

    core = _layers.info(layer).core
    return core if core is not None else layer.features


def present(layer: Labels | None) -> None:
    """Replace a core table in ``layer.features`` by the table a user reads (keeps the core)."""
    if layer is None or not is_core_table(layer.features):
        return
    from napari_s2mnet._qt import _layers
    from napari_s2mnet.measure import measurement_table

    core = layer.features.copy()
    inf = _layers.info(layer)
    inf.core = core
    data = np.asarray(layer.data)
    units = getattr(layer, "units", None)
    unit = str(units[-1]) if units else None
    layer.features = measurement_table(
        core,
        data,
        spacing=tuple(layer.scale),
        unit=unit,
        image=_intensity(inf.source_layer(), data.shape),
    )


def _intensity(image: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The source image as one gray value per labels pixel, or ``None`` if it does not fit."""
    if image is None:
        return None
    data = np.asarray(image.data)
    if image.rgb:
        data = data[..., :3].mean(axis=-1)
    return data if data.shape == tuple(shape) else None


def show_features_table(viewer: Any, layer: Labels, anchor: Any = None) -> Any:
    """Open napari's features table for ``layer``, docked below the canvas with room for ten
    rows; returns it.

    napari's own widget, with its row-number and ``index`` columns hidden (``label`` is the id)
    and rows mapped to objects by ``label``: napari maps a labels layer's row *n* to label *n*,
    which is wrong once ids have gaps. ``anchor``: a widget docked in the main window (the
    caller), through which the window's dock corners are set. Below the canvas, not beside the S2M-Net panel: on the
    right it took that column's height and left the panel ~160 px at 1920 x 1080.
    """
    viewer.layers.selection.active = layer
    existing = _TABLES.get(viewer)
    if existing is not None:
        try:
            existing.parentWidget().show()
            existing.parentWidget().raise_()
            return existing
        except RuntimeError:  # the dock was closed and deleted
            pass
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    window = anchor  # the calling widget, docked in napari's main window
    while window is not None and not isinstance(window, QMainWindow):
        window = window.parentWidget()
    if isinstance(window, QMainWindow):
        # Bottom docks span the canvas column only: the side columns keep their full height,
        # and the window's minimum height does not become napari's left column plus the table
        # (824 px, over a 768-px screen). Set before docking: a window never shrinks back.
        window.setCorner(Qt.Corner.BottomLeftCorner, Qt.DockWidgetArea.LeftDockWidgetArea)
        window.setCorner(Qt.Corner.BottomRightCorner, Qt.DockWidgetArea.RightDockWidgetArea)
    table = _make_table(viewer)
    viewer.window.add_dock_widget(table, name="Features table (S2M-Net)", area="bottom")
    dock = table.parentWidget()  # the real dock (napari hands plugins a proxy of it)
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    if dock is not None:
        dock.show()
    main = dock.parentWidget() if dock is not None else None
    if isinstance(main, QMainWindow):
        # Room for ten rows and no more: the canvas keeps the rest of the height. Only the
        # dock's size, not its minimum: a ten-row minimum made the window taller than a
        # 768-px screen.
        view = table.table
        rows = view.verticalHeader().defaultSectionSize()
        header = view.horizontalHeader().sizeHint().height()
        height = (
            header + MIN_ROWS * rows + table.sizeHint().height() - view.sizeHint().height() + 40
        )
        main.resizeDocks([dock], [height], Qt.Orientation.Vertical)
    _TABLES[viewer] = table
    return table


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # viewer -> its table


def _make_table(viewer: Any) -> Any:
    from napari_builtins._qt.features_table import FeaturesTable

    class LabelFeaturesTable(FeaturesTable):
        """napari's features table, rows <-> objects through the ``label`` column."""

        def _single_labels(self) -> Labels | None:
            layers = self._selected_layers
            if (
                len(layers) == 1
                and isinstance(layers[0], Labels)
                and "label" in layers[0].features.columns
            ):
                return layers[0]
            return None

        def _on_features_change(self) -> None:
            super()._on_features_change()
            model = self.table.model()
            for col in range(model.columnCount()):
                name = model.headerData(col, _HORIZONTAL)
                self.table.setColumnHidden(col, name in HIDDEN_COLUMNS)

        def _on_table_selection_changed(self) -> None:
            layer = self._single_labels()
            if layer is None or self._selection_blocked:
                super()._on_table_selection_changed()
                return
            rows = [
                self.table.model().mapToSource(i).row()
                for i in self.table.selectionModel().selectedIndexes()
            ]
            if rows:
                df = self.table.model().sourceModel().df
                with self._block_selection():
                    layer.selected_label = int(df["label"].iloc[rows[-1]])

        def _update_table_selected_cells(self) -> None:
            layer = self._single_labels()
            if layer is None or self._selection_blocked:
                super()._update_table_selected_cells()
                return
            from qtpy.QtCore import QItemSelection, QItemSelectionModel

            model = self.table.model()
            df = model.sourceModel().df
            hits = (
                np.flatnonzero(df["label"].to_numpy() == layer.selected_label)
                if "label" in df.columns
                else []
            )
            with self._block_selection():
                if not len(hits):
                    self.table.selectionModel().clearSelection()
                    return
                idx = model.mapFromSource(model.sourceModel().index(int(hits[0]), 0))
                sel = QItemSelection(
                    model.index(idx.row(), 0), model.index(idx.row(), model.columnCount() - 1)
                )
                self.table.selectionModel().select(
                    sel,
                    QItemSelectionModel.SelectionFlag.ClearAndSelect
                    | QItemSelectionModel.SelectionFlag.Rows,
                )
                self.table.scrollTo(idx)

    from qtpy.QtCore import Qt

    _HORIZONTAL = Qt.Orientation.Horizontal
    table = LabelFeaturesTable(viewer)
    rows = table.table.verticalHeader().defaultSectionSize()
    header = table.table.horizontalHeader().sizeHint().height()
    table.table.setMinimumHeight(header + SMALLEST_ROWS * rows + 4)
    table._on_features_change()
    return table
