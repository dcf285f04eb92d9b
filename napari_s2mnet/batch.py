"""Command-line batch work on files: ``predict`` (:func:`predict_paths`) and ``train``.

One text progress bar (:class:`TextProgress`) and one path expander (:func:`expand_paths`, image
suffixes from :data:`napari_s2mnet.io.IMAGE_SUFFIXES`) serve both commands.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_s2mnet.inference import InferenceConfig, Progress, run_to_end, segment_iter
from napari_s2mnet.io import IMAGE_SUFFIXES
from napari_s2mnet.layout import ImageLayout, guess_layout

__all__ = ["TextProgress", "expand_paths", "predict_paths"]

log = logging.getLogger(__name__)

# Images that ``predict`` takes from a folder: .npy files there are usually other arrays (saved
# labels, features); a .npy file named on its own is read as an image.
_FOLDER_IMAGE_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".npy")


def expand_paths(
    inputs: Sequence[str | os.PathLike],
    what: str = "image",
    *,
    strict: bool = False,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> tuple[list[Path], list[Path]]:
    """Files named in ``inputs``, folders replaced by their image files (sorted, not recursive).

    Hidden files and files whose suffix is not in ``suffixes`` are left out of folders; files
    named explicitly are kept whatever their suffix (the reader then says if it cannot read one).

    Args:
        inputs: Files and folders.
        what: What the files are (``"image"``, ``"label"``), for messages.
        strict: Raise on a path that does not exist or a folder without files; otherwise such
            paths are returned / logged and the others still used.
        suffixes: Lower-case suffixes taken from folders.

    Returns:
        The files, and the paths that do not exist (always empty when ``strict``).

    Raises:
        FileNotFoundError / ValueError: ``strict`` and a missing path / a folder without files.
    """
    files: list[Path] = []
    missing: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
            )
            if not found and strict:
                raise ValueError(f"No {what} files ({', '.join(suffixes)}) in folder {path}.")
            ignored = [p.name for p in path.iterdir() if p.is_file() and p not in found]
            if ignored:
                log.info("%s: ignoring %d non-%s file(s): %s", path, len(ignored), what,
                         ", ".join(sorted(ignored)[:5]))
            if not found:
                log.warning("%s: no %s files (%s) in this folder.", path, what, ", ".join(suffixes))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif strict:
            raise FileNotFoundError(f"{what.capitalize()} path {path} does not exist.")
        else:
            missing.append(path)
    return files, missing


class TextProgress:
    """A one-line text progress bar on a stream (``sys.stderr`` by default).

    On a terminal, :meth:`show` rewrites the line in place (at most every ``interval`` seconds,
    except a final update); elsewhere (a log file, a pipe) it writes nothing, and only
    :meth:`line` writes, so logs get a few whole lines instead of hundreds of updates.

    Args:
        stream: Text stream to write to.
        width: Characters of the bar itself.
        columns: Width of the in-place line (longer text is cut).
        interval: Least seconds between two in-place updates.
    """

    def __init__(
        self, stream: Any = None, *, width: int = 24, columns: int = 150, interval: float = 0.1
    ) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.columns = columns
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = 0.0  # time of the last in-place update
        self.last_line = 0.0  # time of the last whole line (time.monotonic())

    def bar(self, fraction: float) -> str:
        """``[####....]`` filled to ``fraction`` (clipped to ``[0, 1]``)."""
        filled = round(self.width * min(1.0, max(0.0, fraction)))
        return "[" + "#" * filled + "." * (self.width - filled) + "]"

    def show(self, text: str, *, final: bool = False) -> None:
        """Rewrite the line in place (terminals only); ``final`` updates are never skipped."""
        if not self.tty:
            return
        now = time.monotonic()
        if now - self.last < self.interval and not final:
            return
        self.last = now
        self.stream.write("\r" + text[: self.columns].ljust(self.columns))
        self.stream.flush()

    def line(self, text: str) -> None:
        """Write ``text`` as a line of its own (on a terminal: replacing the in-place line)."""
        if self.tty:
            self.stream.write("\r" + " " * self.columns + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_line = time.monotonic()

    def finish(self) -> None:
        """End the in-place line (terminals), so later output starts on a new line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _show_progress(bar: TextProgress, head: str, p: Progress) -> None:
    """One image's progress: in place on a terminal, one line when it is done elsewhere."""
    text = f"{head} {bar.bar(p.fraction)} {100 * p.fraction:5.1f}% {p.message}"
    if bar.tty:
        bar.show(text, final=p.done >= p.total)
    elif p.stage == "done":
        bar.line(text)


def predict_paths(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    device: str = "auto",
    tile_size: int | None = None,
    threshold: float | None = None,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    config: InferenceConfig | None = None,
    stream: Any = None,
) -> int:
    """Segment image files and folders; write ``<stem>_labels.tif`` and ``<stem>_features.csv``.

    Unreadable files are logged and skipped; the others are still processed.

    Args:
        inputs: Image files (TIFF, PNG, JPG) or folders of them (not recursive).
        output: Output folder (created when missing).
        model_path: ``.safetensors`` model; ``None`` for the bundled default model.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        tile_size: Tile side in pixels (default: :class:`InferenceConfig`'s).
        threshold: Probability threshold (default: the model's).
        channel_axis: Axis holding channels, if any (RGB(A) files and TIFFs whose axes name a
            ``C`` axis are recognised by themselves).
        channels: Channels that feed the model, in order (see :attr:`ImageLayout.channels`).
        config: Base settings (the arguments above override it).
        stream: Where the progress line goes (default ``sys.stderr``).

    Returns:
        Exit code: 0 when every image was segmented, 1 when some were skipped.

    Raises:
        FileNotFoundError / ValueError: No model, no input image at all, or a bad setting.
    """
    from napari_s2mnet import checkpoint
    from napari_s2mnet.io import load_image, write_features_csv, write_labels

    cfg = dataclasses.replace(config or InferenceConfig(), device=device)
    if tile_size is not None:
        cfg.tile_size = int(tile_size)
    if threshold is not None:
        cfg.threshold = float(threshold)
    cfg.validate()
    files, missing = expand_paths(inputs, suffixes=_FOLDER_IMAGE_SUFFIXES)
    for path in missing:
        log.error("%s: no such file or folder; skipped.", path)
    if not files:
        raise FileNotFoundError(
            "No input images found in " + ", ".join(str(p) for p in inputs)
            + f" (supported: {', '.join(_FOLDER_IMAGE_SUFFIXES)})."
        )
    if model_path is not None:
        bundle = checkpoint.load_model(model_path)
    else:
        bundle = checkpoint.load_default_model()
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"Output {out_dir} exists and is not a folder; choose a folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("model: %s; %d image(s) -> %s", bundle.name, len(files), out_dir)

    bar = TextProgress(stream)
    skipped = len(missing)
    used: set[str] = set()
    for n, path in enumerate(files, start=1):
        head = f"[{n}/{len(files)}] {path.name}"
        try:
            img = load_image(path)
            if channel_axis is not None:
                layout = ImageLayout(channel_axis=channel_axis)
            elif "C" in img.axes and len(img.axes) == img.data.ndim:  # a TIFF that says so
                layout = ImageLayout(channel_axis=img.axes.index("C"))
            else:  # colour as the file declares it, else napari's guess
                layout = guess_layout(img.data.shape, rgb=True if img.rgb else None)
            if channels is not None:
                layout = dataclasses.replace(layout, channels=tuple(channels))
            spacing = img.spacing
            n_plain = img.data.ndim - (layout.channel_axis is not None)
            if spacing is not None and len(spacing) != n_plain:
                spacing = spacing[-2:]  # Y and X are the last axes of every TIFF series
            result = run_to_end(
                segment_iter(img.data, bundle, cfg, layout, spacing),
                lambda p, head=head: _show_progress(bar, head, p),
            )
        except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as exc:
            bar.finish()
            log.error("%s: skipped: %s", path, exc)
            skipped += 1
            continue
        bar.finish()
        for note in result.messages:
            log.info("%s: %s", path.name, note)
        stem = path.stem
        if stem in used:  # same name from two folders: keep both
            i = 2
            while f"{path.stem}_{i}" in used:
                i += 1
            stem = f"{path.stem}_{i}"
            log.warning("%s: another input has the same name; writing %s_*", path, stem)
        used.add(stem)
        axes = {2: "YX", 3: "ZYX", 4: "TZYX"}[result.labels.ndim]
        write_labels(out_dir / f"{stem}_labels.tif", result.labels,
                     spacing=result.spacing if img.spacing is not None else None,
                     unit=img.unit, axes=axes)
        write_features_csv(result.features, out_dir / f"{stem}_features.csv")
        log.info("%s: %d objects, %.1f s on %s", path.name, len(result.features),
                 result.timings.get("total", math.nan), result.device)
    if skipped:
        log.warning("%d of %d input(s) skipped (see the errors above).", skipped,
                    len(files) + len(missing))
        return 1
    return 0
