"""Command-line training from image/label files (moving to :mod:`napari_s2mnet.batch`)."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_s2mnet.training.config import FinetuneConfig, FinetuneControl, TrainReport
from napari_s2mnet.training.data import _layout_for
from napari_s2mnet.training.loop import _resolve, train

_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")


def _expand(paths: Sequence[Path], what: str) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise ValueError(f"No {what} files ({', '.join(_IMAGE_SUFFIXES)}) in folder {p}.")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what.capitalize()} path {p} does not exist.")
    return files


def _read(path: Path, labels: bool) -> np.ndarray:
    try:
        from napari_s2mnet import io as s2io
    except ImportError:  # pragma: no cover - io.py is written in parallel
        s2io = None
    if s2io is not None:
        return s2io.read_labels(path) if labels else s2io.read_image(path)
    if path.suffix.lower() == ".npy":  # pragma: no cover
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() in (".tif", ".tiff"):  # pragma: no cover
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio  # pragma: no cover

    return np.asarray(iio.imread(path))  # pragma: no cover


class _Progress:
    """A one-line progress bar on stderr (a line per validation when not a terminal)."""

    def __init__(self, stream: Any = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = 0.0

    def update(self, r: TrainReport) -> None:
        if r.message and (r.step == 0 or "restored" in r.message or "diverged" in r.message
                          or "skipped" in r.message):
            self._line(r.message)
        total = r.total_steps or max(r.step, 1)
        frac = min(1.0, r.step / total) if total else 0.0
        fill = int(frac * self.width)
        bar = "#" * fill + "-" * (self.width - fill)
        val = f" val {r.best_val_dice:.3f}" if r.best_val_dice is not None else ""
        loss = f" loss {r.loss:.4f}" if math.isfinite(r.loss) else ""
        text = f"[{bar}] {r.step}/{total}{loss}{val} lr {r.lr:.1e} {r.elapsed:.0f}s"
        if self.tty:
            self.stream.write("\r" + text.ljust(90))
            self.stream.flush()
        elif r.val_dice is not None or time.perf_counter() - self.last > 30:
            self._line(text)

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 90 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last = time.perf_counter()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


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
    stream: Any = None,
) -> int:
    """Train or fine-tune from image/label files and save the model (the ``train`` command).

    Images and labels (files or folders) are paired in sorted order. ``model_path`` ``None``
    starts from the bundled model, ``"new"`` from a random initialisation of ``arch``
    (default ``"s2mnet"``; input channels taken from the images). Ctrl-C stops training and
    saves the best state so far. Under ``torchrun`` only rank 0 prints and saves.

    Returns:
        0 on success, 1 when training diverged (the last good state is still saved).
    """
    import signal

    from napari_s2mnet import _ddp
    from napari_s2mnet.checkpoint import load_default_model, load_model, new_model, save_model
    from napari_s2mnet.model.registry import ModelConfig

    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"The output must be a .safetensors file, got {out.name!r}.")
    if not out.parent.exists():
        raise FileNotFoundError(f"Output folder {out.parent} does not exist; create it first.")
    img_files = _expand(images, "image")
    lab_files = _expand(labels, "label")
    if len(img_files) != len(lab_files):
        raise ValueError(
            f"Found {len(img_files)} image file(s) but {len(lab_files)} label file(s); they are "
            "paired in sorted order, so give the same number of each (first images: "
            f"{[f.name for f in img_files[:3]]}, first labels: {[f.name for f in lab_files[:3]]})."
        )
    pairs = []
    for fi, fl in zip(img_files, lab_files, strict=True):
        pairs.append((_read(fi, labels=False), _read(fl, labels=True), fi.name))

    if model_path is not None and str(model_path).lower() == "new":
        img0, lab0 = np.asarray(pairs[0][0]), np.asarray(pairs[0][1])
        lay = _layout_for(img0, lab0, None, None, pairs[0][2])
        # RGB(A) -> 3 channels (alpha is dropped); another channel axis -> its length; else gray.
        c = 3 if lay.rgb else 1 if lay.channel_axis is None else int(img0.shape[lay.channel_axis])
        bundle = new_model(ModelConfig(arch=arch or "s2mnet", in_channels=c,
                                       num_classes=num_classes or 1))
    else:
        if arch is not None:
            raise ValueError("--arch only applies to a new model (--model new).")
        bundle = load_model(model_path) if model_path is not None else load_default_model()
        if num_classes is not None and num_classes != bundle.config.num_classes:
            raise ValueError(f"The model has {bundle.config.num_classes} classes, not "
                             f"{num_classes}; start a new model (--model new) to change it.")

    cfg = FinetuneConfig(epochs=epochs, seconds=seconds, device=device, allow_empty=allow_empty)
    overrides = {"loss": loss, "seed": seed, "batch_size": batch_size, "crop_size": crop_size,
                 "lr": lr, "val_fraction": val_fraction}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    ctx = _ddp.init_from_env(_resolve(device).type)
    main = ctx.is_main
    control = FinetuneControl()
    previous = None
    if threading.current_thread() is threading.main_thread():
        def _on_sigint(signum: int, frame: Any) -> None:
            control.stop()
            signal.signal(signal.SIGINT, previous or signal.SIG_DFL)  # a second Ctrl-C kills

        previous = signal.signal(signal.SIGINT, _on_sigint)
    bar = _Progress(stream) if main else None
    try:
        result = train(pairs, bundle, cfg, callback=bar.update if bar else None, control=control,
                       names=[p[2] for p in pairs])
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if bar:
            bar.close()
    if main:
        save_model(result.bundle, out)
        s = stream or sys.stderr
        best = f"{result.best_val_dice:.3f}" if result.best_val_dice is not None else "n/a"
        s.write(f"{result.message}\nsteps: {result.steps}  best validation Dice: {best}  "
                f"time: {result.elapsed:.1f} s\nsaved: {out}\n")
        s.flush()
    ctx.barrier()
    _ddp.cleanup(ctx)
    return 1 if result.stopped_reason == "diverged" else 0
