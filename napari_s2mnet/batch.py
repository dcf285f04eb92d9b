"""Command-line batch work on files: ``predict`` (:func:`predict_paths`) and ``train``
(:func:`train_paths`).

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
from typing import TYPE_CHECKING, Any

from napari_s2mnet.inference import InferenceConfig, Progress, run_to_end, segment_iter
from napari_s2mnet.io import IMAGE_SUFFIXES
from napari_s2mnet.layout import ImageLayout, guess_layout

if TYPE_CHECKING:  # pragma: no cover
    from napari_s2mnet.training import TrainReport

__all__ = [
    "LABEL_SUFFIXES",
    "TextProgress",
    "expand_paths",
    "pair_files",
    "predict_paths",
    "train_paths",
]

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
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
            )
            if not found and strict:
                raise ValueError(f"No {what} files ({', '.join(suffixes)}) in folder {path}.")
            ignored = [p.name for p in path.iterdir() if p.is_file() and p not in found]
            if ignored:
                log.info(
                    "%s: ignoring %d non-%s file(s): %s",
                    path,
                    len(ignored),
                    what,
                    ", ".join(sorted(ignored)[:5]),
                )
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

    An image that cannot be read, segmented or written (full disk, read-only output ...) is
    reported with the reason and skipped; the others are still processed, and a summary at the
    end lists every failure.

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
        Exit code: 0 when every image was segmented and written, 1 when some failed.

    Raises:
        FileNotFoundError / ValueError: No model, no input image at all, or a bad setting.
    """
    from napari_s2mnet import checkpoint
    from napari_s2mnet.io import load_image, write_features_csv, write_labels
    from napari_s2mnet.measure import measurement_table

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
            "No input images found in "
            + ", ".join(str(p) for p in inputs)
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
    failed: list[tuple[Path, str]] = [(p, "no such file or folder") for p in missing]
    used: set[str] = set()
    for n, path in enumerate(files, start=1):
        head = f"[{n}/{len(files)}] {path.name}"
        try:
            stem = _unique_stem(path, used)
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
            bar.finish()
            for note in result.messages:
                log.warning("%s: %s", path.name, note)
            # Writing is part of the image's work: a full disk or a read-only folder fails this
            # image (reported below) and the run goes on with the next one.
            axes = {2: "YX", 3: "ZYX", 4: "TZYX"}[result.labels.ndim]
            write_labels(
                out_dir / f"{stem}_labels.tif",
                result.labels,
                spacing=result.spacing if img.spacing is not None else None,
                unit=img.unit,
                axes=axes,
            )
            # The table a user reads in napari: units in the names, centroid, intensity.
            table = measurement_table(
                result.features,
                result.labels,
                spacing=result.spacing if img.spacing is not None else None,
                unit=img.unit,
                image=_gray(img.data, layout, result.labels.shape),
            )
            write_features_csv(table, out_dir / f"{stem}_features.csv")
        except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as exc:
            bar.finish()
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
            log.error("%s: skipped: %s", path, reason)
            failed.append((path, reason))
            continue
        log.info(
            "%s: %d objects, %.1f s on %s",
            path.name,
            len(result.features),
            result.timings.get("total", math.nan),
            result.device,
        )
    total = len(files) + len(missing)
    if failed:
        lines = [f"{len(failed)} of {total} input(s) failed:"]
        lines += [f"  {p}: {why}" for p, why in failed]
        bar.line("\n".join(lines))
        return 1
    bar.line(f"All {total} image(s) segmented; results in {out_dir}.")
    return 0


def _gray(data: Any, layout: ImageLayout, shape: tuple[int, ...]) -> Any:
    """``data`` as one gray value per labels pixel (channels averaged), or ``None`` if it does
    not line up with the labels (the table then has no intensity columns)."""
    import numpy as np

    arr = np.asarray(data)
    if layout.channel_axis is not None:
        arr = np.moveaxis(arr, layout.channel_axis, -1).mean(axis=-1, dtype=np.float32)
    return arr if arr.shape == tuple(shape) else None


