"""Segment widget: image layer + model + device -> new Labels layer with morphology features."""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QFileDialog, QLabel, QWidget
from superqt import QCollapsible

from napari_s2mnet._qt import _layers
from napari_s2mnet._qt._form import dataclass_form, form_values
from napari_s2mnet._qt._models import BUNDLED, bundled_name, recent_models, remember_model
from napari_s2mnet._qt._session import get_session
from napari_s2mnet._qt._table import present, show_features_table
from napari_s2mnet._qt.dock import ProgressRow, scrolling_body
from napari_s2mnet.inference import InferenceConfig
from napari_s2mnet.inference.config import Progress, SegmentationResult
from napari_s2mnet.stain import INPUT_TRANSFORMS

NO_CHANNEL_AXIS = -1  # the channel-axis picker's "none" (ComboBox data must not be None)
ALL_CHANNELS = -1  # the model-input picker's "all": channels mapped automatically
SESSION_MODEL = "session"  # the model picker's key for a model that exists only in this window
ADVANCED_FIELDS = [
    "tile_size",
    "overlap",
    "batch_size",
    "threshold",
    "min_size",
    "split_touching",
    "uncertainty",
    "tta",
    "z_context",
]


def available_devices() -> list[str]:
    """Device choices for the picker: auto, cpu, and the accelerators torch sees."""
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
    return choices


def _architectures() -> list[tuple[str, str]]:
    """(display name, registry name) of every registered architecture."""
    from napari_s2mnet.model import available_models

    return [(f"{name}: {desc.split(':')[0]}", name) for name, desc in available_models().items()]


def _size_form() -> Container:
    """The object-diameter field (auto = no rescaling)."""
    return dataclass_form(
        InferenceConfig,
        ["diameter"],
        labels={"diameter": "object diameter (px)"},
        options={"diameter": {"min": 2.0, "max": 2000.0, "step": 1.0, "decimals": 1}},
        placeholder={"diameter": 30.0},
        tooltips={
            "diameter": "typical object diameter in pixels; the image is rescaled so "
            "objects reach the model at the size it was trained on. "
            "auto: no rescaling"
        },
    )


def _advanced_form() -> Container:
    """The Advanced settings of :class:`InferenceConfig` (collapsed by default)."""
    return dataclass_form(
        InferenceConfig,
        ADVANCED_FIELDS,
        labels={
            "tta": "test-time augmentation",
            "uncertainty": "uncertainty layer",
            "z_context": "2.5-D z context",
        },
        options={
            "tile_size": {"min": 32, "max": 4096, "step": 32},
            "overlap": {"min": 0.0, "max": 0.75, "step": 0.025, "decimals": 3},
            "threshold": {"min": 0.0, "max": 1.0, "step": 0.05},
            "min_size": {"min": 0, "max": 100000},
            "z_context": {"min": 0, "max": 20},
        },
        placeholder={"threshold": 0.5, "tile_size": 256},
        tooltips={
            "threshold": "auto: the model's own threshold",
            "tile_size": "auto: the crop size the model was trained with (S2M-Net is "
            "most accurate at that size)",
            "split_touching": "split touching objects with a distance-transform watershed "
            "(for models without the instance head; the bundled model separates them itself)",
            "z_context": "stacks: average each slice's probabilities with N slices "
            "above and below before thresholding (0: off)",
        },
    )


