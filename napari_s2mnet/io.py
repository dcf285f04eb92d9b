"""Reading images and writing / reading label images and feature tables.

Label files:

* **TIFF** (``.tif``/``.tiff``) is written as an ImageJ hyperstack so Fiji opens it with the pixel
  size: ``resolution`` tags hold the X/Y pixel size, the ImageJ metadata holds the unit and the Z
  ``spacing``. ImageJ only reads 8-bit, 16-bit and 32-bit float images, so labels are stored as
  ``uint8`` (ids <= 255), ``uint16`` (ids <= 65535) or ``float32`` (ids <= 2**24, every id exact;
  Fiji shows them as a 32-bit image). Beyond 2**24 ids a plain (non-ImageJ) ``uint32`` TIFF is
  written (still with resolution tags). :func:`read_labels` turns float32 label files back into the
  smallest unsigned integer type.
* **PNG**: 2-D only, fewer than 65536 labels, ``uint8`` or ``uint16``.
* **NPY**: ``numpy.save`` of the smallest unsigned integer type.

Every writer is atomic: it writes a temporary file in the target folder and renames it over the
target (``os.replace``), so a failure never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet._atomic import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "ImageData",
    "load_image",
    "read_image",
    "read_labels",
    "smallest_uint_dtype",
    "write_features_csv",
    "write_labels",
]

log = logging.getLogger(__name__)

LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
FLOAT32_EXACT_MAX = 2**24  # largest integer range float32 stores exactly

# napari / pint unit names -> the spelling ImageJ understands.
_IMAGEJ_UNITS = {
    "micrometer": "micron",
    "micrometre": "micron",
    "micron": "micron",
    "um": "micron",
    "µm": "micron",
    "μm": "micron",
    "nanometer": "nm",
    "nanometre": "nm",
    "nm": "nm",
    "millimeter": "mm",
    "millimetre": "mm",
    "mm": "mm",
    "centimeter": "cm",
    "cm": "cm",
    "meter": "m",
    "metre": "m",
    "m": "m",
    "pixel": "pixel",
    "px": "pixel",
    "": "pixel",
}


def smallest_uint_dtype(max_value: int | np.integer) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``0 .. max_value``.

    Raises:
        ValueError: For a negative value or one above the uint64 range.
    """
    value = int(max_value)
    if value < 0:
        raise ValueError(f"Labels must be >= 0, got a maximum of {value}.")
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"Label value {value} does not fit in 64 bits.")


def check_float_label_range(labels: np.ndarray, name: str) -> None:
    """Refuse float label ids that no integer id type holds exactly (above 2**53, or negative).

    Casting ``1e30`` to int64 wraps to a negative number; say what is really wrong instead.
    """
    if labels.size == 0:
        return
    lo, hi = float(labels.min()), float(labels.max())
    if lo < 0:
        raise ValueError(f"{name}: labels must be >= 0 (0 = background); found {lo:g}.")
    if hi > _MAX_EXACT_FLOAT_ID:
        raise ValueError(
            f"{name}: label value {hi:g} is too large for a label id (float labels must be whole "
            f"numbers up to 2**53 = {_MAX_EXACT_FLOAT_ID}); save the labels with an integer dtype "
            "or renumber them (e.g. skimage.segmentation.relabel_sequential)."
        )


_MAX_EXACT_FLOAT_ID = 2**53


