"""Object size: the model's training diameter, an automatic estimate, and rescaling.

A network sees objects at the size it was trained on best. The model file stores that size as
metadata ``diameter`` (median equivalent diameter of the training objects, in pixels); the user
gives (or :func:`estimate_diameter` measures) the typical diameter in their image, and images are
rescaled by ``model diameter / image diameter`` before the network, labels resized back to the
image grid afterwards (inference) or the labels rescaled with the image (training). Like
Cellpose's ``diameter``; ``None`` means "as trained" (no rescaling).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "equivalent_diameter",
    "estimate_diameter",
    "model_diameter",
    "resize_plane",
    "scale_factor",
]

_TOLERANCE = 0.05  # rescaling by less than 5 % is not worth the interpolation
_MIN_FACTOR, _MAX_FACTOR = 0.125, 8.0
_MAX_PASSES = 4  # segmentation passes of estimate_diameter


def model_diameter(bundle: Any) -> float | None:
    """The training diameter stored in a model's metadata (``None`` when unknown)."""
    meta = getattr(bundle, "metadata", bundle) or {}
    value = meta.get("diameter") if isinstance(meta, dict) else None
    return float(value) if value else None


def scale_factor(model_diam: float | None, diameter: float | None) -> float:
    """Zoom factor for images whose objects measure ``diameter`` px (1.0: no rescaling).

    Raises ``ValueError`` for a factor outside [1/8, 8], which would mean a wrong setting.
    """
    if diameter is None or model_diam is None:
        return 1.0
    if not diameter > 0:
        raise ValueError(
            f"The object diameter must be a positive number of pixels, got {diameter!r}."
        )
    f = float(model_diam) / float(diameter)
    if not _MIN_FACTOR <= f <= _MAX_FACTOR:
        raise ValueError(
            f"An object diameter of {diameter:g} px would rescale the image by "
            f"{f:.3g} (the model was trained on {model_diam:g}-px objects); give a "
            f"diameter between {model_diam / _MAX_FACTOR:.3g} and "
            f"{model_diam / _MIN_FACTOR:.3g} px, or leave it empty."
        )
    return 1.0 if abs(f - 1.0) < _TOLERANCE else f


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``shape`` zoomed by ``factor`` (at least 1 px per side)."""
    return tuple(max(1, round(n * factor)) for n in shape)  # type: ignore[return-value]


def resize_plane(arr: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """Resize the last two axes of ``arr`` to ``shape``.

    ``order=0`` (labels, masks): nearest neighbour, values and dtype kept; ``order=1``:
    bilinear, anti-aliased when shrinking, float32.
    """
    from skimage.transform import resize

    if tuple(arr.shape[-2:]) == tuple(shape):
        return arr
    out_shape = (*arr.shape[:-2], *shape)
    if order == 0:
        out = resize(arr, out_shape, order=0, preserve_range=True, anti_aliasing=False, mode="edge")
        return out.astype(arr.dtype, copy=False)
    shrink = shape[0] < arr.shape[-2] or shape[1] < arr.shape[-1]
    out = resize(
        arr.astype(np.float32, copy=False),
        out_shape,
        order=1,
        preserve_range=True,
        anti_aliasing=shrink,
        mode="reflect",
    )
    return out.astype(np.float32, copy=False)


def equivalent_diameter(labels: np.ndarray, min_area: int = 9) -> float | None:
    """Median equivalent diameter (``sqrt(4 area / pi)``) of the objects of a label image.

    2-D planes of a stack are measured one by one; objects under ``min_area`` pixels (debris)
    are ignored. ``None`` when there are no objects.
    """
    lab = np.asarray(labels)
    if lab.ndim < 2:
        raise ValueError(f"labels must be 2-D or a stack, got shape {lab.shape}.")
    areas: list[np.ndarray] = []
    for plane in lab.reshape(-1, *lab.shape[-2:]):
        if not plane.any():
            continue
        counts = np.bincount(plane.ravel().astype(np.int64))[1:]
        areas.append(counts[counts >= min_area])
    if not areas or not sum(a.size for a in areas):
        return None
    return float(np.sqrt(4.0 * np.median(np.concatenate(areas)) / np.pi))


def estimate_diameter(
    image: Any, model: Any = None, config: Any = None, **kwargs: Any
) -> float | None:
    """Typical object diameter in ``image`` (pixels), measured with the model itself.

    A first pass segments the image as it is and takes the median equivalent diameter of the
    objects. While that is far (> 25 %) from the model's training diameter, another pass at the
    implied scale refines it (at most 4 passes; stops when two agree within 10 %): objects much
    larger than the training size come out fragmented at first, which under-estimates them.
    ``None`` when nothing was found.

    Args:
        image: Image as for :func:`napari_s2mnet.inference.segment`.
        model: Bundle, model file or ``None`` (bundled model).
        config: :class:`~napari_s2mnet.inference.InferenceConfig` (its diameter is ignored).
        **kwargs: ``layout=`` / ``spacing=`` as for ``segment``.
    """
    import dataclasses

    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.inference.run import _resolve_model

    bundle = _resolve_model(model)
    cfg = dataclasses.replace(
        config or InferenceConfig(),
        diameter=None,
        compute_features=False,
        split_touching=True,
        uncertainty=False,
        return_probability=False,
    )
    labels, _ = segment(image, bundle, cfg, **kwargs)
    estimate = equivalent_diameter(labels)
    trained = model_diameter(bundle)
    if estimate is None or trained is None:
        return estimate
    for _ in range(_MAX_PASSES - 1):
        if (
            abs(estimate / trained - 1.0) <= 0.25
            or not _MIN_FACTOR <= trained / estimate <= _MAX_FACTOR
        ):
            break
        labels, _ = segment(image, bundle, dataclasses.replace(cfg, diameter=estimate), **kwargs)
        new = equivalent_diameter(labels)
        if new is None:
            break
        done = abs(new / estimate - 1.0) <= 0.1
        estimate = new
        if done:  # converged: the objects now reach the model near its training size
            break
    return estimate