class SegmentWidget(QWidget):
    """Dock widget: run S2M-Net on an image layer.

    The result is always a new Labels layer (or the plugin's own unedited result for the same image,
    updated in place), so a layer the user edited is never overwritten.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.worker: Any = None
        self._last_result: dict[int, weakref.ref] = {}  # id(image layer) -> our last result layer
        self._result_drop_axis: int | None = None  # the channel axis of the running job

        self.image = ComboBox(label="image", choices=self._image_layers, nullable=True)
        self.channel_axis = ComboBox(
            label="channel axis",
            choices=self._channel_choices,
            value=NO_CHANNEL_AXIS,
            tooltip="for a multichannel layer (not RGB): the axis that holds the model's input "
            "channels; 'none' segments every plane of a stack on its own",
        )
        self.input_channel = ComboBox(
            label="model input",
            choices=self._input_choices,
            value=ALL_CHANNELS,
            tooltip="which channel feeds the model (e.g. the nuclear stain for a 1-channel "
            "model); 'all' passes every channel (RGB is averaged to gray for a "
            "1-channel model)",
        )
        self.input_transform = ComboBox(
            label="input",
            choices=[(text, key) for key, text in INPUT_TRANSFORMS.items()],
            value=InferenceConfig().input_transform,
            tooltip="brightfield: 'invert' makes dark objects bright; H&E / IHC RGB: the "
            "hematoxylin stain (nuclei) feeds the model as bright objects",
        )
        self.model = ComboBox(
            label="model",
            choices=self._model_choices,
            tooltip="the bundled model, models fine-tuned in this window and "
            "model files loaded or saved recently",
        )
        self.open_button = PushButton(text="Open...", tooltip="load a .safetensors model file")
        self.device = ComboBox(label="device", choices=available_devices(), value="auto")
        self.new_arch = ComboBox(
            label="architecture",
            choices=_architectures(),
            value="s2mnet",
            tooltip="start an untrained model of this architecture, then "
            "fine-tune it on your labels",
        )
        self.new_button = PushButton(
            text="Start untrained model",
            tooltip="random weights: segments nothing useful until fine-tuned on your labels",
        )
        self.run_button = PushButton(text="Run")
        self.size_form = _size_form()
        self.size_form.margins = (0, 0, 0, 0)
        self.estimate_button = PushButton(
            text="Estimate",
            tooltip="measure the typical object diameter with "
            "the model (one or two segmentation passes)",
        )
        self.estimate_worker: Any = None
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.table_button = PushButton(
            text="Show table",
            tooltip="the features table of the result (or of the "
            "selected labels layer); click a row to select "
            "that object",
        )
        self.controls = Container(
            widgets=[
                self.image,
                self.channel_axis,
                self.input_channel,
                self.input_transform,
                Container(
                    widgets=[self.model, self.open_button],
                    layout="horizontal",
                    labels=False,
                    label="model",
                ),
                Container(
                    widgets=[self.size_form, self.estimate_button],
                    layout="horizontal",
                    labels=False,
                    label="objects",
                ),
            ]
        )
        self.controls.margins = (0, 0, 0, 0)
        self.advanced = _advanced_form()
        self.device_label = QLabel()
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.progress = ProgressRow()
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)

        collapsible = QCollapsible("Advanced")
        collapsible.addWidget(Container(widgets=[self.device]).native)
        collapsible.addWidget(self.advanced.native)
        collapsible.addWidget(
            Container(
                widgets=[self.new_arch, self.new_button], layout="horizontal", labels=False
            ).native
        )
        self.collapsible = collapsible
        buttons = Container(
            widgets=[self.run_button, self.cancel_button, self.table_button],
            layout="horizontal",
            labels=False,
        )
        buttons.margins = (0, 0, 0, 0)
        layout = scrolling_body(self)
        layout.addWidget(self.controls.native)
        layout.addWidget(self.model_label)
        layout.addWidget(self.device_label)
        layout.addWidget(buttons.native)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(collapsible)
        layout.addStretch(1)

        self.run_button.changed.connect(self.run)
        self.estimate_button.changed.connect(lambda: self.estimate_diameter())
        self.cancel_button.changed.connect(self.cancel)
        self.table_button.changed.connect(lambda: self.show_table())
        self.open_button.changed.connect(lambda: self.load_model_file())
        self.model.changed.connect(self._model_picked)
        self.new_button.changed.connect(self.start_new_model)
        self.device.changed.connect(self._show_device)
        self.image.changed.connect(self._refresh_channel_axes)
        self.channel_axis.changed.connect(self._refresh_input_channels)
        self.session.changed.connect(self._show_model)
        self.session.changed.connect(self._refresh_channel_axes)
        self._layer_watch = _layers.LayerWatcher(napari_viewer.layers, self._refresh_choices)
        self._refresh_choices()
        self._show_device()
        self._show_model()

    # -- layer and model choices -------------------------------------------------------------
    def _image_layers(self, *_: Any) -> list[tuple[str, Image]]:
        return [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def _refresh_choices(self, *_: Any) -> None:
        current = self.image.value
        _layers.refresh_layer_combo(self.image)  # keeps the layer object, whatever its name
        if current is None and self.image.value is None and self.image.choices:
            active = self.viewer.layers.selection.active
            self.image.value = active if isinstance(active, Image) else self.image.choices[-1]
        self._refresh_channel_axes()

    def _channel_choices(self, *_: Any) -> list[tuple[str, int]]:
        """'none' plus every axis of the chosen layer that could hold channels (not Y, X)."""
        layer = self.image.value if hasattr(self, "image") else None
        choices = [("none", NO_CHANNEL_AXIS)]
        if layer is None or layer.rgb:
            return choices  # RGB layers carry their colour axis themselves
        names = [str(n) for n in (getattr(layer, "axis_labels", None) or ())]
        shape = np.shape(layer.data)
        for axis in range(len(shape) - 2):
            name = names[axis] if axis < len(names) else str(axis)
            choices.append((f"axis {axis} ({name}, {shape[axis]})", axis))
        return choices

    def _refresh_channel_axes(self, *_: Any) -> None:
        current = self.channel_axis.value
        self.channel_axis.reset_choices()
        values = [v for _, v in self._channel_choices()]
        if current not in values or current == NO_CHANNEL_AXIS:
            current = self._suggested_channel_axis(values)
        self.channel_axis.value = current
        self.channel_axis.visible = len(values) > 1  # only stacks and multichannel layers
        self._refresh_input_channels()

    def _input_choices(self, *_: Any) -> list[tuple[str, int]]:
        """'all' plus each channel of the chosen channel axis (or colour of an RGB layer)."""
        choices = [("all", ALL_CHANNELS)]
        layer = self.image.value if hasattr(self, "image") else None
        if layer is None:
            return choices
        if layer.rgb:
            return choices + [(name, i) for i, name in enumerate(("red", "green", "blue"))]
        axis = self._chosen_channel_axis() if hasattr(self, "channel_axis") else None
        if axis is None:
            return choices
        return choices + [(f"channel {i}", i) for i in range(np.shape(layer.data)[axis])]

    def _refresh_input_channels(self, *_: Any) -> None:
        current = self.input_channel.value
        self.input_channel.reset_choices()
        values = [v for _, v in self._input_choices()]
        self.input_channel.value = current if current in values else ALL_CHANNELS
        self.input_channel.enabled = len(values) > 1
        self.input_channel.visible = len(values) > 1

    def _suggested_channel_axis(self, values: list[int]) -> int:
        """The first axis whose length equals a multichannel model's input channels, else none."""
        layer = self.image.value
        if layer is None or not self.session.loaded:  # never load a model just to guess
            return NO_CHANNEL_AXIS
        n = int(self.session.active().config.in_channels)
        shape = np.shape(layer.data)
        for axis in values:
            if n > 1 and axis != NO_CHANNEL_AXIS and shape[axis] == n:
                return axis
        return NO_CHANNEL_AXIS

    def _show_device(self, *_: Any) -> None:
        from napari_s2mnet.devices import describe_device, resolve_device

        try:
            self.device_label.setText(
                f"Runs on: {describe_device(resolve_device(self.device.value))}"
            )
        except (ValueError, RuntimeError) as exc:
            self.device_label.setText(f"Device unavailable: {exc}")

    def _show_model(self, *_: Any) -> None:
        self.model_label.setText(self.session.describe())
        with self.model.changed.blocked():  # follow the session without loading anything
            self.model.reset_choices()
            self.model.value = self._current_model_key()

    def _model_choices(self, *_: Any) -> list[tuple[str, str]]:
        """Bundled model, this window's model if it has no file, recent model files."""
        choices = [(f"{bundled_name()} (bundled)", BUNDLED)]
        session = getattr(self, "session", None)
        if session is not None and session.loaded and self._current_model_key() == SESSION_MODEL:
            choices.insert(0, (f"{session.active().name} (this window)", SESSION_MODEL))
        current = self._current_model_key() if session is not None else None
        for name, path in recent_models():
            choices.append((f"{name} ({path.name})", str(path)))
        if current not in (None, BUNDLED, SESSION_MODEL) and current not in [c[1] for c in choices]:
            choices.append((f"{Path(current).name}", current))
        return choices

    def _current_model_key(self) -> str:
        source = self.session.source
        if source == "bundled default":
            return BUNDLED
        if source.endswith(".safetensors"):
            return str(Path(source).resolve())
        return SESSION_MODEL

    def _model_picked(self, key: str | None) -> None:
        if key is None or key == self._current_model_key():
            return
        try:
            if key == BUNDLED:
                self.session.use_bundled()
            elif key != SESSION_MODEL:
                self.load_model_file(key)
        except (ValueError, OSError) as exc:
            show_warning(f"Could not load the model: {exc}")
            self._show_model()

    def load_model_file(self, path: str | Path | None = None) -> Any:
        """Load a ``.safetensors`` model file (asks for one if ``path`` is None); returns it."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(
                self, "Open S2M-Net model", "", "S2M-Net model (*.safetensors)"
            )
            if not path:
                return None
        path = Path(path).resolve()
        if not path.is_file():
            show_warning(f"Choose an existing .safetensors model file (got {str(path)!r}).")
            return None
        try:
            bundle = self.session.load_file(path)
        except (ValueError, OSError) as exc:
            show_warning(f"Could not load {path.name}: {exc}")
            self._show_model()
            return None
        remember_model(path, bundle.name)
        self._show_model()
        show_info(f"Loaded model {bundle.name!r} from {path.name}")
        return bundle

    def start_new_model(self, *_: Any) -> None:
        """Make a randomly initialised model of the chosen architecture active (for training)."""
        from napari_s2mnet.checkpoint import new_model
        from napari_s2mnet.model import ModelConfig

        arch = self.new_arch.value
        bundle = new_model(ModelConfig(arch=arch, in_channels=1), name=f"{arch} (untrained)")
        self.session.set_active(bundle, "new in this session")
        show_info(f"Untrained {arch} model active: fine-tune it before segmenting.")

    # -- running -------------------------------------------------------------------------------
    def config(self) -> InferenceConfig:
        """The inference config the widget currently describes."""
        return InferenceConfig(
            device=self.device.value,
            input_transform=self.input_transform.value,
            **form_values(self.advanced),
            **form_values(self.size_form),
        )

    def run(self) -> Any:
        """Start segmentation of the selected image layer; returns the worker."""
        from napari_s2mnet._qt._workers import start_worker
        from napari_s2mnet.inference import segment_iter

        layer = self.image.value
        if layer is None:
            show_warning("Open an image first (File > Open, or File > Open Sample > S2M-Net).")
            return None
        if self.worker is not None:
            show_warning("A segmentation is already running; cancel it first.")
            return None
        job = self._model_and_layout(layer)
        if job is None:
            return None
        model, channel_axis, layout = job
        if self.input_channel.value not in (None, ALL_CHANNELS):
            layout = dataclasses.replace(layout, channels=(int(self.input_channel.value),))
        # The engine wants one pixel size per non-channel axis (napari has none for RGB).
        spacing = tuple(float(s) for i, s in enumerate(layer.scale) if i != channel_axis)
        data = np.asarray(layer.data)
        self.status.setText(f"Segmenting {layer.name!r}...")
        self.progress.busy("preparing...")
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        layer_ref = weakref.ref(layer)
        self._result_drop_axis = channel_axis
        self.worker = start_worker(
            segment_iter,
            data,
            model,
            self.config(),
            layout=layout,
            spacing=spacing,
            desc=f"S2M-Net: {layer.name}",
            on_yield=self._report,
            on_return=lambda result: self._add_result(layer_ref, result),
            on_finish=self._finished,
            on_error=self._errored,
        )
        self.worker.aborted.connect(self._aborted)
        return self.worker

    def _model_and_layout(self, layer: Image) -> tuple[Any, int | None, Any] | None:
        """The active model, the chosen channel axis and the layer's layout; ``None`` (with a
        warning) when no model can be loaded."""
        try:
            model = self.session.active()
        except (ValueError, OSError, FileNotFoundError) as exc:
            show_warning(f"No usable model: {exc}")
            return None
        channel_axis = self._chosen_channel_axis()
        return model, channel_axis, _layout_of(layer, channel_axis)

    def estimate_diameter(self) -> Any:
        """Measure the typical object diameter of the selected image with the active model (in
        the background) and put it in "object diameter"; returns the worker."""
        import dataclasses as dc

        from napari_s2mnet._qt._workers import start_worker

        layer = self.image.value
        if layer is None or self.estimate_worker is not None:
            return None
        job = self._model_and_layout(layer)
        if job is None:
            return None
        model, _, layout = job
        self.estimate_button.enabled = False
        self.status.setText(f"Estimating the object diameter in {layer.name!r}...")

        def done(value: float | None) -> None:
            if value is None:
                self.status.setText("No objects found: the diameter could not be estimated.")
                return
            self.size_form["diameter"].value = round(float(value), 1)
            self.status.setText(f"Estimated object diameter: {value:.1f} px.")

        def finished() -> None:
            self.estimate_worker = None
            self.estimate_button.enabled = True

        self.estimate_worker = start_worker(
            _estimate_job,
            np.asarray(layer.data),
            model,
            dc.replace(self.config(), diameter=None),
            layout,
            desc="S2M-Net: object diameter",
            on_return=done,
            on_finish=finished,
        )
        return self.estimate_worker

    def _report(self, report: Progress) -> None:
        """Planes and tiles done, in the widget (the activity dock shows the same bar)."""
        if report.total:
            self.progress.report(report.done, report.total, report.message)

    def _aborted(self) -> None:
        self.status.setText("Cancelled: nothing was added.")
        self.progress.finish("cancelled", complete=False)

    def show_table(self) -> Any:
        """Open napari's features table for the newest result (or the selected labels layer)."""
        active = self.viewer.layers.selection.active
        layer = active if isinstance(active, Labels) else None
        if layer is None:
            results = [ref() for ref in self._last_result.values()]
            layer = next((r for r in reversed(results) if r in self.viewer.layers), None)
        if layer is None:
            layer = next(
                (lyr for lyr in reversed(self.viewer.layers) if isinstance(lyr, Labels)), None
            )
        if layer is None:
            show_warning("Segment an image (or open a labels layer) first.")
            return None
        return show_features_table(self.viewer, layer, anchor=self)

    def _chosen_channel_axis(self) -> int | None:
        axis = self.channel_axis.value
        return None if axis is None or axis == NO_CHANNEL_AXIS else int(axis)

    def cancel(self) -> None:
        """Stop the running segmentation at its next step; nothing is added."""
        if self.worker is not None:
            self.worker.quit()

    def _finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def _errored(self, exc: BaseException) -> None:
        # start_worker already shows the error as a napari notification (with its traceback).
        self.status.setText(f"Failed: {exc}")
        self.progress.finish("failed", complete=False)

    def _add_result(self, layer_ref: weakref.ref, result: SegmentationResult) -> None:
        image = layer_ref()
        if image is None:
            self.status.setText("The image layer was removed while segmenting; result discarded.")
            return
        labels = paintable_labels(result.labels)
        nd = labels.ndim
        meta = _spatial_meta(image, nd, drop_axis=self._result_drop_axis)
        previous = self._last_result.get(id(image))
        target = previous() if previous is not None else None
        if (
            target is not None
            and target in self.viewer.layers
            and not _layers.info(target).edited
            and target.data.shape == labels.shape
        ):
            target.data = labels  # our own untouched result: update in place
            target.features = result.features
            out = target
        else:
            out = Labels(labels, name=f"{image.name} S2M-Net", features=result.features, **meta)
        # Before the layer is added: widgets that list (image, labels) pairs on insertion
        # must see where it came from, not guess an image of the same shape.
        inf = _layers.info(out)
        inf.source, inf.made_by_plugin, inf.edited = weakref.ref(image), True, False
        inf.spacing = tuple(float(s) for s in out.scale[-2:])
        inf.core = None
        present(out)  # before insertion too: the features table shows the final columns
        if out not in self.viewer.layers:
            self.viewer.add_layer(out)
            self._last_result[id(image)] = weakref.ref(out)
        if result.uncertainty is not None:
            self.viewer.add_image(
                result.uncertainty,
                name=f"{image.name} uncertainty",
                colormap="inferno",
                opacity=0.5,
                blending="additive",
                contrast_limits=(0.0, 1.0),
                **meta,
            )
        n = len(result.features) if result.features is not None else 0
        messages = "; ".join(result.messages)
        self.status.setText(
            f"Done: {n} objects in {out.name!r} ({result.device}, {result.backend}). {messages}".strip()
        )
        for note in result.messages:  # each note may mean the input was not read as meant
            show_warning(note)
        self.progress.finish(f"done: {n} objects")


