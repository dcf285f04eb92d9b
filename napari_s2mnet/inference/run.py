"""The segmentation run: :func:`segment_iter` (a generator) and its wrappers."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.inference.config import InferenceConfig, Progress, SegmentationResult
from napari_s2mnet.inference.engine import Counter, Engine
from napari_s2mnet.inference.postprocess import (
    Predicted,
    SliceResults,
    needed_channels,
    z_smoothed,
)
from napari_s2mnet.layout import (
    ImageLayout,
    ImagePlan,
    check_array,
    check_finite,
    check_spacing,
    plan_image,
    resolve_layout,
    squeeze_singletons,
)
from napari_s2mnet.stain import brightfield_warning, transform_input

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from napari_s2mnet.checkpoint import ModelBundle
    from napari_s2mnet.preprocess import NormalizationStats

__all__ = ["run_to_end", "segment", "segment_iter"]

log = logging.getLogger(__name__)


def _resolve_model(model: Any) -> ModelBundle:
    """The bundle for ``model``: a bundle, a model file, or ``None`` for the bundled model."""
    from napari_s2mnet import checkpoint

    if model is None:
        return checkpoint.load_default_model()
    if isinstance(model, str | os.PathLike):
        return checkpoint.load_model(model)
    if all(hasattr(model, a) for a in ("model", "config", "normalization")):
        return model
    raise TypeError(
        f"model must be a ModelBundle (network + config + normalisation), a path to a "
        f".safetensors model file, or None for the bundled model; got {type(model).__name__}. "
        "Wrap a bare network with napari_s2mnet.checkpoint.ModelBundle(network, config)."
    )


def segment_iter(
    image: Any,
    model: Any = None,
    config: InferenceConfig | None = None,
    layout: ImageLayout | None = None,
    spacing: Sequence[float] | None = None,
) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image``, yielding :class:`Progress`; returns a :class:`SegmentationResult`.

    Closing the generator (``gen.close()``, or napari's worker quit) at any ``yield`` stops the
    work cleanly: nothing is returned, the model is left as it was.

    Args:
        image: Array as napari holds it (see the module docstring for layouts); bool, integer or
            float pixels (finite).
        model: A :class:`~napari_s2mnet.checkpoint.ModelBundle`, a path to a ``.safetensors``
            model file, or ``None`` for the bundled default model.
        config: Run settings (default :class:`InferenceConfig`).
        layout: How to read the axes (default :func:`guess_layout`).
        spacing: Physical pixel size per non-channel axis (napari's ``layer.scale``) or
            ``(dy, dx)``; used for the ``area`` feature.

    Raises:
        ValueError / TypeError: Bad input, with what to change.
        RuntimeError: Out of memory even on the CPU, or a model that breaks its contract.
    """
    t_start = time.perf_counter()
    timings = {"prepare": 0.0, "predict": 0.0, "postprocess": 0.0, "features": 0.0}
    cfg = config if config is not None else InferenceConfig()
    if not isinstance(cfg, InferenceConfig):
        raise TypeError(f"config must be an InferenceConfig, got {type(cfg).__name__}.")
    cfg.validate()
    arr = check_array(image)
    lay = resolve_layout(arr, layout)
    bundle = _resolve_model(model)
    notes: list[str] = []
    # (Y, X, 1) / (Y, 1, X): a length-1 axis is dropped, not read as slices of one pixel.
    arr, lay_used, squeezed = squeeze_singletons(arr, lay, notes)
    spacing = squeezed.squeeze_spacing(spacing)
    warning = brightfield_warning(arr, lay_used, cfg.input_transform)
    if warning:
        notes.append(warning)
        log.warning(warning)
    arr, lay_used = transform_input(arr, lay_used, cfg.input_transform)
    plan = plan_image(arr, lay_used, int(bundle.config.in_channels), notes)
    spacing_t = check_spacing(spacing, arr, plan)
    check_finite(plan)
    binary = int(bundle.config.num_classes) == 1
    threshold = float(cfg.threshold if cfg.threshold is not None else bundle.threshold)
    factor = _diameter_factor(bundle, cfg, notes)
    if binary and not 0.0 < threshold < 1.0:
        raise ValueError(f"The model's stored threshold {threshold} is not in (0, 1); set one.")
    for note in notes:
        if note != warning:  # the brightfield warning is already logged
            log.warning(note)  # notes say something may not be what the user meant

    n_slices = plan.n_slices
    engine = Engine(bundle, cfg, notes, needed_channels(int(bundle.config.out_channels), binary))
    try:
        tiles = engine.grid(_scaled(plan.spatial, factor)).n_tiles
        counter = Counter(total=n_slices * (tiles + 1), tiles_per_slice=tiles, n_slices=n_slices)
        engine.planned_tiles = n_slices * tiles
        timings["prepare"] += time.perf_counter() - t_start
        yield counter.progress("prepare", f"{n_slices * tiles} tiles on {engine.description}")

        stream = _predictions(plan, bundle, cfg, engine, counter, timings, factor)
        if cfg.z_context and plan.lead:
            stream = z_smoothed(stream, int(cfg.z_context), plan.lead)
        out = SliceResults(plan, cfg, binary, threshold, spacing_t, timings)
        for item in stream:
            if isinstance(item, Progress):
                yield item
                continue
            out.add(item.idx, item.maps)  # add() pops the maps it is done with: freed early
            del item
            counter.done += 1
            yield counter.progress("postprocess", f"{counter.slice_text()}post-processed")

        labels = squeezed.restore(out.labels())
        features = out.features()
        timings["total"] = time.perf_counter() - t_start
        result = SegmentationResult(
            labels=labels,
            features=features,
            probability=squeezed.restore(out.probability),
            uncertainty=squeezed.restore(out.uncertainty),
            device=engine.description,
            backend=engine.backend,
            messages=list(notes),
            threshold=threshold if binary else None,
            semantic=not binary,
            layout=lay_used if not squeezed.axes else lay,  # the caller's axes when squeezed
            spacing=squeezed.restore_spacing(spacing_t),
            n_tiles=engine.n_tiles,
            timings=timings,
        )
        yield Progress(counter.total, counter.total, "done", f"{out.total_objects} objects")
        return result
    finally:
        engine.close()


