"""The engine: a model on a device, tiles in, blended probabilities out.

Owns the device state: it runs an eval-mode copy of the model with BatchNorm folded into the
convolutions, on the device (a model without BatchNorm is used in place when it already sits on
the device, its training flags restored afterwards); mixed precision (float16 autocast) on
CUDA only; test-time augmentation (flips); and the out-of-memory fallback (one tile per batch,
then smaller tiles, then the CPU), each step noted for the user.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.inference.config import InferenceConfig, Progress
from napari_s2mnet.layout import ImagePlan
from napari_s2mnet.tiling import Grid, blend_iter, grid, pad_to, round_up

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_s2mnet.checkpoint import ModelBundle
    from napari_s2mnet.preprocess import NormalizationStats

__all__ = ["Counter", "Engine"]

log = logging.getLogger(__name__)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move a tensor or module (one place, so tests can simulate a GPU)."""
    return obj.to(device)


def _model_device(model: Any) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _inference_copy(model: Any) -> Any:
    """An eval-mode copy of ``model`` with BatchNorm folded; ``model`` itself if nothing folds."""
    from napari_s2mnet.export import count_foldable, fold_batchnorm

    try:
        if count_foldable(model):
            return fold_batchnorm(model)
    except Exception as exc:  # an unusual network: unfolded is slower, not wrong
        log.debug("BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
    return model


class Engine:
    """Runs tiles through the network; owns the device state and the out-of-memory fallback."""

    def __init__(
        self,
        bundle: ModelBundle,
        config: InferenceConfig,
        notes: list[str],
        channels: tuple[int, ...] | None = None,
    ) -> None:
        """``channels``: the model outputs to blend and return (``None``: all)."""
        from napari_s2mnet import devices

        self.bundle = bundle
        self.config = config
        self.notes = notes
        self.binary = int(bundle.config.num_classes) == 1
        # Binary models with an instance head return foreground + boundary + distance (sigmoids).
        self.out_channels = int(bundle.config.out_channels)
        self.channels = list(channels) if channels is not None else None
        self.stride = max(1, int(getattr(bundle.model, "stride", 1) or 1))
        device = devices.resolve_device(config.device)
        tile = round_up(int(config.tile_size or bundle.tile_size), self.stride)
        self.min_tile = max(self.stride, round_up(64, self.stride))
        self.state = devices.FallbackState(str(device), tile, int(config.batch_size))
        # Per-module flags: eval() below must not leave a trace on the caller's model.
        self.original_modes = [(m, m.training) for m in bundle.model.modules()]
        self.net: Any = None
        self.device: Any = None
        self.n_tiles = 0
        self._set_device(device)
        from napari_s2mnet.inference.backends import resolve_backend

        # "torch" or a compiled CPU runtime (inference/backends.py); a compile failure falls
        # back to "torch" with a note.
        self.backend = resolve_backend(getattr(config, "backend", "auto"), self.device.type)
        self._model_hash: str | None = None
        # Tiles the whole run will predict (set by run.py): "auto" compiles only for big jobs.
        self.planned_tiles = 0

    # -- device handling -----------------------------------------------------------------
    def _set_device(self, device: torch.device) -> None:
        from napari_s2mnet import devices

        model = self.bundle.model
        # A copy with BatchNorm folded into the convolutions (fewer ops per tile; the compiled
        # graph folds the same way), so the caller's model, which fine-tuning keeps training,
        # is never changed. Without BatchNorm it is used in place when already on the device
        # (eval mode restored in close()), else copied there.
        net = _inference_copy(model)
        if _model_device(net) not in (None, device):
            net = _to_device(copy.deepcopy(net) if net is model else net, device)
        net.eval()
        self.net = net
        self.device = device
        self.description = devices.describe_device(device)
        self.amp = bool(self.config.amp) and devices.supports_amp(device)

    def close(self) -> None:
        """Restore the caller's model (training flag) and free the device copy."""
        from napari_s2mnet import devices

        for module, mode in self.original_modes:
            module.training = mode
        copied = self.net is not None and self.net is not self.bundle.model
        self.net = None
        if copied:
            devices.empty_cache(self.device)

    def _fallback(self, exc: BaseException) -> None:
        import torch

        from napari_s2mnet import devices

        step = devices.next_fallback(self.state, min_tile=self.min_tile, multiple=self.stride)
        devices.empty_cache(self.device)
        if step is None:
            raise RuntimeError(
                f"Out of memory even on the CPU with {self.state.tile_size} px tiles. Close other "
                "programs, or segment a smaller image / crop."
            ) from exc
        new, message = step
        log.warning(message)
        self.notes.append(message)
        if new.device != self.state.device:
            if self.net is not self.bundle.model:
                self.net = None
            self._set_device(torch.device(new.device))
        self.state = new

    # -- prediction ------------------------------------------------------------------------
    def grid(self, shape: tuple[int, int]) -> Grid:
        return grid(shape, self.state.tile_size, float(self.config.overlap), self.stride)

    def predict(
        self, region: np.ndarray, plan: ImagePlan, stats: NormalizationStats, counter: Counter
    ) -> Generator[Progress, None, list[np.ndarray]]:
        """Blended probabilities of one 2-D slice ``(Y, X, C_img)``: a ``(Y, X)`` map per output."""
        from napari_s2mnet import devices

        start = counter.done
        while True:
            try:
                return (yield from self._predict_once(region, plan, stats, counter))
            except RuntimeError as exc:
                if not devices.is_oom_error(exc):
                    raise
                counter.done = start  # this slice starts again with the new settings
                old_tiles = counter.tiles_per_slice
                self._fallback(exc)
                counter.tiles_per_slice = self.grid(region.shape[:2]).n_tiles
                counter.total += (counter.tiles_per_slice - old_tiles) * counter.slices_left
            # The failed batch's tensors are only garbage once the exception is gone.
            devices.empty_cache(self.device)

    def _predict_once(
        self, region: np.ndarray, plan: ImagePlan, stats: NormalizationStats, counter: Counter
    ) -> Generator[Progress, None, list[np.ndarray]]:
        from napari_s2mnet.preprocess import apply_normalization

        height, width = region.shape[:2]
        g = self.grid((height, width))

        def predict_batch(batch: list[tuple[int, int]]) -> np.ndarray:
            xs = []
            for sy, sx in batch:
                part = plan.select(region[sy : sy + g.tile_y, sx : sx + g.tile_x])
                part = apply_normalization(part, stats, channel_axis=-1)
                part = pad_to(plan.post(part), g.tile_y, g.tile_x)
                xs.append(part.transpose(2, 0, 1))
            out = self._forward(np.ascontiguousarray(np.stack(xs)))
            return out if self.channels is None else out[:, self.channels]

        n_out = self.out_channels if self.channels is None else len(self.channels)
        blending = blend_iter((height, width), g, n_out, predict_batch, self.state.batch_size)
        done_before = 0
        while True:
            try:
                done = next(blending)
            except StopIteration as stop:
                maps: list[np.ndarray] = stop.value
                break
            self.n_tiles += done - done_before
            counter.done += done - done_before
            done_before = done
            yield counter.progress("predict", f"{counter.slice_text()}tile {done}/{g.n_tiles}")
        for plane in maps:
            np.clip(plane, 0.0, 1.0, out=plane)
        return maps

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = _to_device(torch.from_numpy(batch), self.device)
        flips: list[tuple[int, ...]] = [()]
        if self.config.tta:
            flips += [(-1,), (-2,), (-2, -1)]
        total = None
        with torch.inference_mode():
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    logits = self._logits(xi)
                self._check_output(logits, xi)
                logits = logits.float()
                p = torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=1)
                if dims:
                    p = torch.flip(p, dims)
                total = p if total is None else total + p
            assert total is not None
            if len(flips) > 1:
                total = total / len(flips)
            out = total.cpu().numpy()
        if not np.isfinite(out).all():
            note = "The model produced NaN/Inf outputs for some pixels (treated as background)."
            if note not in self.notes:
                self.notes.append(note)
                log.warning(note)
            np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits for a batch, from eager torch or the compiled runtime."""
        if self.backend == "torch" or not hasattr(self.net, "forward_padded"):
            return self.net(x)
        import torch

        xp, pads = self.net.pad(x)  # pad to the stride as forward() does, outside the graph
        runner = self._runner((int(xp.shape[-2]), int(xp.shape[-1])))
        if runner is None:
            return self.net(x)
        y = torch.from_numpy(runner(xp.contiguous().numpy()))
        return self.net.crop(y, pads)

    def _runner(self, tile: tuple[int, int]) -> Any:
        """The compiled runner for ``tile``; ``None`` (and eager torch from now on) on failure."""
        import torch

        from napari_s2mnet.checkpoint import model_hash
        from napari_s2mnet.inference.backends import AUTO_MIN_TILES, get_runner, is_cached

        try:
            if self._model_hash is None:
                self._model_hash = model_hash(self.bundle.model)
            if (
                getattr(self.config, "backend", "auto") == "auto"
                and self.planned_tiles < AUTO_MIN_TILES
                and not is_cached(self._model_hash, self.backend, tile)
            ):
                self.backend = "torch"  # a small job: compiling would cost more than it saves
                return None
            return get_runner(
                self.net, self._model_hash, self.backend, tile, torch.get_num_threads()
            )
        except Exception as exc:  # any export / compile failure: eager torch still works
            note = f"The {self.backend} backend failed ({exc}); running eager PyTorch instead."
            log.warning(note)
            self.notes.append(note)
            self.backend = "torch"
            return None

    def _check_output(self, logits: Any, x: Any) -> None:
        expected = (x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        if tuple(logits.shape) != expected:
            raise RuntimeError(
                f"The model returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; "
                f"expected {expected}. The model file's config (num_classes="
                f"{self.bundle.config.num_classes}) may not match its network."
            )


@dataclass
class Counter:
    """Progress bookkeeping shared by the slice loop and the engine."""

    total: int
    tiles_per_slice: int
    n_slices: int
    done: int = 0
    slice_index: int = 0

    @property
    def slices_left(self) -> int:
        return self.n_slices - self.slice_index

    def slice_text(self) -> str:
        return f"slice {self.slice_index + 1}/{self.n_slices}: " if self.n_slices > 1 else ""

    def progress(self, stage: str, message: str) -> Progress:
        return Progress(self.done, self.total, stage, message)