def _as_uint_labels(labels: Any) -> np.ndarray:
    """Validate a label image and cast it to the smallest unsigned dtype (no copy if already so)."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.size == 0:
        raise ValueError(f"Cannot write an empty label image (shape {arr.shape}).")
    if arr.ndim < 2:
        raise ValueError(f"Label images need at least 2 dimensions (Y, X); got shape {arr.shape}.")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise ValueError(
                "Labels must be whole numbers; this float array has fractional or NaN/Inf values. "
                "Is it a probability image? Threshold it or round it first."
            )
        check_float_label_range(arr, "labels")
    elif arr.dtype.kind not in "ui":
        raise TypeError(f"Labels must be integers, got dtype {arr.dtype}.")
    lo, hi = (int(arr.min()), int(arr.max()))
    if lo < 0:
        raise ValueError(f"Labels must be >= 0 (0 = background); found {lo}.")
    dt = smallest_uint_dtype(hi)
    return arr if arr.dtype == dt else arr.astype(dt)


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    New files follow the umask, overwritten ones keep their mode, symlinks are written through
    and non-regular files are refused (:mod:`napari_s2mnet._atomic`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        yield tmp


def _suffix(path: Path, allowed: Sequence[str], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(
            f"Cannot write {what} to {path.name!r}: unknown extension {path.suffix!r}; "
            f"use one of {', '.join(allowed)}."
        )
    return suffix


def physical_unit(units: Any) -> str | None:
    """The in-plane unit of napari's ``layer.units`` (one per axis, or one string); ``None``
    for pixels. Shared by the Export widget and the napari writers."""
    if units is None or (not isinstance(units, str) and len(units) == 0):
        return None
    text = str(units if isinstance(units, str) else list(units)[-1])
    return None if text in ("pixel", "px", "") else text


def _imagej_unit(unit: str | Sequence[str] | None) -> str | None:
    if unit is None:
        return None
    if not isinstance(unit, str):  # napari's layer.units is one unit per axis
        unit = str(list(unit)[-1]) if len(unit) else "pixel"
    key = unit.strip()
    return _IMAGEJ_UNITS.get(key.lower(), _IMAGEJ_UNITS.get(key, key))


def _default_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "")


def write_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    spacing: Sequence[float] | None = None,
    unit: str | Sequence[str] | None = None,
    axes: str | None = None,
) -> Path:
    """Write a label image as TIFF, PNG or NPY (chosen by the extension), atomically.

    Args:
        path: Target file (``.tif``, ``.tiff``, ``.png``, ``.npy``).
        labels: Integer label image (``(Y, X)``, ``(Z, Y, X)`` or ``(T, Z, Y, X)``); bool and
            whole-number float arrays are accepted. Stored in the smallest unsigned dtype.
        spacing: Physical size of a pixel along each axis (napari's ``layer.scale``); the last
            two entries are Y and X, the one before is the Z spacing. TIFF only.
        unit: Physical unit (``"micron"``, ``"micrometer"``, ``"nm"``, ... or napari's per-axis
            ``layer.units``); ``None`` or ``"pixel"`` when the size is in pixels. TIFF only.
        axes: ImageJ axes string for TIFF (default ``YX``, ``ZYX``, ``TZYX`` by dimension).

    Returns:
        The written path.

    Raises:
        ValueError: Unknown extension, negative or fractional labels, PNG with 3-D data or
            >= 65536 labels, spacing of the wrong length.
    """
    path = Path(path)
    suffix = _suffix(path, LABEL_SUFFIXES, "labels")
    arr = _as_uint_labels(labels)

    if suffix == ".npy":
        with _atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        return path

    if suffix == ".png":
        if arr.ndim != 2:
            raise ValueError(
                f"PNG holds 2-D images only; these labels have shape {arr.shape}. "
                "Save as .tif (keeps all slices) or .npy instead."
            )
        if arr.dtype.itemsize > 2:
            raise ValueError(
                "PNG holds at most 65535 labels (16 bit); the largest label here is "
                f"{int(arr.max())}. "
                "Save as .tif or .npy instead."
            )
        import imageio.v3 as iio

        # Encoded in memory, then written with a plain file: on a full disk the write fails once
        # with OSError (imageio writing to the file would also raise again from a finaliser,
        # printing an extra "Exception ignored" traceback).
        data = iio.imwrite("<bytes>", arr, extension=".png")
        with _atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
        return path

    _write_tiff(path, arr, spacing=spacing, unit=unit, axes=axes)
    return path


def _write_tiff(
    path: Path,
    arr: np.ndarray,
    *,
    spacing: Sequence[float] | None,
    unit: str | Sequence[str] | None,
    axes: str | None,
) -> None:
    import tifffile

    axes = (axes or _default_axes(arr.ndim)).upper()
    if axes and len(axes) != arr.ndim:
        raise ValueError(f"axes {axes!r} does not match the label shape {arr.shape}.")
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) < 2 or len(spacing) > arr.ndim:
            raise ValueError(
                f"spacing needs one value per axis (at least Y and X); got {spacing} for labels of "
                f"shape {arr.shape}."
            )
        if any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise ValueError(f"spacing values must be positive and finite; got {spacing}.")
    full_shape = None
    if arr.ndim > 2 and 1 in arr.shape:
        # ImageJ drops length-1 axes, so (Y, X, 1) would read back as (Y, X): write the
        # squeezed array (which Fiji reads cleanly) and record the full shape for read_labels.
        full_shape = arr.shape
        arr, axes, spacing = _squeeze_for_tiff(arr, axes, spacing)
    kwargs: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    if spacing is not None:
        sy, sx = spacing[-2], spacing[-1]
        kwargs["resolution"] = (1.0 / sx, 1.0 / sy)  # TIFF stores pixels per unit
        if "Z" in axes and len(spacing) >= 3:
            metadata["spacing"] = spacing[axes.index("Z") - arr.ndim + len(spacing)]
    ij_unit = _imagej_unit(unit)
    if ij_unit is not None:
        metadata["unit"] = ij_unit
    if full_shape is not None:
        metadata[_SHAPE_KEY] = ",".join(str(n) for n in full_shape)

    hi = int(arr.max())
    imagej = True
    if arr.dtype.itemsize > 2:
        if hi <= FLOAT32_EXACT_MAX:
            arr = arr.astype(np.float32)  # ImageJ has no 32-bit integers; float32 is exact here
        else:
            imagej = False
            arr = arr.astype(np.uint32) if hi <= np.iinfo(np.uint32).max else arr
            log.warning(
                "%d labels exceed what ImageJ/Fiji can read exactly; writing a plain uint32 TIFF.",
                hi,
            )
    with _atomic_path(path) as tmp:
        if imagej:
            if axes:
                metadata["axes"] = axes
            tifffile.imwrite(tmp, arr, imagej=True, metadata=metadata, **kwargs)
        else:
            plain: dict[str, Any] | None = {"axes": axes} if axes else None
            if full_shape is not None:
                arr = arr.reshape(full_shape)
                plain = {}  # tifffile's shaped description then records the full shape
            tifffile.imwrite(tmp, arr, metadata=plain, **kwargs)


_SHAPE_KEY = "s2mnet_shape"  # ImageJ description entry: the labels' shape with length-1 axes


def _squeeze_for_tiff(
    arr: np.ndarray, axes: str, spacing: list[float] | None
) -> tuple[np.ndarray, str, list[float] | None]:
    """Drop length-1 axes (keeping Y and X), with their axis letters and spacing entries."""
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    while len(keep) < 2:  # a (1, 1, X) or (1, Y, 1) array: keep the last axes as Y, X
        keep = sorted(set(keep) | {max(set(range(arr.ndim)) - set(keep))})
    out = arr.reshape([arr.shape[i] for i in keep])
    letters = "".join(axes[i] for i in keep) if axes else ""
    if not letters.endswith("YX"):
        letters = _default_axes(out.ndim)
    if spacing is not None:
        offset = arr.ndim - len(spacing)  # spacing covers the last axes
        spacing = [spacing[i - offset] for i in keep if i >= offset] or None
        if spacing is not None and len(spacing) < 2:
            spacing = None
    return out, letters, spacing


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label image written by :func:`write_labels` (or any integer TIFF/PNG/NPY).

    Float32 TIFFs whose values are whole numbers (what :func:`write_labels` writes for more than
    65535 labels) come back as the smallest unsigned integer type.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unknown extension, unreadable file, or values that are not labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such label file: {path}")
    suffix = path.suffix.lower()
    if suffix not in LABEL_SUFFIXES:
        raise ValueError(
            f"Cannot read labels from {path.name!r}: use one of {', '.join(LABEL_SUFFIXES)}."
        )
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".png":
            arr = _imread_pillow(path)
        else:
            import tifffile

            arr = tifffile.imread(path)
    except Exception as exc:
        raise ValueError(f"Could not read {path.name!r} as labels: {exc}") from exc
    arr = np.asarray(arr)
    if suffix in (".tif", ".tiff"):
        arr = _full_shape(path, arr)
    if arr.dtype.kind == "f":
        return _as_uint_labels(arr)
    return arr


def _full_shape(path: Path, arr: np.ndarray) -> np.ndarray:
    """Restore length-1 axes that :func:`write_labels` recorded (ImageJ files drop them)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            note = (tif.imagej_metadata or {}).get(_SHAPE_KEY)
            shaped = tif.shaped_metadata  # plain TIFFs written by tifffile keep their shape here
        if note:
            shape = tuple(int(n) for n in str(note).split(","))
        elif shaped and isinstance(shaped[0], dict) and shaped[0].get("shape"):
            shape = tuple(int(n) for n in shaped[0]["shape"])
        else:
            shape = None
    except (ValueError, OSError, TypeError):
        return arr
    if shape and int(np.prod(shape)) == arr.size:
        return arr.reshape(shape)
    return arr


def write_features_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a features table as CSV (no index column; ``index`` is a normal column), atomically."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"Expected a pandas DataFrame, got {type(df).__name__}.")
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"Features are written as .csv; got {path.name!r}.")
    with _atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


