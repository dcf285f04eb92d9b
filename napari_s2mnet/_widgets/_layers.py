"""Bookkeeping about layers the plugin made: which image a labels layer came from, whether the user
edited it, and debounced feature refresh after paint strokes. Layer objects are held weakly and never
keyed by name (users rename layers)."""

from __future__ import annotations

import weakref
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
    timer: QTimer | None = None

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


def _watch_edits(layer: Any) -> None:
    layer_ref = weakref.ref(layer)

    def on_paint(event: Any) -> None:
        lyr = layer_ref()
        if lyr is None:
            return
        inf = _INFO[lyr]
        inf.edited = True
        inf.touched |= touched_ids(getattr(event, "value", None))
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
    from napari_s2mnet.morphology import object_features, update_features

    inf = _INFO.get(layer)
    touched = set() if inf is None else inf.touched
    data = np.asarray(layer.data)
    spacing = inf.spacing if inf is not None else tuple(layer.scale[-2:])
    if data.ndim != 2:
        return  # per-slice features of stacks are refreshed by re-segmenting (see docs)
    df = layer.features
    if full or df is None or len(df) == 0 or "label" not in df:
        layer.features = object_features(data, spacing=spacing)
    elif touched:
        layer.features = update_features(df, data, sorted(touched), spacing=spacing)
    if inf is not None:
        inf.touched = set()