def _unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem, numbered when another input already had it (same name, two folders)."""
    stem = path.stem
    if stem in used:
        i = 2
        while f"{path.stem}_{i}" in used:
            i += 1
        stem = f"{path.stem}_{i}"
        log.warning("%s: another input has the same name; writing %s_*", path, stem)
    used.add(stem)
    return stem


#: Name endings that mark a label file: ``day1_labels.tif`` pairs with the image ``day1.tif``.
LABEL_SUFFIXES = (
    "_labels",
    "_label",
    "_masks",
    "_mask",
    "_seg",
    "_segmentation",
    "_instances",
    "_gt",
)


def _stem(path: Path) -> str:
    """File name without its image suffix (``.ome.tif`` counts as one), lower case."""
    name = path.name.lower()
    for double in (".ome.tiff", ".ome.tif"):
        if name.endswith(double):
            return name[: -len(double)]
    return Path(name).stem


def _label_key(path: Path) -> tuple[str, bool]:
    """The image stem a label file belongs to, and whether its name carried a label suffix."""
    stem = _stem(path)
    for suffix in LABEL_SUFFIXES:
        for sep in ("_", "-", " ", "."):
            tail = sep + suffix[1:]
            if stem.endswith(tail) and len(stem) > len(tail):
                return stem[: -len(tail)], True
    return stem, False


def pair_files(images: Sequence[Path], labels: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pair image and label files by name: ``x.tif`` with ``x.tif`` (in another folder) or with
    ``x_labels.tif`` / ``x_masks.tif`` / ``x_mask.tif`` / ``x_seg.tif`` (see
    :data:`LABEL_SUFFIXES`; case, ``-`` and the image suffix do not matter).

    When images and labels come from one folder, the label-named files are the labels.

    Returns:
        ``(image, labels)`` pairs in the images' order.

    Raises:
        ValueError: Some files have no partner, or a name fits several files; every such file
            is listed, with how to fix it (rename, or ``--pair-by-order``).
    """
    label_set = set(labels)
    # One folder for both: drop from each side the files that belong to the other.
    images = [p for p in images if not (p in label_set and _label_key(p)[1])]
    image_set = set(images)
    labels = [p for p in labels if not (p in image_set and not _label_key(p)[1])]

    seen: dict[str, list[Path]] = {}
    for img in images:
        seen.setdefault(_stem(img), []).append(img)
    by_key: dict[str, list[Path]] = {}
    lonely_labels = []
    for lab in labels:
        # "x_seg.tif" belongs to "x.tif", or to an image really named "x_seg.tif".
        stripped, full = _label_key(lab)[0], _stem(lab)
        key = next((k for k in (stripped, full) if k in seen), None)
        if key is None:
            lonely_labels.append(lab)
        else:
            by_key.setdefault(key, []).append(lab)
    problems = []
    for key, found in sorted(by_key.items()):
        if len(found) > 1:
            problems.append(
                f"labels {', '.join(p.name for p in found)} all fit the image name {key!r}"
            )
    for key, found in sorted(seen.items()):
        if len(found) > 1:
            problems.append(f"images {', '.join(str(p) for p in found)} have the same name {key!r}")
    lonely_images = [img for img in images if _stem(img) not in by_key]
    if lonely_images:
        problems.append("images without labels: " + _names(lonely_images))
    if lonely_labels:
        problems.append("labels without images: " + _names(lonely_labels))
    if problems:
        raise ValueError(
            "Cannot pair the image and label files by name: " + "; ".join(problems) + ". A label "
            "file pairs with the image of the same name (in another folder) or with the name "
            f"plus one of {', '.join(LABEL_SUFFIXES)} (e.g. day1.tif -> day1_labels.tif). Rename "
            "the files, leave the unpaired ones out, or pass --pair-by-order to pair them in "
            "sorted order instead."
        )
    return [(img, by_key[_stem(img)][0]) for img in images]


def _names(paths: Sequence[Path], limit: int = 10) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")


def _show_training(bar: TextProgress, r: TrainReport) -> None:
    """One training report: the bar in place on a terminal, elsewhere a line per validation
    (and at least every 30 s); the start message and warnings always as lines of their own."""
    if r.message and (
        r.step == 0 or "restored" in r.message or "diverged" in r.message or "skipped" in r.message
    ):
        bar.line(r.message)
    total = r.total_steps or max(r.step, 1)
    frac = min(1.0, r.step / total) if total else 0.0
    val = f" val {r.best_val_dice:.3f}" if r.best_val_dice is not None else ""
    loss = f" loss {r.loss:.4f}" if math.isfinite(r.loss) else ""
    text = f"{bar.bar(frac)} {r.step}/{total}{loss}{val} lr {r.lr:.1e} {r.elapsed:.0f}s"
    if bar.tty:
        bar.show(text, final=r.step >= total)
    elif r.val_dice is not None or time.monotonic() - bar.last_line > 30:
        bar.line(text)