@dataclass
class ImageData:
    """An image read from disk with what the file says about its geometry.

    Attributes:
        data: The pixel array (as stored; RGB(A) images end with a colour axis).
        spacing: Physical pixel size per axis of ``data`` (without the colour axis), or ``None``.
        unit: Physical unit of ``spacing`` (ImageJ spelling, e.g. ``"micron"``), or ``None``.
        axes: Axis letters from the file (e.g. ``"ZYX"``, ``"YXS"``) when known, else ``""``.
        rgb: The file says the last axis is colour (RGB/RGBA PNG or JPEG, TIFF samples axis).
    """

    data: np.ndarray
    spacing: tuple[float, ...] | None = None
    unit: str | None = None
    axes: str = ""
    rgb: bool = False


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (TIFF, PNG, JPEG, BMP, NPY) into an array; see :func:`load_image`."""
    return load_image(path).data


def load_image(path: str | os.PathLike) -> ImageData:
    """Read an image file with its pixel size when the file has one (ImageJ/OME TIFF).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not an image (unknown extension or unreadable content); the message names
            the file and the supported formats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such image file: {path}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(
            f"{path.name!r} is not a supported image file; use one of {', '.join(IMAGE_SUFFIXES)}."
        )
    readers: dict[str, Callable[[Path], ImageData]] = {
        ".tif": _load_tiff,
        ".tiff": _load_tiff,
        ".npy": _load_npy,
    }
    try:
        img = readers.get(suffix, _load_imageio)(path)
    except Exception as exc:
        raise ValueError(
            f"Could not read {path.name!r} as an image ({type(exc).__name__}: {exc}). "
            "Is the file complete and really an image?"
        ) from exc
    if img.data.dtype == object or img.data.dtype.kind not in "biuf":
        raise ValueError(f"{path.name!r} does not hold numeric pixels (dtype {img.data.dtype}).")
    if img.data.ndim < 2 or img.data.size == 0:
        raise ValueError(f"{path.name!r} is not a 2-D or larger image (shape {img.data.shape}).")
    return img


