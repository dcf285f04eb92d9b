"""Input transforms for brightfield and stained images (torch-free).

The bundled model and most fine-tuned ones were trained on fluorescence: bright objects on a
dark background. Brightfield images are the opposite, and in H&E / IHC tissue the nuclei are the
hematoxylin (blue) stain. :func:`transform_input` turns such images into what the model expects:

- ``"invert"``: dark objects on a bright background become bright on dark (any image).
- ``"hematoxylin"``: an RGB image becomes its hematoxylin optical density (scikit-image's
  ``rgb2hed``, Ruifrok & Johnston colour deconvolution), bright where nuclei are stained.

:func:`brightfield_warning` says when an RGB image looks like brightfield (bright background)
while no transform is chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: The values of ``InferenceConfig.input_transform`` and what a user reads for them.
INPUT_TRANSFORMS: dict[str, str] = {
    "none": "as is (bright objects on dark)",
    "invert": "invert (dark objects on bright)",
    "hematoxylin": "H&E: hematoxylin channel",
}

# Median gray level (fraction of the dtype's range, or of the data's range for floats) above
# which an RGB image is taken for brightfield: fluorescence backgrounds are dark (~0.0-0.2).
BRIGHT_BACKGROUND = 0.55


def check_transform(mode: str) -> str:
    """``mode`` if it is a known input transform, else a ``ValueError`` listing them."""
    if mode not in INPUT_TRANSFORMS:
        raise ValueError(
            f"input_transform must be one of {sorted(INPUT_TRANSFORMS)}, got {mode!r} "
            "('invert' for dark objects on a bright background, 'hematoxylin' for H&E/IHC RGB)."
        )
    return mode


def transform_input(image: np.ndarray, layout: Any, mode: str) -> tuple[np.ndarray, Any]:
    """``(image, layout)`` after the input transform ``mode``.

    Args:
        image: The checked image array.
        layout: Its :class:`~napari_s2mnet.layout.ImageLayout` (resolved).
        mode: One of :data:`INPUT_TRANSFORMS`.

    Returns:
        The transformed image and its layout. ``"hematoxylin"`` returns one float32 gray
        channel (the colour axis is gone); ``"invert"`` keeps the shape and dtype.
    """
    check_transform(mode)
    if mode == "none":
        return image, layout
    if mode == "invert":
        return _invert(image), layout
    if not layout.rgb or image.shape[-1] not in (3, 4):
        raise ValueError(
            f"input_transform='hematoxylin' needs an RGB image (colour axis last, 3 or 4 values), "
            f"got shape {image.shape}; use 'invert' for a gray brightfield image."
        )
    return hematoxylin(image), dataclasses.replace(
        layout, rgb=False, channel_axis=None, channels=None
    )


def _invert(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        return ~image
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        if info.min == 0:
            return info.max - image  # exact, same dtype
        return (image.max() - image.astype(np.int64) + image.min()).astype(image.dtype)
    lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    return (hi + lo - image).astype(image.dtype, copy=False)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of an RGB(A) image ``(..., Y, X, 3|4)``, float32 ``(..., Y, X)``.

    Computed plane by plane, so a stack needs one plane of float64 scratch memory.
    """
    from skimage.color import rgb2hed

    rgb = np.asarray(rgb)[..., :3]
    out = np.empty(rgb.shape[:-1], dtype=np.float32)
    for idx in np.ndindex(*rgb.shape[:-3]):
        plane = rgb[idx]
        if np.issubdtype(plane.dtype, np.integer):
            plane = plane.astype(np.float64) / float(np.iinfo(plane.dtype).max)
        out[idx] = rgb2hed(np.clip(plane, 0.0, 1.0))[..., 0]
    return out


def background_level(image: np.ndarray, layout: Any) -> float | None:
    """Median gray level of an RGB image as a fraction of its range (None if not RGB)."""
    if not getattr(layout, "rgb", False) or image.ndim < 3 or image.shape[-1] not in (3, 4):
        return None
    step = max(1, int(np.ceil(np.sqrt(image[..., 0].size / 250_000))))  # ~250k samples
    sample = image[..., ::step, ::step, :3].astype(np.float32)
    gray = sample.mean(axis=-1)
    if np.issubdtype(image.dtype, np.integer):
        lo, span = 0.0, float(np.iinfo(image.dtype).max)
    elif float(np.nanmax(gray)) <= 1.0:  # float images in [0, 1]
        lo, span = 0.0, 1.0
    else:
        lo = float(np.nanmin(gray))
        span = max(float(np.nanmax(gray)) - lo, 1e-12)
    return float((np.nanmedian(gray) - lo) / span)


def brightfield_warning(image: np.ndarray, layout: Any, mode: str) -> str | None:
    """A message naming the fix when an RGB image looks like brightfield and ``mode`` is none."""
    if mode != "none":
        return None
    level = background_level(image, layout)
    if level is None or level < BRIGHT_BACKGROUND:
        return None
    return (
        f"This RGB image looks like brightfield (bright background: median gray {level:.2f} of "
        "the range), but the model expects bright objects on a dark background. For stained "
        "tissue (H&E, IHC) choose the input 'H&E: hematoxylin channel' "
        "(input_transform='hematoxylin', CLI --input-transform hematoxylin); for dark objects "
        "on a bright background choose 'invert'."
    )