def _scaled(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    from napari_s2mnet.diameter import scaled_shape

    return scaled_shape(shape, factor) if factor != 1.0 else shape


def _diameter_factor(bundle: ModelBundle, cfg: InferenceConfig, notes: list[str]) -> float:
    """Zoom factor for ``cfg.diameter`` (1.0 without one, or for a model without its own)."""
    from napari_s2mnet.diameter import model_diameter, scale_factor

    if cfg.diameter is None:
        return 1.0
    trained = model_diameter(bundle)
    if trained is None:
        notes.append(
            f"The model file does not say which object size it was trained on, so "
            f"the diameter {cfg.diameter:g} px is not used (no rescaling)."
        )
        return 1.0
    factor = scale_factor(trained, float(cfg.diameter))
    if factor != 1.0:
        notes.append(
            f"Rescaled by {factor:.2f}: objects of {cfg.diameter:g} px reach the model "
            f"at its training diameter ({trained:g} px)."
        )
    return factor


def _predictions(
    plan: ImagePlan,
    bundle: ModelBundle,
    cfg: InferenceConfig,
    engine: Engine,
    counter: Counter,
    timings: dict[str, float],
    factor: float = 1.0,
) -> Generator[Progress | Predicted, None, None]:
    """The blended probabilities of every slice in turn, with the engine's progress between.

    Normalisation statistics come from the whole image / stack (one pass, counted as
    ``prepare``) unless ``cfg.normalize_per_slice``.
    """
    from napari_s2mnet.preprocess import pixel_samples, stats_from_samples

    def stats_for(region: np.ndarray, n_spatial: int) -> NormalizationStats:
        samples = plan.select(pixel_samples(region, n_spatial))
        return stats_from_samples(samples, bundle.normalization)

    t0 = time.perf_counter()
    stats = None if cfg.normalize_per_slice else stats_for(plan.view, plan.view.ndim - 1)
    timings["prepare"] += time.perf_counter() - t0
    for k, idx in enumerate(np.ndindex(*plan.lead)):
        counter.slice_index = k
        region = plan.view[idx]
        t0 = time.perf_counter()
        slice_stats = stats if stats is not None else stats_for(region, 2)
        if factor != 1.0:  # objects reach the network at its training diameter
            from napari_s2mnet.diameter import resize_plane

            shape = _scaled(region.shape[:2], factor)
            zoomed = np.moveaxis(resize_plane(np.moveaxis(region, -1, 0), shape, 1), 0, -1)
            maps = yield from engine.predict(zoomed, plan, slice_stats, counter)
            maps = [np.clip(resize_plane(m, region.shape[:2], 1), 0.0, 1.0) for m in maps]
        else:
            maps = yield from engine.predict(region, plan, slice_stats, counter)
        timings["predict"] += time.perf_counter() - t0
        yield Predicted(idx, maps)
        del maps


def run_to_end(
    gen: Generator[Progress, None, Any], callback: Callable[[Progress], Any] | None = None
) -> Any:
    """Drive a progress generator to its end and return its return value."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(p)


def segment(
    image: Any,
    model: Any = None,
    config: InferenceConfig | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment ``image``; returns ``(labels, features)``.

    Args:
        image: Image array (see :func:`segment_iter`).
        model: ModelBundle, path to a ``.safetensors`` file, or ``None`` for the bundled model.
        config: Run settings.
        **kwargs: ``layout=``, ``spacing=`` (as in :func:`segment_iter`) and/or any
            :class:`InferenceConfig` field to override, e.g. ``tile_size=256, device="cpu"``.

    Example:
        >>> labels, features = segment(image, load_model("nuclei.safetensors"), min_size=20)
    """
    layout = kwargs.pop("layout", None)
    spacing = kwargs.pop("spacing", None)
    if kwargs:
        names = {f.name for f in dataclasses.fields(InferenceConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"segment() got unknown option(s) {unknown}; valid: layout, spacing, "
                f"{', '.join(sorted(names))}."
            )
        config = dataclasses.replace(config or InferenceConfig(), **kwargs)
    result: SegmentationResult = run_to_end(segment_iter(image, model, config, layout, spacing))
    for note in result.messages:
        log.info(note)
    return result.labels, result.features