def paintable_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` in at least ``uint16``.

    The core returns the smallest dtype (uint8 below 256 objects, right for export), but napari
    refuses to paint a label the dtype cannot hold, and users add objects while correcting.
    """
    dtype = np.promote_types(labels.dtype, np.uint16)
    return labels if dtype == labels.dtype else labels.astype(dtype)


def _layout_of(layer: Image, channel_axis: int | None = None) -> Any:
    """The core's ImageLayout for a napari image layer (``channel_axis``: a non-RGB channel axis)."""
    from napari_s2mnet.inference import ImageLayout

    names = [str(n) for n in getattr(layer, "axis_labels", ()) or ()]
    if names == [str(i - len(names)) for i in range(len(names))]:
        names = []  # napari's placeholders ('-3', '-2', '-1'): let the engine say z / t
    if channel_axis is not None and not layer.rgb and channel_axis < len(names):
        del names[channel_axis]
    lead = tuple(names[:-2])  # the engine names only the axes before (Y, X), e.g. ("t", "z")
    if layer.rgb:
        return ImageLayout(rgb=True, channel_axis=-1, axis_names=lead or None)
    return ImageLayout(channel_axis=channel_axis, axis_names=lead or None)


def _spatial_meta(image: Image, nd: int, drop_axis: int | None = None) -> dict[str, Any]:
    """scale/translate/axis labels/units of ``image`` for an ``nd``-D output.

    ``drop_axis`` is the image's channel axis (absent from the output), if any.
    """

    def keep(values: Any) -> tuple:
        values = [v for i, v in enumerate(values) if i != drop_axis]
        return tuple(values[-nd:])

    meta: dict[str, Any] = {"scale": keep(image.scale), "translate": keep(image.translate)}
    axis_labels = getattr(image, "axis_labels", None)
    if axis_labels is not None:
        meta["axis_labels"] = keep(axis_labels)
    units = getattr(image, "units", None)
    if units is not None:
        meta["units"] = keep(units)
    return meta


def _estimate_job(data: np.ndarray, model: Any, config: InferenceConfig, layout: Any) -> Any:
    """Generator for the worker: :func:`napari_s2mnet.diameter.estimate_diameter`."""
    from napari_s2mnet.diameter import estimate_diameter

    yield Progress(0, 1, "estimate", "measuring objects")
    return estimate_diameter(data, model, config, layout=layout)
