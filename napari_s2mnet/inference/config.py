"""Settings, progress reports and results of a segmentation run (no torch: the widgets import it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_s2mnet.layout import ImageLayout

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["InferenceConfig", "Progress", "SegmentationResult"]

#: Largest split_min_distance in pixels (objects of up to ~2000 px across).
MAX_SPLIT_DISTANCE = 1000


@dataclass
class InferenceConfig:
    """Settings of one segmentation run (the single source of the widget's defaults).

    Attributes:
        tile_size: Tile side in pixels (rounded up to a multiple of the network's stride; tiles
            shrink to the image when it is smaller). ``None``: the model's own
            (:attr:`~napari_s2mnet.checkpoint.ModelBundle.tile_size`, the crop size it was
            trained with: S2M-Net's truncated spectrum makes it most accurate at that size).
        overlap: Overlap of neighbouring tiles as a fraction of the tile side, in ``[0, 0.75]``.
        batch_size: Tiles per forward pass.
        threshold: Probability threshold for binary models; ``None`` uses the model's own
            (stored in the model file, default 0.5).
        device: ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        min_size: Objects smaller than this many pixels are removed (binary models).
        fill_holes: Fill holes inside objects (binary models).
        split_touching: Models without an instance head: split touching objects with a
            distance-transform watershed (anisotropic in 3-D). Models with the head always
            separate objects by seeded watershed from their predicted interiors (issue 15).
        split_min_distance: Minimum distance in pixels between the centres of split objects.
        tta: Test-time augmentation: average the probabilities over horizontal/vertical flips
            (4 passes, 4x slower).
        amp: Mixed precision (float16) on CUDA GPUs; ignored on CPU and MPS.
        uncertainty: Also return a per-pixel uncertainty map (normalised entropy, in ``[0, 1]``).
        return_probability: Also return the foreground probability map (float32).
        compute_features: Compute the morphology features table.
        normalize_per_slice: Stacks / time series: normalise every slice with its own statistics
            instead of the whole stack's (the default keeps empty slices dark).
        z_context: Stacks: 2.5-D smoothing. Each slice's probabilities are averaged with those of
            its ``z_context`` neighbours on either side along the last stack axis (z; never
            across time points) before thresholding, so objects stay consistent from slice to
            slice. No extra network passes; memory for ``2 * z_context + 1`` probability maps.
            0 (default): every slice on its own.
        labels_3d: Binary models on ``(..., Z, Y, X)`` stacks (last leading axis named ``z``):
            how objects are followed across planes. ``"auto"``: the measured default
            (:data:`napari_s2mnet.instances.DEFAULT_LABELS_3D`); ``"stitch"``: label every
            plane, then join planes by IoU (Cellpose's ``stitch_threshold`` rule, 0.25);
            ``"watershed"``: 3-D distance-transform watershed of the stacked foreground with
            the layer's anisotropic spacing (seeds ``split_min_distance`` apart); ``"off"``: every plane on its own (ids never span
            planes, the behaviour before issue 15). Time points are never linked.
        backend: What runs the network: ``"auto"`` (a compiled runtime on the CPU when one is
            installed, eager PyTorch on CUDA / MPS), ``"torch"``, ``"openvino"`` or
            ``"onnxruntime"`` (CPU only); see :mod:`napari_s2mnet.inference.backends`.
        input_transform: What the image goes through before the model
            (:data:`napari_s2mnet.stain.INPUT_TRANSFORMS`): ``"none"``; ``"invert"`` for dark
            objects on a bright background (brightfield); ``"hematoxylin"`` for H&E / IHC RGB
            images (the hematoxylin stain of scikit-image's ``rgb2hed``: nuclei become bright).
        diameter: Typical object diameter in the image, in pixels; ``None``: as the model was
            trained (no rescaling; :func:`napari_s2mnet.diameter.estimate_diameter` measures
            it). Each slice is rescaled by ``model diameter / diameter`` before the network and
            the probabilities are resized back, so labels stay on the image's grid.
    """

    tile_size: int | None = None
    overlap: float = 0.125
    batch_size: int = 4
    threshold: float | None = None
    device: str = "auto"
    min_size: int = 10
    fill_holes: bool = False
    split_touching: bool = False
    split_min_distance: int = 5
    tta: bool = False
    amp: bool = True
    uncertainty: bool = False
    return_probability: bool = False
    compute_features: bool = True
    normalize_per_slice: bool = False
    z_context: int = 0
    labels_3d: str = "auto"
    backend: str = "auto"
    input_transform: str = "none"
    diameter: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` with an actionable message for impossible settings."""
        from napari_s2mnet.stain import check_transform

        check_transform(self.input_transform)
        if self.diameter is not None and (
            isinstance(self.diameter, bool)
            or not isinstance(self.diameter, int | float | np.number)
            or not 2 <= float(self.diameter) <= 2000
        ):
            raise ValueError(
                f"diameter must be a number of pixels in [2, 2000] or None (as "
                f"the model was trained), got {self.diameter!r}."
            )
        if self.tile_size is not None and (
            not isinstance(self.tile_size, int | np.integer) or self.tile_size < 16
        ):
            raise ValueError(
                f"tile_size must be an integer >= 16 pixels (or None for the model's own), got "
                f"{self.tile_size!r}."
            )
        if not 0.0 <= float(self.overlap) <= 0.75:
            raise ValueError(
                f"overlap is a fraction of the tile size in [0, 0.75], got {self.overlap!r} "
                "(0.25 = a quarter of a tile)."
            )
        if not isinstance(self.batch_size, int | np.integer) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}.")
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(
                f"threshold must be a probability strictly between 0 and 1 (or None for the "
                f"model's own), got {self.threshold!r}."
            )
        if not isinstance(self.min_size, int | np.integer) or self.min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0 pixels, got {self.min_size!r}.")
        if (
            not isinstance(self.split_min_distance, int | np.integer)
            or not 1 <= self.split_min_distance <= MAX_SPLIT_DISTANCE
        ):
            # The peak search's window is (2 d + 1) pixels wide: 10**9 asked for exabytes.
            raise ValueError(
                f"split_min_distance must be an integer from 1 to {MAX_SPLIT_DISTANCE} pixels, "
                f"got {self.split_min_distance!r}."
            )
        if not isinstance(self.z_context, int | np.integer) or self.z_context < 0:
            raise ValueError(
                f"z_context must be an integer >= 0 slices (0 = no 2.5-D smoothing), got "
                f"{self.z_context!r}."
            )
        if self.labels_3d not in ("auto", "stitch", "watershed", "off"):
            raise ValueError(
                f"labels_3d must be 'auto', 'stitch', 'watershed' or 'off', got {self.labels_3d!r}."
            )
        if self.backend not in ("auto", "torch", "openvino", "onnxruntime"):
            raise ValueError(
                "backend must be 'auto', 'torch', 'openvino' or 'onnxruntime', got "
                f"{self.backend!r}."
            )
        if not isinstance(self.device, str):
            raise TypeError(
                f"device must be a string such as 'auto' or 'cpu', got {self.device!r}."
            )


@dataclass(frozen=True)
class Progress:
    """One progress report of :func:`segment_iter`.

    Attributes:
        done: Work units finished (tiles, plus one post-processing step per slice).
        total: Work units in all (may grow after an out-of-memory fallback to smaller tiles).
        stage: ``"prepare"``, ``"predict"``, ``"postprocess"`` or ``"done"``.
        message: Human-readable detail, e.g. ``"slice 2/5: tile 12/48"``.
    """

    done: int
    total: int
    stage: str
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` in ``[0, 1]``."""
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass
class SegmentationResult:
    """What :func:`segment_iter` returns.

    Attributes:
        labels: Label image shaped like the image without its channel axis; smallest unsigned
            dtype. Instance ids (binary models, unique across slices) or class ids (multi-class).
        features: One row per label id (:func:`napari_s2mnet.morphology.object_features`
            columns, plus one column per leading axis of a stack giving the object's slice).
        probability: Foreground probability (float32, labels' shape) when requested:
            ``p`` for binary models, ``1 - p(background)`` for multi-class models.
        uncertainty: Normalised entropy in ``[0, 1]`` (float32, labels' shape) when requested.
        device: Description of the device that did the work (e.g. ``"CPU (2 threads)"``).
        backend: What ran the network: ``"torch"``, ``"openvino"`` or ``"onnxruntime"``.
        messages: Notes for the user (channel conversions, out-of-memory fallbacks ...).
        threshold: Threshold used (binary models), else ``None``.
        semantic: True for multi-class (class-id) labels.
        layout: The layout that was used.
        spacing: Physical pixel size per labels axis.
        n_tiles: Tiles run through the model (all slices, all fallbacks).
        timings: Seconds per stage (``prepare``, ``predict``, ``postprocess``, ``features``).
    """

    labels: np.ndarray
    features: pd.DataFrame
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    device: str = ""
    backend: str = ""
    messages: list[str] = field(default_factory=list)
    threshold: float | None = None
    semantic: bool = False
    layout: ImageLayout | None = None
    spacing: tuple[float, ...] | None = None
    n_tiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)
