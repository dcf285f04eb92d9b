"""From blended probabilities to labels, uncertainty and the features table.

Binary models: threshold, optional hole filling, 8-connected components, optional split of
touching objects (distance transform + ``peak_local_max`` + watershed), removal of objects
smaller than ``min_size``, sequential ids. Multi-class models: semantic labels (argmax class id).
Binary models with the instance head (issue 15): seeded watershed from the predicted distance
map (:func:`napari_s2mnet.instances.seeded_watershed`) instead of components / the distance
split; only the foreground and distance outputs are blended (:func:`needed_channels`).
Stacks: optional 2.5-D smoothing of the probabilities along z, ids unique across slices, and for
multi-class models one feature row per class over the whole stack. Binary ``(..., Z, Y, X)``
stacks are labelled in 3-D (``InferenceConfig.labels_3d``): objects span planes, the features
table has one row of 3-D morphology per object (:mod:`napari_s2mnet.morphology3d`); time
points are never linked.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.inference.config import InferenceConfig, Progress
from napari_s2mnet.layout import ImagePlan
from napari_s2mnet.tiling import ROW_BLOCK as _ROW_BLOCK

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "Predicted",
    "SliceResults",
    "aggregate_semantic",
    "entropy",
    "instances",
    "needed_channels",
    "semantic",
    "split_touching",
    "z_smoothed",
]


def instances(
    prob: np.ndarray,
    threshold: float,
    config: InferenceConfig,
    distance: np.ndarray | None = None,
    spacing: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, int]:
    """Instance labels (smallest uint dtype) and their count from a probability map.

    Args:
        prob: ``(Y, X)`` (or ``(Z, Y, X)``) foreground probability.
        threshold: Foreground threshold.
        config: ``fill_holes``, ``split_touching``, ``split_min_distance``, ``min_size``.
        distance: The instance head's distance map (the interior the seeds come from, see
            :func:`napari_s2mnet.instances.interior_map`), or ``None`` for a model without it.
            Used as float16 and released after the watershed: pass the only reference to
            keep the peak memory down.
        spacing: Physical size per axis of ``prob`` (3-D: anisotropic watershed).
    """
    from scipy import ndimage as ndi

    from napari_s2mnet.instances import distance_watershed, interior_map, seeded_watershed

    if distance is not None:
        # Seeding and flooding need no float32: float16 steps (<= 5e-4 on [0, 1]) are far
        # below what the backends differ by (~1e-2), and the map shrinks by half (128 MiB at
        # 8192^2). A caller that passes its only reference has the float32 map freed here.
        distance = np.asarray(distance).astype(np.float16)
        inner = interior_map(prob, distance=distance, mode="distance")
        del distance
        lab, n = seeded_watershed(prob, inner, threshold=threshold, spacing=spacing)
        del inner
        if config.fill_holes:  # holes inside an object join it (per plane)
            filled = ndi.binary_fill_holes(lab > 0) if lab.ndim == 2 else lab > 0
            if (filled & (lab == 0)).any():
                from skimage.segmentation import expand_labels

                lab = np.where(filled, expand_labels(lab, 3), 0).astype(np.int32)
        return _drop_small(lab, n, config.min_size)
    mask = prob > threshold
    if config.fill_holes:
        mask = ndi.binary_fill_holes(mask)
    lab = np.zeros(mask.shape, dtype=np.int32)
    n = int(
        ndi.label(mask, structure=ndi.generate_binary_structure(mask.ndim, mask.ndim), output=lab)
    )
    if n and config.split_touching:
        if mask.ndim == 2 and spacing is None:
            lab, n = split_touching(mask, lab, n, config.split_min_distance)
        else:
            lab, n = distance_watershed(
                mask, min_distance=config.split_min_distance, spacing=spacing
            )
    del mask
    return _drop_small(lab, n, config.min_size)


def needed_channels(out_channels: int, binary: bool) -> tuple[int, ...] | None:
    """The model outputs post-processing uses (``None``: all of them).

    A binary model with the instance head returns foreground, boundary and distance; the
    seeds come from the distance map alone (the ``"distance"`` interior, chosen by measurement:
    docs/methods.md), so the boundary map is never blended: one float32 plane less per pixel
    (256 MiB at 8192^2).
    """
    from napari_s2mnet.instances import INSTANCE_CHANNELS

    if binary and out_channels == 1 + len(INSTANCE_CHANNELS):
        return (0, 1 + INSTANCE_CHANNELS.index("distance"))
    return None


def _drop_small(lab: np.ndarray, n: int, min_size: int) -> tuple[np.ndarray, int]:
    """Remove objects under ``min_size`` pixels, renumber ``1..count`` in the smallest dtype."""
    from napari_s2mnet.io import smallest_uint_dtype

    if n == 0:
        return np.zeros(lab.shape, dtype=np.uint8), 0
    sizes = np.zeros(n + 1, dtype=np.int64)
    for r0 in range(0, lab.shape[0], _ROW_BLOCK):  # bincount makes an int64 copy: go by blocks
        sizes += np.bincount(lab[r0 : r0 + _ROW_BLOCK].ravel(), minlength=n + 1)
    keep = sizes >= max(1, int(min_size))
    keep[0] = False
    count = int(keep.sum())
    dtype = smallest_uint_dtype(count)
    lut = np.zeros(sizes.size, dtype=dtype)
    lut[keep] = np.arange(1, count + 1, dtype=dtype)
    return lut[lab], count


def split_touching(
    mask: np.ndarray, lab: np.ndarray, n: int, min_distance: int
) -> tuple[np.ndarray, int]:
    """Split touching objects: watershed of the distance transform from its local maxima."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=int(min_distance), labels=lab, exclude_border=False)
    marker_mask = np.zeros(mask.shape, dtype=bool)
    marker_mask[tuple(peaks.T)] = True
    # Neighbouring peak pixels (plateaus) form one marker, not several.
    markers = np.zeros(mask.shape, dtype=np.int32)
    m = int(ndi.label(marker_mask, structure=np.ones((3, 3), dtype=bool), output=markers))
    split = watershed(-dist, markers, mask=mask).astype(np.int32, copy=False)
    # Objects that got no marker (too small for a peak) keep their connected component.
    missed = mask & (split == 0)
    if missed.any():
        extra = np.zeros(mask.shape, dtype=np.int32)
        k = int(ndi.label(missed, structure=np.ones((3, 3), dtype=bool), output=extra))
        split[missed] = extra[missed] + m
        m += k
    return split, m