def train_paths(
    images: Sequence[Path],
    labels: Sequence[Path],
    output: Path,
    *,
    model_path: Path | None = None,
    arch: str | None = None,
    epochs: int | None = None,
    seconds: float | None = None,
    loss: str | None = None,
    device: str = "auto",
    seed: int | None = None,
    num_classes: int | None = None,
    batch_size: int | None = None,
    crop_size: int | None = None,
    lr: float | None = None,
    val_fraction: float | None = None,
    allow_empty: bool = False,
    pair_by_order: bool = False,
    stream: Any = None,
) -> int:
    """Train or fine-tune from image/label files and save the model (the ``train`` command).

    Images and labels (files or folders) are paired by name (:func:`pair_files`:
    ``day1.tif`` with ``day1_labels.tif``, ``_masks``, ``_mask``, ``_seg`` ... or the same name in
    another folder); unpaired files are refused with a list. ``pair_by_order`` pairs them in
    sorted order instead (explicit fallback for names that do not match). ``model_path`` ``None``
    starts from the bundled model, ``"new"`` from a random initialisation of ``arch``
    (default ``"s2mnet"``; input channels taken from the images). Ctrl-C stops training and
    saves the best state so far. Under ``torchrun`` only rank 0 prints and saves.

    Returns:
        0 on success, 1 when training diverged (the last good state is still saved).
    """
    import signal
    import threading

    import numpy as np

    from napari_s2mnet import _ddp
    from napari_s2mnet.checkpoint import load_default_model, load_model, new_model, save_model
    from napari_s2mnet.devices import resolve_device
    from napari_s2mnet.io import read_image, read_labels
    from napari_s2mnet.model.registry import ModelConfig
    from napari_s2mnet.training import FinetuneConfig, FinetuneControl, train
    from napari_s2mnet.training.data import layout_for_pair

    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"The output must be a .safetensors file, got {out.name!r}.")
    if not out.parent.exists():
        raise FileNotFoundError(f"Output folder {out.parent} does not exist; create it first.")
    img_files, _ = expand_paths(images, "image", strict=True)
    lab_files, _ = expand_paths(labels, "label", strict=True)
    if not pair_by_order:
        file_pairs = pair_files(img_files, lab_files)
    elif len(img_files) != len(lab_files):
        raise ValueError(
            f"Found {len(img_files)} image file(s) but {len(lab_files)} label file(s); with "
            "--pair-by-order they are paired in sorted order, so give the same number of each "
            f"(first images: {[f.name for f in img_files[:3]]}, first labels: "
            f"{[f.name for f in lab_files[:3]]})."
        )
    else:
        file_pairs = list(zip(img_files, lab_files, strict=True))
    pairs = []
    for fi, fl in file_pairs:
        if pair_by_order:
            log.info("pairing %s with %s (by order)", fi.name, fl.name)
        pairs.append((read_image(fi), read_labels(fl), fi.name))

    if model_path is not None and str(model_path).lower() == "new":
        img0, lab0 = np.asarray(pairs[0][0]), np.asarray(pairs[0][1])
        lay = layout_for_pair(img0, lab0, None, None, pairs[0][2])
        # RGB(A) -> 3 channels (alpha is dropped); another channel axis -> its length; else gray.
        c = 3 if lay.rgb else 1 if lay.channel_axis is None else int(img0.shape[lay.channel_axis])
        bundle = new_model(
            ModelConfig(arch=arch or "s2mnet", in_channels=c, num_classes=num_classes or 1)
        )
    else:
        if arch is not None:
            raise ValueError("--arch only applies to a new model (--model new).")
        bundle = load_model(model_path) if model_path is not None else load_default_model()
        if num_classes is not None and num_classes != bundle.config.num_classes:
            raise ValueError(
                f"The model has {bundle.config.num_classes} classes, not "
                f"{num_classes}; start a new model (--model new) to change it."
            )

    cfg = FinetuneConfig(epochs=epochs, seconds=seconds, device=device, allow_empty=allow_empty)
    overrides = {
        "loss": loss,
        "seed": seed,
        "batch_size": batch_size,
        "crop_size": crop_size,
        "lr": lr,
        "val_fraction": val_fraction,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    ctx = _ddp.init_from_env(resolve_device(device).type)
    main = ctx.is_main
    control = FinetuneControl()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def _on_sigint(signum: int, frame: Any) -> None:
            control.stop()
            signal.signal(signal.SIGINT, previous or signal.SIG_DFL)  # a second Ctrl-C kills

        previous = signal.signal(signal.SIGINT, _on_sigint)
    bar = TextProgress(stream) if main else None
    try:
        result = train(
            pairs,
            bundle,
            cfg,
            callback=(lambda r: _show_training(bar, r)) if bar else None,
            control=control,
            names=[p[2] for p in pairs],
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if bar:
            bar.finish()
    if bar:
        save_model(result.bundle, out)
        s = bar.stream
        best = f"{result.best_val_dice:.3f}" if result.best_val_dice is not None else "n/a"
        s.write(
            f"{result.message}\nsteps: {result.steps}  best validation Dice: {best}  "
            f"time: {result.elapsed:.1f} s\nsaved: {out}\n"
        )
        s.flush()
    ctx.barrier()
    _ddp.cleanup(ctx)
    return 1 if result.stopped_reason == "diverged" else 0
