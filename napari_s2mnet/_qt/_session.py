"""The active model, shared by the Segment and Fine-tune widgets of one viewer.

Fine-tuning makes the new model active for Segment; Revert goes back. One session per viewer.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psygnal import Signal

if TYPE_CHECKING:  # pragma: no cover
    from napari_s2mnet.checkpoint import ModelBundle


class ModelSession:
    """Holds the active :class:`ModelBundle` and the ones it replaced.

    Loading is lazy: the bundled default model is read the first time it is needed.
    """

    changed = Signal()

    def __init__(self) -> None:
        self._active: ModelBundle | None = None
        self._source: str = "bundled default"
        self._previous: list[tuple[ModelBundle | None, str]] = []

    @property
    def loaded(self) -> bool:
        """Whether a model is loaded (or only the default is pending)."""
        return self._active is not None

    @property
    def source(self) -> str:
        """Where the active model came from (file, 'bundled default', 'fine-tuned in session')."""
        return self._source

    @property
    def can_revert(self) -> bool:
        """Whether there is a previous model to go back to."""
        return bool(self._previous)

    def active(self) -> ModelBundle:
        """The active model (loads the bundled default on first use)."""
        if self._active is None:
            from napari_s2mnet.checkpoint import load_default_model

            self._active = load_default_model()
            self._source = "bundled default"
            self.changed.emit()
        return self._active

    def set_active(self, bundle: ModelBundle, source: str) -> None:
        """Make ``bundle`` active; the current one can be restored with :meth:`revert`."""
        self._previous.append((self._active, self._source))
        self._active, self._source = bundle, source
        self.changed.emit()

    def load_file(self, path: str | Path) -> ModelBundle:
        """Load a ``.safetensors`` model file and make it active (errors leave the session as is)."""
        from napari_s2mnet.checkpoint import load_model

        bundle = load_model(path)
        self.set_active(bundle, str(path))
        return bundle

    def use_bundled(self) -> ModelBundle:
        """Make the model shipped with the plugin active (loaded again: it may be fine-tuned)."""
        from napari_s2mnet.checkpoint import load_default_model

        bundle = load_default_model()
        self.set_active(bundle, "bundled default")
        return bundle

    def revert(self) -> None:
        """Go back to the model that was active before the last change."""
        if not self._previous:
            raise RuntimeError("There is no previous model to revert to.")
        self._active, self._source = self._previous.pop()
        self.changed.emit()

    def describe(self) -> str:
        """One line in plain words: which model, where it came from, what it was trained on."""
        if self._active is None:
            return "Model: the bundled nuclei model (loads on first use)."
        meta: dict[str, Any] = self._active.metadata
        line = f"Model: {self._active.name}, {_source_words(self._source)}"
        history = meta.get("history") or []
        if history and self._source not in ("bundled default",):
            last = history[-1]
            when = str(last.get("date", last.get("finished", "")))[:16].replace("T", " ")
            n = last.get("n_images", meta.get("trained_on"))
            images = f" on {n} image{'s' if n != 1 else ''}" if n is not None else ""
            line += f"; last trained {when} UTC{images}" if when else f"; trained{images}"
        return line + "."


def _source_words(source: str) -> str:
    """The session's source tag as a user reads it."""
    words = {
        "bundled default": "bundled with the plugin",
        "fine-tuned in this session": "fine-tuned in this window",
        "new in this session": "untrained (fine-tune it before segmenting)",
    }
    if source in words:
        return words[source]
    if source.endswith(".safetensors"):
        return f"from file {Path(source).name}"
    return source


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_session(viewer: Any) -> ModelSession:
    """The model session of ``viewer`` (created on first use)."""
    try:
        return _SESSIONS[viewer]
    except KeyError:
        session = _SESSIONS[viewer] = ModelSession()
        return session