def semantic(maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-id labels, confidence (max probability) and foreground probability, in row blocks.

    ``maps``: the class probabilities, a ``(C, Y, X)`` array or ``C`` ``(Y, X)`` maps.
    """
    from napari_s2mnet.io import smallest_uint_dtype

    c = len(maps)
    height, width = maps[0].shape
    labels = np.empty((height, width), dtype=smallest_uint_dtype(c - 1))
    conf = np.empty((height, width), dtype=np.float32)
    fg = np.empty((height, width), dtype=np.float32)
    for r0 in range(0, height, _ROW_BLOCK):
        block = np.stack([m[r0 : r0 + _ROW_BLOCK] for m in maps])
        labels[r0 : r0 + _ROW_BLOCK] = block.argmax(axis=0)
        conf[r0 : r0 + _ROW_BLOCK] = block.max(axis=0)
        fg[r0 : r0 + _ROW_BLOCK] = 1.0 - block[0]
    return labels, conf, fg


def entropy(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Normalised entropy in ``[0, 1]`` per pixel (binary: of ``p``; else over the classes).

    ``maps``: a ``(C, Y, X)`` array or ``C`` ``(Y, X)`` maps (one: binary).
    """
    c = len(maps)
    height, width = maps[0].shape
    out = np.empty((height, width), dtype=np.float32)
    eps = 1e-7
    for r0 in range(0, height, _ROW_BLOCK):
        block = np.stack([m[r0 : r0 + _ROW_BLOCK] for m in maps])
        block = np.clip(block, eps, 1.0).astype(np.float64)
        if c == 1:
            p = block[0]
            q = np.clip(1.0 - p, eps, 1.0)
            h = -(p * np.log2(p) + q * np.log2(q))
        else:
            h = -(block * np.log(block)).sum(axis=0) / np.log(c)
        out[r0 : r0 + _ROW_BLOCK] = np.clip(h, 0.0, 1.0)
    return out


def aggregate_semantic(df: pd.DataFrame, n_slices: int, slice_area: float) -> pd.DataFrame:
    """One row per class over all slices of a stack.

    Areas add up; ``scale`` is the class's share of the whole stack; the shape descriptors and
    the mean probability are area-weighted means over the slices (the convention
    :func:`napari_s2mnet.morphology.mask_descriptors` uses for several objects).
    """
    import pandas as pd

    from napari_s2mnet.morphology import FEATURE_COLUMNS

    rows = []
    for lid, g in df.groupby("label", sort=True):
        w = g["area_px"].to_numpy(dtype=np.float64)
        wsum = w.sum() or 1.0
        row: dict[str, Any] = {
            "index": int(lid),
            "label": int(lid),
            "area_px": int(w.sum()),
            "area": float(g["area"].sum()),
            "scale": float(w.sum() / (n_slices * slice_area)),
            "class": int(g["class"].iloc[0]),
        }
        for col in ("compactness", "tubularity", "irregularity", "mean_probability"):
            row[col] = float((g[col].to_numpy(dtype=np.float64) * w).sum() / wsum)
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(FEATURE_COLUMNS))
    return out.astype({"index": "int64", "label": "int64", "area_px": "int64", "class": "int64"})


