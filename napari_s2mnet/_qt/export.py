"""Export widget: labels to TIFF / PNG / NPY and features to CSV, one layer or all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, PushButton
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QLabel, QWidget

from napari_s2mnet._qt import _layers
from napari_s2mnet._qt.dock import scrolling_body
from napari_s2mnet.io import physical_unit

FORMATS = {"TIFF (Fiji)": ".tif", "PNG": ".png", "NumPy": ".npy"}


class ExportWidget(QWidget):
    """Dock widget: write a labels layer (or every labels layer) and its features table."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.labels = ComboBox(label="labels", choices=self._labels_layers, nullable=True)
        self.all_layers = CheckBox(text="all labels layers (into a folder)", value=False)
        self.fmt = ComboBox(label="format", choices=list(FORMATS), value="TIFF (Fiji)")
        self.features = CheckBox(text="also write features (CSV)", value=True)
        self.path = FileEdit(label="file", mode="w")
        self.folder = FileEdit(label="folder", mode="d", visible=False)
        self.export_button = PushButton(text="Export")
        self.features_button = PushButton(text="Compute features")
        self.table_button = PushButton(text="Show table")
        self.form = Container(
            widgets=[self.labels, self.all_layers, self.fmt, self.features, self.path, self.folder]
        )
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout = scrolling_body(self)
        layout.addWidget(self.form.native)
        layout.addWidget(
            Container(
                widgets=[self.export_button, self.features_button, self.table_button],
                layout="horizontal",
                labels=False,
            ).native
        )
        self.model_button = PushButton(text="Export model...")  # ONNX / bioimage.io (issue 18)
        layout.addWidget(self.model_button.native)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.model_button.changed.connect(lambda: self.export_model_dialog())
        self.all_layers.changed.connect(self._toggle_mode)
        self.export_button.changed.connect(lambda: self.export())
        self.features_button.changed.connect(self.compute_features)
        self.table_button.changed.connect(self._show_table)
        self._layer_watch = _layers.LayerWatcher(
            napari_viewer.layers, lambda: _layers.refresh_layer_combo(self.labels)
        )
        napari_viewer.layers.events.inserted.connect(self._pick_new_labels)
        self.labels.reset_choices()
        if self.labels.value is None and self.labels.choices:
            self.labels.value = self.labels.choices[-1]  # the newest labels layer

    def _pick_new_labels(self, event: Any) -> None:
        """A new segmentation result is the one to export (so is any labels layer while nothing
        is picked); another labels layer the user adds does not replace their choice."""
        layer = event.value
        if not isinstance(layer, Labels) or not any(c is layer for c in self.labels.choices):
            return
        known = _layers.known_info(layer)
        if self.labels.value is None or (known is not None and known.made_by_plugin):
            self.labels.value = layer

    def _labels_layers(self, *_: Any) -> list[tuple[str, Labels]]:
        return [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, Labels)]

    def _toggle_mode(self, all_layers: bool) -> None:
        self.path.visible, self.folder.visible = not all_layers, all_layers
        self.labels.enabled = not all_layers

    def _show_table(self, *_: Any) -> None:
        from napari_s2mnet._qt._table import show_features_table

        if self.labels.value is None:
            show_warning("Choose a labels layer first.")
            return
        show_features_table(self.viewer, self.labels.value, anchor=self)

    def compute_features(self, *_: Any) -> None:
        """(Re)compute the morphology features of the chosen labels layer."""
        layer = self.labels.value
        if layer is None:
            show_warning("Choose a labels layer first.")
            return
        if np.asarray(layer.data).ndim != 2:
            show_warning(
                "Features are computed for 2-D labels; segment stacks with S2M-Net to get "
                "per-slice features."
            )
            return
        _layers.info(layer).spacing = tuple(float(s) for s in layer.scale[-2:])
        _layers.refresh_features(layer, full=True)
        self.status.setText(f"{len(layer.features)} objects measured in {layer.name!r}.")

    def export(self, target: str | Path | None = None) -> list[Path]:
        """Write the file(s); returns the paths written. ``target`` overrides the path widget."""
        from napari_s2mnet.io import write_features_csv, write_labels

        ext = FORMATS[self.fmt.value]
        self.status.setText("")  # never leave an old "Wrote ..." next to a new attempt
        if self.all_layers.value:
            folder = Path(target or self.folder.value)
            layers = [lyr for _, lyr in self._labels_layers()]
            if not layers:
                self._fail("There is no labels layer to export.")
                return []
            folder.mkdir(parents=True, exist_ok=True)
            jobs = [(lyr, folder / f"{_safe(lyr.name)}{ext}") for lyr in layers]
        else:
            layer = self.labels.value
            if layer is None:
                self._fail("Choose a labels layer to export.")
                return []
            path = Path(target or self.path.value)
            if str(path) in ("", ".") or path.is_dir():
                self._fail("Choose a file name to export to.")
                return []
            jobs = [
                (
                    layer,
                    path.with_suffix(ext)
                    if path.suffix.lower() not in (".tif", ".tiff", ".png", ".npy")
                    else path,
                )
            ]
        written: list[Path] = []
        try:
            for layer, path in jobs:
                scale = tuple(float(s) for s in layer.scale)
                unit = physical_unit(getattr(layer, "units", None))
                written.append(
                    Path(write_labels(path, np.asarray(layer.data), spacing=scale, unit=unit))
                )
                if self.features.value and layer.features is not None and len(layer.features):
                    written.append(
                        Path(
                            write_features_csv(
                                layer.features, path.with_name(path.stem + "_features.csv")
                            )
                        )
                    )
        except (ValueError, OSError) as exc:
            show_error(f"Export failed: {exc}")
            self.status.setText(f"Export failed: {exc}")
            return written
        self.status.setText("Wrote " + ", ".join(p.name for p in written))
        show_info(f"Exported {len(written)} file(s) to {written[0].parent}" if written else "")
        return written

    def export_model_dialog(self) -> Any:
        """Ask where to write the active model (.onnx or bioimage.io .zip), then export it."""
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(
            self, "Export model", "s2mnet_model.onnx", "ONNX (*.onnx);;bioimage.io package (*.zip)"
        )
        return self.export_model(path) if path else None

    def export_model(self, target: str | Path) -> Any:
        """Export the model the Segment widget uses (default: the bundled one) in a worker."""
        from napari_s2mnet._qt._session import get_session
        from napari_s2mnet._qt._workers import start_worker
        from napari_s2mnet.export import export_bundle, export_format

        try:
            export_format(target)
            bundle = get_session(self.viewer).active()
        except (ValueError, OSError) as exc:
            self._fail(f"Model export: {exc}")
            return None

        def job() -> Any:
            yield None
            return export_bundle(bundle, target)

        self.status.setText(f"Exporting {bundle.name!r} to {Path(target).name}...")
        return start_worker(
            job,
            desc="Export model",
            on_return=lambda p: self.status.setText(f"Model exported to {p}"),
            on_error=lambda e: self.status.setText(f"Model export failed: {e}"),
        )

    def _fail(self, text: str) -> None:
        show_warning(text)
        self.status.setText(f"Not exported: {text}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "labels"
