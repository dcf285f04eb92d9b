"""Inference: image -> normalise -> tiles -> model -> blend -> labels + features.

What the Segment widget, the CLI (``python -m napari_s2mnet predict``) and the Python API
(:func:`segment`) call. The work is a generator (:func:`segment_iter`) that yields
:class:`Progress` after every batch of tiles and returns a :class:`SegmentationResult`; closing the
generator at any ``yield`` stops it without side effects (the model is left as it was, no file or
global setting is changed).

How an image is processed:

1. **Layout.** ``(Y, X)`` gray, ``(Y, X, 3|4)`` RGB(A) (alpha dropped), a channel axis anywhere
   (:class:`ImageLayout`), and up to two leading axes (``(Z|T, Y, X)``, ``(T, Z, Y, X)``) that
   are segmented slice by slice. Channels are matched to the model as in training: a 1-channel
   model on RGB sees the mean of the normalised colour channels, a multi-channel model on gray
   sees the gray replicated; any other mismatch is an error that says what to choose.
2. **Normalisation** with the model's :class:`~napari_s2mnet.preprocess.NormalizationConfig`;
   the statistics come from the whole image (or stack, or each slice with
   ``normalize_per_slice``), never from a tile, so all tiles are scaled alike and exactly as
   :func:`~napari_s2mnet.preprocess.normalize` scales the whole image. Tiles are normalised when
   they are cut out, so no full-size float copy of the image is ever made.
3. **Tiles.** Square tiles (a multiple of the network's stride, shrunk to the image when the
   image is smaller) on a grid whose starts are multiples of the stride, overlapping by
   ``overlap`` of a tile; the last row/column of tiles reaches past the image by less than one
   stride and is filled by mirroring. Each tile's probabilities are weighted by a separable
   Hann window (``sin^2``, positive everywhere) and accumulated; the sum of the weights is
   separable too (one vector per axis), so memory is one float32 map per output channel.
4. **Post-processing.** Binary models: threshold (model's own unless set), optional hole
   filling, 8-connected components (``scipy.ndimage.label``, what ``skimage.measure.label`` does,
   but writing int32 instead of int64), optional split of touching objects (distance transform
   + ``peak_local_max`` + watershed), removal of objects smaller than ``min_size`` and sequential
   ids. Multi-class models: semantic labels (label = argmax class id). Stacks get ids that are
   unique across slices (each slice's ids are offset by the objects before it). Labels use the
   smallest unsigned dtype (:func:`napari_s2mnet.io.smallest_uint_dtype`).
5. **Features** from :func:`napari_s2mnet.morphology.object_features` per 2-D slice, with the
   physical pixel size from ``spacing`` and the mean probability per object.

Bad input raises ``ValueError``/``TypeError`` with what was wrong and what to do, before torch
sees it. Images with NaN or Inf values are refused (replace them first, e.g.
``np.nan_to_num(image)``): silently replacing them would hide a problem with the data.

GPU memory: a CUDA/MPS out-of-memory error is retried with one tile per batch, then smaller tiles,
then on the CPU; each step is recorded in :attr:`SegmentationResult.messages`. Mixed precision
(float16 autocast) is used on CUDA only.

Modules: :mod:`~napari_s2mnet.inference.config` (settings, progress, result; no torch),
:mod:`~napari_s2mnet.inference.engine` (device, mixed precision, TTA, out-of-memory fallback),
:mod:`~napari_s2mnet.inference.postprocess` (labels, uncertainty, z smoothing, features) and
:mod:`~napari_s2mnet.inference.run` (:func:`segment_iter`, :func:`segment`). Layouts and the input
checks live in :mod:`napari_s2mnet.layout`, the tile grid and blending in
:mod:`napari_s2mnet.tiling`. Importing this package does not import torch.
"""

from napari_s2mnet.inference.config import InferenceConfig, Progress, SegmentationResult
from napari_s2mnet.inference.run import run_to_end, segment, segment_iter
from napari_s2mnet.layout import ImageLayout, guess_layout

__all__ = [
    "ImageLayout",
    "InferenceConfig",
    "Progress",
    "SegmentationResult",
    "guess_layout",
    "run_to_end",
    "segment",
    "segment_iter",
]