@dataclass
class Predicted:
    """The blended probabilities of the slice at leading index ``idx``: one ``(H, W)`` float32
    map per output channel (a list, so a consumer can pop and free each when done with it)."""

    idx: tuple[int, ...]
    maps: list[np.ndarray]


def z_smoothed(
    stream: Generator[Progress | Predicted, None, None], n: int, lead: tuple[int, ...]
) -> Generator[Progress | Predicted, None, None]:
    """Average every slice's probabilities over its +-``n`` neighbours along the last lead axis.

    Progress passes through; slices come out in the order they went in, each as soon as its
    last neighbour has arrived (so at most ``2n + 1`` maps are held). Windows are clipped at the
    ends of the axis and never cross the other lead axes (time points).
    """
    depth = lead[-1]
    window: dict[int, list[np.ndarray]] = {}  # z -> probabilities of the current z-run
    pending: deque[tuple[int, ...]] = deque()

    def emit(idx: tuple[int, ...]) -> Predicted:
        z = idx[-1]
        neighbours = [window[j] for j in range(max(0, z - n), min(depth, z + n + 1))]
        out = [
            np.mean([maps[c] for maps in neighbours], axis=0, dtype=np.float64).astype(np.float32)
            for c in range(len(neighbours[0]))
        ]
        for j in [j for j in window if j < z - n + 1]:  # no later slice needs these
            del window[j]
        return Predicted(idx, out)

    for item in stream:
        if isinstance(item, Progress):
            yield item
            continue
        window[item.idx[-1]] = item.maps
        pending.append(item.idx)
        # The oldest pending slice is ready when its window's last slice is in.
        while pending and min(depth - 1, pending[0][-1] + n) <= item.idx[-1]:
            yield emit(pending.popleft())
        if not pending:  # only at the end of a z-run (n >= 1): the next time point starts afresh
            window.clear()
    while pending:
        yield emit(pending.popleft())


def assemble(
    slices: list[np.ndarray],
    offsets: list[int],
    plan: ImagePlan,
    max_id: int,
    smallest: Callable[[int], np.dtype],
) -> np.ndarray:
    """The label image from the slices' labels, each slice's ids shifted by its offset."""
    dtype = smallest(max_id)
    if not plan.lead:
        return slices[0].astype(dtype, copy=False)
    out = np.zeros((*plan.lead, *plan.spatial), dtype=dtype)
    for idx, lab, off in zip(np.ndindex(*plan.lead), slices, offsets, strict=True):
        if off:
            fg = lab > 0
            out[idx][fg] = lab[fg].astype(dtype) + dtype.type(off)
        else:
            out[idx] = lab
    return out