def _load_npy(path: Path) -> ImageData:
    return ImageData(np.load(path, allow_pickle=False))


def _load_imageio(path: Path) -> ImageData:
    data = np.asarray(_imread_pillow(path))
    return ImageData(data, rgb=data.ndim == 3 and data.shape[-1] in (3, 4))


def _imread_pillow(path: Path) -> np.ndarray:
    # Pillow reads PNG/JPEG/BMP; naming the plugin keeps imageio from trying every other
    # format (and warning about them) on a broken file.
    import imageio.v3 as iio

    return np.asarray(iio.imread(path, plugin="pillow"))


def _load_tiff(path: Path) -> ImageData:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes.upper()
        page = tif.pages[0]
        spacing: tuple[float, ...] | None = None
        unit: str | None = None
        try:
            xres = page.tags["XResolution"].value
            yres = page.tags["YResolution"].value
            sx = xres[1] / xres[0] if xres[0] else 0.0
            sy = yres[1] / yres[0] if yres[0] else 0.0
            ij = tif.imagej_metadata or {}
            unit = ij.get("unit")
            unit_tag = page.tags.get("ResolutionUnit")
            has_unit_tag = unit_tag is not None and int(unit_tag.value) != 1
            if sx > 0 and sy > 0 and (unit or has_unit_tag or (sx, sy) != (1.0, 1.0)):
                per_axis = []
                for ax in axes.replace("S", ""):
                    per_axis.append(
                        sx
                        if ax == "X"
                        else sy
                        if ax == "Y"
                        else float(ij.get("spacing", 1.0))
                        if ax == "Z"
                        else 1.0
                    )
                spacing = tuple(per_axis)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            spacing = None
    rgb = axes.endswith("S") and data.shape[-1] in (3, 4)
    return ImageData(data, spacing=spacing, unit=unit, axes=axes, rgb=rgb)
