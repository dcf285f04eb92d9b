"""The model picker's list: the bundled model and the model files used or saved recently.

Recent files are kept in a small JSON file in the user's config folder (``S2MNET_CONFIG_DIR``
overrides it, e.g. for tests), newest first. Entries whose file has gone are dropped on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BUNDLED = "bundled"  # the picker's key for the model shipped with the plugin
MAX_RECENT = 8


def _store() -> Path:
    folder = os.environ.get("S2MNET_CONFIG_DIR")
    if not folder:
        from platformdirs import user_config_dir

        folder = user_config_dir("napari-s2mnet", appauthor=False)
    return Path(folder) / "recent_models.json"


def recent_models() -> list[tuple[str, Path]]:
    """(model name, file) of recently loaded or saved models that still exist, newest first."""
    try:
        entries = json.loads(_store().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    out = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            path = Path(entry["path"])
            name = str(entry.get("name") or path.stem)
        except (KeyError, TypeError):
            continue
        if path.is_file():
            out.append((name, path))
    return out[:MAX_RECENT]


def remember_model(path: str | Path, name: str) -> None:
    """Put ``path`` first in the recent list (best effort: an unwritable config is ignored)."""
    path = Path(path).resolve()
    keep = [{"path": str(p), "name": n} for n, p in recent_models() if p.resolve() != path]
    entries = [{"path": str(path), "name": name}, *keep][:MAX_RECENT]
    store = _store()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
        tmp.replace(store)  # atomic: a crash never leaves half a list
    except OSError:
        pass


def bundled_name() -> str:
    """The display name of the model shipped with the plugin (from its file header)."""
    from napari_s2mnet.checkpoint import default_model_path, read_header

    try:
        meta = read_header(default_model_path()).get("metadata", {}) or {}
    except (OSError, ValueError):
        return "S2M-Net (bundled)"
    return str(meta.get("name") or "S2M-Net (bundled)")
