"""Compiled CPU backends: the network as an ONNX graph run by OpenVINO or ONNX Runtime.

``InferenceConfig.backend``:

* ``"auto"`` (default): on the CPU the compiled backend when its package is installed
  (OpenVINO, else ONNX Runtime), eager PyTorch on CUDA / MPS or when neither is installed;
* ``"torch"``: eager PyTorch everywhere;
* ``"openvino"`` / ``"onnxruntime"``: that runtime (CPU only; a clear error when missing).

Why OpenVINO first: on the bundled S2M-Net (2-core CPU, one thread, batch 4 x 224^2) it ran at
0.62x of eager torch's time against 0.70x for ONNX Runtime (``docs/benchmarks.md``), and it is
maintained by Intel with wheels for Linux, Windows and macOS (x86-64 and ARM64).

The graph is the model's padded core with BatchNorm folded into the convolutions
(:func:`napari_s2mnet.export.export_onnx`), built for one tile shape; padding to the stride
and cropping back happen in NumPy around it. Exported graphs are cached on disk per
(model hash, tile shape) in :func:`cache_dir`, and OpenVINO's compiled blobs (one per tile
shape, with a dynamic batch axis) in the same folder: a changed model has a different hash, so
it never reuses a stale graph. The folder is capped at :data:`CACHE_LIMIT_BYTES` (least
recently used files are removed first, :func:`prune_cache`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "BACKENDS",
    "COMPILED_BACKENDS",
    "CompiledRunner",
    "available_backends",
    "cache_dir",
    "get_runner",
    "prune_cache",
    "resolve_backend",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
COMPILED_BACKENDS = ("openvino", "onnxruntime")  # "auto" takes the first one installed
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
CACHE_ENV = "NAPARI_S2MNET_CACHE_DIR"
# "auto" compiles only when the job pays for it: exporting + compiling the bundled S2M-Net costs
# ~8.6 s of CPU and saves ~0.35 s per 224^2 tile (one thread, /tmp/exp_cost.py in
# docs/benchmarks.md), so below ~25 tiles eager torch is faster unless the graph is cached. This
# also keeps a just fine-tuned model's first Segment of a small image immediate.
AUTO_MIN_TILES = 25
#: Size cap of the compiled-model cache folder (graphs + OpenVINO blobs); oldest used go first.
CACHE_LIMIT_BYTES = 512 * 2**20


def available_backends() -> list[str]:
    """Compiled backends whose runtime package (and ``onnx``, for the export) is importable."""
    if importlib.util.find_spec("onnx") is None:
        return []
    return [b for b in COMPILED_BACKENDS if importlib.util.find_spec(_PACKAGES[b]) is not None]


def resolve_backend(name: str, device_type: str) -> str:
    """The backend that will run: ``"torch"`` or a compiled one.

    Raises:
        ValueError: Unknown name, a compiled backend asked for on a GPU, or its package missing.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}.")
    if name == "torch":
        return "torch"
    if name == "auto":
        if device_type != "cpu":
            return "torch"
        found = available_backends()
        return found[0] if found else "torch"
    if device_type != "cpu":
        raise ValueError(
            f"backend={name!r} runs on the CPU, but the device is {device_type!r}; use "
            "device='cpu', or backend='auto' / 'torch' on a GPU."
        )
    if name not in available_backends():
        raise ValueError(
            f"backend={name!r} needs the {_PACKAGES[name]!r} and 'onnx' packages; install them "
            f"(pip install {_PACKAGES[name]} onnx) or use backend='auto' / 'torch'."
        )
    return name


