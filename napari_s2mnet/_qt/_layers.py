"""Bookkeeping about layers the plugin made: which image a labels layer came from, whether the user
edited it, and debounced feature refresh after paint strokes. Layer objects are held weakly and never
keyed by name (users rename layers)."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer


@dataclass
class LabelsInfo:
    """What the plugin knows about one labels layer."""

    source: weakref.ref | None = None  # the image layer it was segmented from
    edited: bool = False  # the user painted, erased or filled since it was made
    made_by_plugin: bool = False
    spacing: tuple[float, ...] = (1.0, 1.0)
    touched: set[int] = field(default_factory=set)
    planes: set[tuple[int, ...]] = field(default_factory=set)  # edited planes of a stack
    painted: np.ndarray | None = None  # pixels the user painted, filled or erased (bool)
    timer: QTimer | None = None
    core: Any = None  # the core features table; layer.features shows it with units (_table)

    def source_layer(self) -> Any | None:
        """The source image layer, if it still exists."""
        return self.source() if self.source is not None else None


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def info(layer: Any) -> LabelsInfo:
    """The :class:`LabelsInfo` of a labels layer (created empty on first use)."""
    if layer not in _INFO:
        _INFO[layer] = LabelsInfo()
        _watch_edits(layer)
    return _INFO[layer]


def known_info(layer: Any) -> LabelsInfo | None:
    """The :class:`LabelsInfo` of a layer the plugin already tracks, else ``None`` (no side
    effects, unlike :func:`info`)."""
    return _INFO.get(layer)


class LayerWatcher:
    """Calls ``on_change()`` when a layer is inserted, removed or renamed.

    magicgui's combo boxes match choices by name, and napari's layer list says nothing on a
    rename, so pickers need each layer's ``events.name``: connected on insert, disconnected on
    remove. ``per_layer`` maps further layer event names (e.g. ``"paint"``) to callbacks that are
    connected the same way, on the layers that have that event. Keep the watcher referenced:
    napari's emitters hold bound methods weakly.
    """

    def __init__(
        self,
        layers: Any,
        on_change: Callable[[], None],
        per_layer: dict[str, Callable[[Any], None]] | None = None,
    ) -> None:
        self._on_change = on_change
        self._per_layer: dict[str, Callable[[Any], None]] = {
            "name": self._changed,
            **(per_layer or {}),
        }
        layers.events.inserted.connect(self._inserted)
        layers.events.removed.connect(self._removed)
        for layer in layers:
            self._connect(layer, True)

    def _connect(self, layer: Any, connect: bool) -> None:
        for name, callback in self._per_layer.items():
            emitter = getattr(layer.events, name, None)
            if emitter is None:
                continue
            if connect:
                emitter.connect(callback)
            else:
                emitter.disconnect(callback)

    def _inserted(self, event: Any) -> None:
        self._connect(event.value, True)
        self._on_change()

    def _removed(self, event: Any) -> None:
        self._connect(event.value, False)
        self._on_change()

    def _changed(self, *_: Any) -> None:
        self._on_change()


def refresh_layer_combo(combo: Any) -> None:
    """Re-read a layer combo box's choices, keeping its current layer by identity.

    magicgui keys the items by name, so after a rename it would drop the current item and select
    another layer; the previous layer object is put back when it is still a choice.
    """
    current = combo.value
    with combo.changed.blocked():
        combo.reset_choices()
        if current is not None and any(c is current for c in combo.choices):
            combo.value = current
    if combo.value is not current:
        combo.changed.emit(combo.value)


def touched_ids(paint_item: Any) -> set[int]:
    """Label ids a napari paint history item changed (old and new values)."""
    ids: set[int] = set()
    for atom in paint_item or []:
        # Both history atom kinds end with (old values, new value).
        old, new = atom[-2], atom[-1]
        ids.update(int(v) for v in np.unique(np.asarray(old)))
        ids.update(int(v) for v in np.unique(np.asarray(new)))
    ids.discard(0)
    return ids


def touched_planes(paint_item: Any, shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Leading indices of the 2-D planes of a stack that a napari paint history item changed."""
    n_lead = len(shape) - 2
    planes: set[tuple[int, ...]] = set()
    for atom in (paint_item or []) if n_lead >= 1 else []:
        keys = tuple(atom[0])[:n_lead]  # slices (mask-based edits) or index arrays (setitem)
        if all(isinstance(k, slice) for k in keys):
            ranges = [range(*k.indices(n)) for k, n in zip(keys, shape, strict=False)]
            planes.update(itertools.product(*ranges))
        else:  # index arrays: coordinates of single pixels, one plane per distinct prefix
            lead = np.stack(
                [np.broadcast_to(np.asarray(k), np.shape(keys[-1])).ravel() for k in keys], axis=1
            )
            planes.update(tuple(int(v) for v in row) for row in np.unique(lead, axis=0))
    return planes