def combine_features(
    frames: list[pd.DataFrame], plan: ImagePlan, binary: bool, wanted: bool
) -> pd.DataFrame:
    """One table from the slices' tables (multi-class stacks: one row per class)."""
    import pandas as pd

    from napari_s2mnet.morphology import empty_features

    if not wanted:
        return empty_features()
    parts = [f for f in frames if len(f)]
    if not parts:
        df = empty_features()
        if binary:
            for name in plan.lead_names:
                df[name] = pd.Series(dtype="int64")
        return df
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if not binary and plan.lead:
        df = aggregate_semantic(df, plan.n_slices, float(plan.spatial[0] * plan.spatial[1]))
    return df.reset_index(drop=True)


class SliceResults:
    """Post-processes the slices one by one and collects their labels, maps and features.

    Args:
        plan: The planned image.
        config: Run settings.
        binary: Binary (instances) or multi-class (semantic labels) model.
        threshold: Probability threshold (binary models).
        spacing: Pixel size per labels axis (the last two are used for the features).
        timings: ``postprocess`` and ``features`` seconds are added here.
    """

    def __init__(
        self,
        plan: ImagePlan,
        config: InferenceConfig,
        binary: bool,
        threshold: float,
        spacing: tuple[float, ...],
        timings: dict[str, float],
    ) -> None:
        self.plan = plan
        self.config = config
        self.binary = binary
        self.threshold = threshold
        self.spacing = spacing
        self.timings = timings
        self.slice_labels: list[np.ndarray] = []
        self.offsets: list[int] = []
        self.frames: list[pd.DataFrame] = []
        self.probability: np.ndarray | None = None
        self.uncertainty: np.ndarray | None = None
        self.total_objects = 0
        self.volume = self._volume_mode()  # 3-D labelling of z-runs (binary stacks)
        self._run: list[tuple[Any, Any]] = []  # the current z-run's planes

    def add(self, idx: tuple[int, ...], maps: list[np.ndarray]) -> None:
        """Post-process the blended probabilities of slice ``idx``, a ``(Y, X)`` map per channel.

        The maps are popped from ``maps`` as they are used, so a caller that passes its only
        list frees each map early (the distance map right after the watershed).
        """
        from napari_s2mnet.morphology import object_features

        cfg, plan = self.config, self.plan
        t1 = time.perf_counter()
        unc = entropy(maps[:1] if self.binary else maps) if cfg.uncertainty else None
        if self.binary:
            # What is left in ``maps`` is the instance head's distance map, if the model has
            # one (the engine blends only needed_channels); it is popped straight into
            # instances(), which then holds the only reference and frees it after the watershed.
            prob = maps.pop(0)
            conf = prob
            classes = None
        else:
            lab, conf, prob = semantic(maps)
            maps.clear()
            count = int(lab.max()) if lab.size else 0
            classes = lab
        if cfg.return_probability:
            self.probability = self._store(self.probability, idx, prob)
        if unc is not None:
            self.uncertainty = self._store(self.uncertainty, idx, unc)
        if self.volume is not None:
            self._add_to_volume(idx, prob, maps)
            self.timings["postprocess"] += time.perf_counter() - t1
            return
        if self.binary:
            lab, count = instances(prob, self.threshold, cfg, maps.pop() if maps else None)
        t2 = time.perf_counter()
        self.timings["postprocess"] += t2 - t1

        offset = self.total_objects if self.binary else 0
        if cfg.compute_features:
            df = object_features(lab, spacing=self.spacing[-2:], probability=conf, classes=classes)
            if offset:
                df["index"] += offset
                df["label"] += offset
            for name, i in zip(plan.lead_names, idx, strict=True):
                df[name] = i
            self.frames.append(df)
        self.timings["features"] += time.perf_counter() - t2
        del prob, conf, classes
        self.slice_labels.append(lab)
        self.offsets.append(offset)
        if self.binary:
            self.total_objects += count
        else:
            self.total_objects = max(self.total_objects, count)

    def _volume_mode(self) -> str | None:
        """``"stitch"`` / ``"watershed"`` for binary (..., Z, Y, X) stacks, else ``None``."""
        from napari_s2mnet.instances import DEFAULT_LABELS_3D

        plan = self.plan
        if not self.binary or not plan.lead or plan.lead_names[-1] != "z" or plan.lead[-1] < 2:
            return None
        mode = DEFAULT_LABELS_3D if self.config.labels_3d == "auto" else self.config.labels_3d
        return None if mode == "off" else mode

    def _add_to_volume(
        self, idx: tuple[int, ...], prob: np.ndarray, rest: list[np.ndarray]
    ) -> None:
        """Collect one plane of the current z-run; label the run in 3-D at its last plane.

        ``rest``: the plane's maps after the foreground (the distance map, if any).
        """
        if self.volume == "stitch":  # per-plane labels now, only the joining waits
            lab, _ = instances(prob, self.threshold, self.config, rest.pop() if rest else None)
            self._run.append((lab, prob if self.config.compute_features else None))
        else:  # the 3-D watershed needs the foreground only (see _finish_volume)
            rest.clear()
            self._run.append((prob, None))
        if idx[-1] == self.plan.lead[-1] - 1:
            self._finish_volume(idx[:-1])

    def _finish_volume(self, outer: tuple[int, ...]) -> None:
        """3-D labels and 3-D features of the z-run at outer index ``outer`` (time point)."""
        from napari_s2mnet.instances import STITCH_THRESHOLD, stitch_planes
        from napari_s2mnet.morphology3d import object_features_3d

        t1 = time.perf_counter()
        sp3 = tuple(self.spacing[-3:])
        if self.volume == "stitch":
            vol = stitch_planes(np.stack([lab for lab, _ in self._run]), STITCH_THRESHOLD)
            n = int(vol.max()) if vol.size else 0
            prob = np.stack([p for _, p in self._run]) if self.config.compute_features else None
        else:
            # Anisotropic 3-D distance-transform watershed of the foreground, for every binary
            # model: the instance head's maps are normalised per 2-D cross-section, and seeds
            # from them merge nuclei stacked in z (3-D F1@0.5 0.13 against 0.57 on the 3-D
            # nuclei stack, docs/benchmarks.md).
            import dataclasses

            prob = np.stack([p for p, _ in self._run])
            cfg = dataclasses.replace(self.config, split_touching=True)
            vol, n = instances(prob, self.threshold, cfg, None, spacing=sp3)
        self._run = []
        t2 = time.perf_counter()
        self.timings["postprocess"] += t2 - t1
        offset = self.total_objects
        if self.config.compute_features:
            df = object_features_3d(vol, spacing=sp3, probability=prob)
            if offset:
                df["index"] += offset
                df["label"] += offset
            for name, i in zip(self.plan.lead_names[:-1], outer, strict=True):
                df[name] = i
            self.frames.append(df)
        self.timings["features"] += time.perf_counter() - t2
        for z in range(vol.shape[0]):
            self.slice_labels.append(vol[z])
            self.offsets.append(offset)
        self.total_objects += n

    def _store(self, out: np.ndarray | None, idx: tuple[int, ...], plane: np.ndarray) -> np.ndarray:
        """``plane`` itself for a 2-D image; else written into the (new) stack ``out``."""
        if not self.plan.lead:
            return plane
        if out is None:
            out = np.empty((*self.plan.lead, *self.plan.spatial), dtype=np.float32)
        out[idx] = plane
        return out

    def labels(self) -> np.ndarray:
        """The label image of all slices (smallest unsigned dtype); frees the slices."""
        from napari_s2mnet.io import smallest_uint_dtype

        out = assemble(
            self.slice_labels, self.offsets, self.plan, self.total_objects, smallest_uint_dtype
        )
        self.slice_labels = []
        return out

    def features(self) -> pd.DataFrame:
        """The features table of all slices (3-D labelled stacks: one 3-D row per object)."""
        if self.volume is not None and self.config.compute_features:
            import pandas as pd

            from napari_s2mnet.morphology3d import object_features_3d

            parts = [f for f in self.frames if len(f)]
            if parts:
                df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            else:
                df = object_features_3d(np.zeros((1, 1, 1), dtype=np.uint8))
                for name in self.plan.lead_names[:-1]:
                    df[name] = pd.Series(dtype="int64")
            attrs = dict(df.attrs)
            df = df.reset_index(drop=True)
            df.attrs.update(attrs)
            return df
        return combine_features(self.frames, self.plan, self.binary, self.config.compute_features)