def cache_dir() -> Path:
    """Folder of the compiled-model cache (``$NAPARI_S2MNET_CACHE_DIR`` or the user cache)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-s2mnet")) / "compiled"


class CompiledRunner:
    """One network on one tile shape in a compiled runtime: ``logits = runner(batch)``.

    Args:
        backend: ``"openvino"`` or ``"onnxruntime"``.
        onnx_path: The exported graph (dynamic batch, fixed ``H x W``).
        threads: CPU threads for the runtime.
    """

    def __init__(self, backend: str, onnx_path: Path, threads: int) -> None:
        self.backend = backend
        self.onnx_path = Path(onnx_path)
        self.threads = max(1, int(threads))
        # OpenVINO: one compiled model with a dynamic batch axis up to ``_max_batch``. One model
        # per batch size would cost ~150-190 MB of RSS each for the bundled S2M-Net at 224^2
        # (batch 4 plus a smaller last batch = two or more), at the same speed per tile.
        self._compiled: Any = None
        self._max_batch = 0
        self._session: Any = None
        if backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(
                str(self.onnx_path), opts, providers=["CPUExecutionProvider"]
            )
        elif backend != "openvino":
            raise ValueError(f"Unknown compiled backend {backend!r}.")

    def _openvino(self, batch: int) -> Any:
        if self._compiled is None or batch > self._max_batch:
            import openvino as ov

            self._compiled = None  # free the smaller one first
            upper = max(batch, 4)
            core = ov.Core()
            model = core.read_model(str(self.onnx_path))
            h, w = _onnx_tile(model)
            shape = ov.PartialShape([ov.Dimension(1, upper), _in_channels(model), h, w])
            model.reshape({model.input(0).get_any_name(): shape})
            config = {
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
                "CACHE_DIR": str(self.onnx_path.parent / "openvino"),
            }
            self._compiled = core.compile_model(model, "CPU", config)
            self._max_batch = upper
        return self._compiled

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(B, C_out, H, W)`` float32 for a float32 ``(B, C_in, H, W)`` batch."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._session is not None:
            return self._session.run(None, {"input": x})[0]
        compiled = self._openvino(int(x.shape[0]))
        request = compiled.create_infer_request()
        out = request.infer({0: x})[compiled.output(0)]
        return np.array(out, dtype=np.float32, copy=True)


def _onnx_tile(model: Any) -> tuple[int, int]:
    dims = model.input(0).get_partial_shape()
    return int(dims[2].get_length()), int(dims[3].get_length())


def _in_channels(model: Any) -> int:
    return int(model.input(0).get_partial_shape()[1].get_length())


def prune_cache(folder: Path, keep: Path | None = None, limit: int | None = None) -> int:
    """Delete the least recently used cache files until ``folder`` holds at most ``limit``
    bytes (default :data:`CACHE_LIMIT_BYTES`); ``keep`` is never deleted. Returns the bytes
    freed.

    Every fine-tuned model has its own hash, so without a cap the cache grows by ~20 MB (the
    bundled model's graph) per fine-tune that is then used on a large image.
    """
    limit = CACHE_LIMIT_BYTES if limit is None else int(limit)
    files = []
    for f in folder.rglob("*"):
        try:
            if f.is_file() and f != keep:
                st = f.stat()
                files.append((st.st_mtime, st.st_size, f))
        except OSError:  # removed meanwhile by another process
            continue
    total = sum(size for _, size, _ in files)
    if keep is not None and keep.is_file():
        total += keep.stat().st_size
    freed = 0
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= limit:
            break
        try:
            f.unlink()
        except OSError:
            continue
        total -= size
        freed += size
    if freed:
        log.info("Compiled-model cache: removed %.0f MB of least recently used files", freed / 1e6)
    return freed


_RUNNERS: dict[tuple[str, str, int, int], CompiledRunner] = {}
_LOCK = threading.Lock()
_MAX_RUNNERS = 8


def is_cached(model_hash: str, backend: str, tile: tuple[int, int]) -> bool:
    """Whether the graph for (model, tile) is compiled in memory or exported on disk."""
    h, w = int(tile[0]), int(tile[1])
    with _LOCK:
        if (backend, model_hash, h, w) in _RUNNERS:
            return True
    return (cache_dir() / f"{model_hash[:24]}_{h}x{w}.onnx").is_file()


def get_runner(
    model: nn.Module, model_hash: str, backend: str, tile: tuple[int, int], threads: int
) -> CompiledRunner:
    """The runner for ``model`` on ``tile`` (exported and compiled on first use, then cached).

    Args:
        model: The network (its padded core is exported; BatchNorm folded).
        model_hash: :func:`napari_s2mnet.checkpoint.model_hash` of ``model`` (the cache key).
        backend: ``"openvino"`` or ``"onnxruntime"``.
        tile: Padded tile ``(H, W)``, multiples of the model's stride.
        threads: CPU threads for the runtime.
    """
    from napari_s2mnet.export import export_onnx

    h, w = int(tile[0]), int(tile[1])
    key = (backend, model_hash, h, w)
    with _LOCK:
        runner = _RUNNERS.get(key)
        if runner is not None and runner.threads == max(1, int(threads)):
            return runner
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{model_hash[:24]}_{h}x{w}.onnx"
        if not path.is_file():
            log.info("Compiling the model for %s on %d x %d tiles (once)", backend, h, w)
            export_onnx(model, path, (h, w))
            prune_cache(folder, keep=path)
        else:
            path.touch()  # recently used: pruned last
        runner = CompiledRunner(backend, path, threads)
        if len(_RUNNERS) >= _MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS)))
        _RUNNERS[key] = runner
        return runner