def mark_painted(painted: np.ndarray | None, paint_item: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``painted`` (bool, the layer's shape; new if ``None`` or reshaped) with the pixels of a
    napari paint history item set: what the user painted, filled or erased (issue 14)."""
    if painted is None or painted.shape != tuple(shape):
        painted = np.zeros(shape, bool)
    for atom in paint_item or []:
        mask = getattr(atom, "mask", None)  # napari 0.9 mask-based atom: (slice_key, mask, ...)
        key = atom.slice_key if hasattr(atom, "slice_key") else atom[0]
        if hasattr(atom, "slice_key") and mask is not None:
            painted[key] |= np.asarray(mask, bool)
        else:  # the whole window, or the index arrays of data_setitem
            painted[key] = True
    return painted


def _watch_edits(layer: Any) -> None:
    layer_ref = weakref.ref(layer)

    def on_paint(event: Any) -> None:
        lyr = layer_ref()
        if lyr is None:
            return
        inf = _INFO[lyr]
        inf.edited = True
        item = getattr(event, "value", None)
        inf.touched |= touched_ids(item)
        inf.planes |= touched_planes(item, np.shape(lyr.data))
        inf.painted = mark_painted(inf.painted, item, np.shape(lyr.data))
        if inf.timer is None:
            inf.timer = QTimer()
            inf.timer.setSingleShot(True)
            inf.timer.setInterval(300)  # debounce: one refresh per burst of strokes
            inf.timer.timeout.connect(lambda: refresh_features(layer_ref()))
        inf.timer.start()

    layer.events.paint.connect(on_paint)


def refresh_features(layer: Any, full: bool = False) -> None:
    """Recompute the morphology features of the touched labels (or all with ``full``)."""
    if layer is None:
        return
    from napari_s2mnet.morphology import (
        FEATURE_COLUMNS,
        object_features,
        update_features,
        update_stack_features,
    )

    inf = _INFO.get(layer)
    touched = set() if inf is None else inf.touched
    data = np.asarray(layer.data)
    spacing = inf.spacing if inf is not None else tuple(layer.scale[-2:])
    df = inf.core if inf is not None and inf.core is not None else layer.features
    if data.ndim == 2:
        if full or df is None or len(df) == 0 or "label" not in df:
            layer.features = object_features(data, spacing=spacing)
        elif touched:
            layer.features = update_features(df, data, sorted(touched), spacing=spacing)
    elif touched and df is not None and "volume_vox" in df:
        # Stacks labelled in 3-D by the engine: one row of 3-D morphology per object.
        from napari_s2mnet.morphology3d import FEATURE_COLUMNS_3D, update_features_3d

        lead = [c for c in df.columns if c not in FEATURE_COLUMNS_3D]
        if len(lead) == data.ndim - 3:
            layer.features = update_features_3d(
                df, data, touched, lead_names=lead, spacing=tuple(layer.scale[-3:])
            )
    elif touched and inf is not None and inf.planes and df is not None and "label" in df:
        # Stacks from the engine: one row per id, the plane in the extra (z / t) columns.
        lead = [c for c in df.columns if c not in FEATURE_COLUMNS]
        if len(lead) == data.ndim - 2:  # instance stacks (semantic ones are per class)
            layer.features = update_stack_features(
                df, data, touched, inf.planes, lead, spacing=spacing
            )
    from napari_s2mnet._qt._table import present

    present(layer)  # units, centroid, intensity: the table the user reads
    if inf is not None:
        inf.touched = set()
        inf.planes = set()
