"""Model files: one ``.safetensors`` file per model with its JSON config in the header.

A model file is a plain `safetensors <https://huggingface.co/docs/safetensors>`_ file:

* the tensors are the network's full ``state_dict`` (parameters *and* buffers such as batch-norm
  running statistics), stored contiguous and unshared;
* the header's ``__metadata__`` (``str -> str``) holds JSON strings: ``format`` / ``format_version``
  (the marker this module checks), ``config`` (:meth:`ModelConfig.to_dict`), ``normalization``,
  ``metadata`` (name, created, parent hash, training history, metrics, threshold, data
  provenance ...), ``package_version`` and ``weights_sha256`` (a checksum of the tensors).

Loading never unpickles and never runs code from the file: the header is checked by hand (length
field, JSON, tensor table) before safetensors reads the tensors, and a file that is something else
(a ``torch.save`` pickle or zip, random bytes, a truncated download ...) is refused with a message
that says what it appears to be.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_s2mnet._atomic import commit, new_temp_file, resolve_target
from napari_s2mnet.header_checks import (
    check_json_depth,
    guarded_build,
    validate_metadata,
    validate_model_config,
)
from napari_s2mnet.model.registry import ModelConfig
from napari_s2mnet.preprocess import NormalizationConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

FORMAT_NAME = "napari-s2mnet"
FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "s2mnet_default.safetensors"
EXPECTED = "a .safetensors model saved by napari-s2mnet"
DEFAULT_TILE_SIZE = 512  # inference tile of a model without training history

# Sizes of one element per safetensors dtype (used to check the tensor table before loading).
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Our headers are ~50 KB (the tensor table plus the training history); safetensors allows 100 MB,
# but a header this module would have to scan and parse is bounded much lower.
_MAX_HEADER = 16 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass
class ModelBundle:
    """A network together with everything needed to use it correctly.

    Attributes:
        model: The ``torch.nn.Module`` (see the contract in :mod:`napari_s2mnet.model.registry`).
        config: Architecture config (rebuilds ``model``).
        normalization: How input images are normalised (same in training and inference).
        metadata: Free-form JSON-serialisable provenance: ``name``, ``created``, ``parent``
            (hash of the model it was fine-tuned from), ``trained_on`` (number of images),
            ``history`` (list of training runs), ``threshold``, ``metrics``, ``data`` ...
    """

    model: nn.Module
    config: ModelConfig
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Human-readable model name."""
        return str(self.metadata.get("name", self.config.arch))

    @property
    def threshold(self) -> float:
        """Probability threshold for binary models (stored in the metadata, default 0.5)."""
        return float(self.metadata.get("threshold", 0.5))

    @property
    def trained_tile_size(self) -> int | None:
        """The crop side this model was trained with, if known (else ``None``).

        Metadata ``tile_size`` if set, else the crop size of the first training run in
        ``history`` (the one that trained it from scratch).
        """
        explicit = self.metadata.get("tile_size")
        if explicit:
            return int(explicit)
        for run in self.metadata.get("history", []) or []:
            crop = (run.get("config") or {}).get("crop_size") if isinstance(run, dict) else None
            if crop:
                return int(crop)
        return None

    @property
    def tile_size(self) -> int:
        """The inference tile side this model works best at, in pixels.

        A network with a truncated spectrum (S2M-Net's SSTM) sees the same image content at
        different frequencies when the input size changes, so it segments best on tiles the size
        of its training crops: :attr:`trained_tile_size`, else :data:`DEFAULT_TILE_SIZE`.
        """
        return self.trained_tile_size or DEFAULT_TILE_SIZE


def new_model(
    config: ModelConfig | None = None,
    normalization: NormalizationConfig | None = None,
    name: str | None = None,
) -> ModelBundle:
    """A randomly initialised model bundle for ``config`` (default: binary 3-channel S2M-Net)."""
    from napari_s2mnet.model import build_model

    config = config or ModelConfig()
    return ModelBundle(
        model=build_model(config),
        config=config,
        normalization=normalization or NormalizationConfig(),
        metadata={"name": name or f"{config.arch} (untrained)", "created": _now()},
    )


# --------------------------------------------------------------------------------------------
# hashing


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict: names, dtypes, shapes and raw bytes, in sorted name order.

    Independent of the device and of memory layout, so the same weights always hash the same.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode("utf-8"))
        h.update(str(t.dtype).encode("ascii"))
        h.update(repr(tuple(t.shape)).encode("ascii"))
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(_uint8()).numpy()))
    return h.hexdigest()


def model_hash(bundle: ModelBundle | nn.Module) -> str:
    """SHA-256 (hex) of a model's full state (parameters and buffers); see :func:`state_hash`."""
    model = bundle.model if isinstance(bundle, ModelBundle) else bundle
    return state_hash(model.state_dict())


def _uint8() -> Any:
    import torch

    return torch.uint8


# --------------------------------------------------------------------------------------------
# saving


def save_model(bundle: ModelBundle, path: str | os.PathLike) -> Path:
    """Write ``bundle`` to one ``.safetensors`` file, atomically.

    The file is first written to a temporary file in the same folder and then moved over
    ``path`` with :func:`os.replace`, so a failure (full disk, killed process) leaves any previous
    file at ``path`` intact and no temporary file behind. A new file follows the umask, an
    overwritten one keeps its mode, and a symlink is written through to its target.

    Args:
        bundle: The model and its config, normalisation and metadata. It is not modified.
        path: Destination; the ``.safetensors`` suffix is recommended (a warning-free load does
            not depend on it).

    Returns:
        The path written.

    Raises:
        TypeError: The metadata is not JSON-serialisable or the state holds non-tensors.
        ValueError: ``path`` is a device, pipe or socket (it is not replaced).
        OSError: Writing failed (the previous file, if any, is untouched).
    """
    import torch
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder; give a file name such as {path / 'model.safetensors'}."
        )
    # A symlink is written through (its shared target is updated, the link stays); a device,
    # pipe or socket is refused instead of being replaced by a regular file.
    target = resolve_target(path)
    if not target.parent.exists():
        raise FileNotFoundError(f"Folder {target.parent} does not exist; create it first.")

    tensors: dict[str, torch.Tensor] = {}
    for name, value in bundle.model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"State entry {name!r} is a {type(value).__name__}, not a tensor.")
        # A private contiguous CPU copy: safetensors refuses shared or strided storage.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()

    meta = dict(copy.deepcopy(bundle.metadata))
    meta.setdefault("name", bundle.name)
    meta.setdefault("created", _now())
    meta["package_version"] = _package_version()
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": _dumps(bundle.config.to_dict(), "config"),
        "normalization": _dumps(bundle.normalization.to_dict(), "normalization"),
        "metadata": _dumps(meta, "metadata"),
        "package_version": _package_version(),
        "weights_sha256": state_hash(tensors),
        "saved": _now(),
    }
    data = st_save(tensors, metadata=header)
    _atomic_write(target, data)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    # A temporary file in the destination folder: os.replace is only atomic within one file
    # system. New files follow the umask; an overwritten file keeps its mode.
    tmp = new_temp_file(path)
    try:
        with open(tmp, "wb") as fh:
            _write_bytes(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_bytes(fh: Any, data: bytes) -> None:
    """Write ``data`` in chunks (a separate function so tests can simulate a full disk)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start : start + _CHUNK])


# --------------------------------------------------------------------------------------------
# loading


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Validate a model file's header without loading tensors.

    Returns:
        ``{"config": dict, "normalization": dict, "metadata": dict, "format_version": int,
        "weights_sha256": str | None, "package_version": str | None, "tensors": {name:
        (dtype, shape)}}``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a model saved by napari-s2mnet, is truncated or damaged, or
            comes from a newer format version; the message says what the file appears to be.
    """
    path = Path(path)
    table, raw_meta = _read_safetensors_header(path)
    if raw_meta.get("format") != FORMAT_NAME:
        keys = ", ".join(sorted(raw_meta)) or "none"
        raise ValueError(
            f"{path} is a safetensors file, but not one saved by napari-s2mnet (its header has no "
            f"napari-s2mnet model config; metadata keys: {keys}). Expected {EXPECTED}. Weights "
            "from other tools must be converted with their architecture config."
        )
    try:
        version = int(raw_meta.get("format_version", ""))
    except ValueError:
        raise ValueError(
            f"{path}: invalid format_version {raw_meta.get('format_version')!r}."
        ) from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved by a newer napari-s2mnet (file format version {version}, "
            f"saved by version {raw_meta.get('package_version', '?')}); this version "
            f"({_package_version()}) reads format versions up to {FORMAT_VERSION}. "
            "Update napari-s2mnet to load it."
        )
    if version < 1:
        raise ValueError(f"{path}: unsupported format_version {version}.")
    out: dict[str, Any] = {"format_version": version}
    for key in ("config", "normalization", "metadata"):
        if key not in raw_meta:
            raise ValueError(f"{path}: the header lacks the {key!r} entry; the file is damaged.")
        check_json_depth(raw_meta[key], f"{path}: the {key!r} entry of the header")
        try:
            value = json.loads(raw_meta[key])
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: the {key!r} entry of the header is not valid JSON ({exc})."
            ) from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}: the {key!r} entry of the header is not a JSON object.")
        out[key] = value
    try:
        validate_metadata(out["metadata"])
    except ValueError as exc:
        raise ValueError(f"{path}: invalid metadata in the header: {exc}") from None
    out["weights_sha256"] = raw_meta.get("weights_sha256")
    out["package_version"] = raw_meta.get("package_version")
    out["tensors"] = {k: (v["dtype"], tuple(v["shape"])) for k, v in table.items()}
    return out


def load_model(path: str | os.PathLike, device: Any = "cpu") -> ModelBundle:
    """Load a model file written by :func:`save_model`.

    Args:
        path: The ``.safetensors`` file.
        device: Where to put the model (``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``).

    Returns:
        A :class:`ModelBundle` whose model is in eval mode on ``device``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not a napari-s2mnet model, is damaged (truncated, checksum
            mismatch), names an unknown architecture, or its tensors do not match the
            architecture (missing / unexpected / wrongly shaped entries are listed).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    info = read_header(path)
    config, normalization = _validated_settings(path, info)
    # The tensor table was checked against the file size, so its element count bounds what a
    # consistent config can build; a config that asks for more is refused before allocating it.
    n_stored = sum(math.prod(shape) for _, shape in info["tensors"].values())
    try:
        model = guarded_build(config, max_elements=2 * n_stored + (1 << 20))
    except ValueError as exc:
        raise ValueError(
            f"{path} needs architecture {config.arch!r} with options {config.options}, which "
            f"napari-s2mnet ({_package_version()}) cannot build from this file: {exc}"
        ) from None

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_tensor_table(path, config, expected, {k: s for k, (_, s) in info["tensors"].items()})

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: could not read the tensors ({exc}); the file is damaged."
        ) from None
    stored = info["weights_sha256"]
    if stored and state_hash(state) != stored:
        raise ValueError(
            f"{path} is corrupted: the weights do not match the checksum stored in the file "
            "(the file was modified or damaged after saving). Re-copy or re-save the model."
        )
    model.load_state_dict(state, strict=True)
    model.to(_torch_device(device))
    model.eval()
    return ModelBundle(
        model=model, config=config, normalization=normalization, metadata=info["metadata"]
    )


def _validated_settings(
    path: Path, info: dict[str, Any]
) -> tuple[ModelConfig, NormalizationConfig]:
    """The header's model config and normalisation, every field type- and range-checked."""
    try:
        config = validate_model_config(info["config"])
    except ValueError as exc:
        raise ValueError(f"{path}: invalid model config in the header: {exc}") from None
    try:
        normalization = NormalizationConfig.from_dict(info["normalization"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid normalization settings in the header: {exc}") from None
    return config, normalization


def _check_tensor_table(
    path: Path, config: ModelConfig, expected: dict[str, tuple], found: dict[str, tuple]
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k])
    )
    if not (missing or unexpected or mismatched):
        return

    def show(names: list[str], fmt: Any = str) -> str:
        head = ", ".join(fmt(n) for n in names[:8])
        return head + (f" ... ({len(names)} in all)" if len(names) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing tensors: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {show(unexpected)}")
    if mismatched:
        parts.append(
            "wrong shapes: "
            + show(mismatched, lambda k: f"{k} {list(found[k])} (expected {list(expected[k])})")
        )
    raise ValueError(
        f"{path}: the stored weights do not match architecture {config.arch!r} "
        f"(in_channels={config.in_channels}, num_classes={config.num_classes}, options="
        f"{config.options}); " + "; ".join(parts) + ". The file's config and weights disagree "
        "(saved by an incompatible version, or edited by hand)."
    )


def _read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Check the raw safetensors layout by hand and return (tensor table, metadata)."""
    if not path.exists():
        raise FileNotFoundError(f"Model file {path} does not exist.")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected {EXPECTED}.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes); expected {EXPECTED}.")
    with path.open("rb") as fh:
        head = fh.read(min(size, 64))
        kind = _sniff(head)
        if size < 10:
            raise ValueError(
                f"{path} is only {size} bytes, too small to be a model file"
                f"{_appears(kind)}; expected {EXPECTED}."
            )
        (n,) = struct.unpack("<Q", head[:8])
        first = head[8:9]
        if kind is not None and first != b"{":
            why = (
                " Pickled PyTorch files are never loaded because unpickling can run "
                "arbitrary code; if you trust the file, load it in your own code and re-save it "
                "with napari_s2mnet.checkpoint.save_model."
                if "torch.save" in kind
                else ""
            )
            raise ValueError(
                f"{path} is not a safetensors file: it appears to be {kind}. "
                f"Expected {EXPECTED}.{why}"
            )
        if first != b"{" or n < 2 or n > _MAX_HEADER:
            raise ValueError(
                f"{path} is not a safetensors file (its first bytes are not a "
                f"safetensors header){_appears(kind)}; expected {EXPECTED}."
            )
        if 8 + n > size:
            raise ValueError(
                f"{path} is truncated: its header says {n} header bytes but the file "
                f"has only {size} bytes (incomplete download or copy?). Expected "
                f"{EXPECTED}."
            )
        fh.seek(8)
        raw = fh.read(n)
    check_json_depth(raw, f"{path}: the safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(
            f"{path}: the safetensors header is not valid JSON; the file is damaged or "
            f"not {EXPECTED}."
        ) from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: the safetensors header is not a JSON object; the file is damaged."
        )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: the safetensors metadata is not a str -> str map; damaged file.")
    data_len = size - 8 - n
    end_max = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for s in shape:
                if not isinstance(s, int) or s < 0:
                    raise ValueError
                numel *= s
            ok = (
                dtype in _DTYPE_SIZES
                and 0 <= begin <= end
                and end - begin == numel * _DTYPE_SIZES[dtype]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{path}: the entry for tensor {name!r} in the header is invalid; "
                "the file is damaged."
            )
        end_max = max(end_max, end)
    if end_max > data_len:
        raise ValueError(
            f"{path} is truncated: the header lists {end_max} bytes of tensor data but "
            f"only {data_len} are present (incomplete download or copy?). "
            f"Expected {EXPECTED}."
        )
    if end_max < data_len:
        raise ValueError(
            f"{path} has {data_len - end_max} unexpected bytes after the tensor data; "
            "the file is damaged."
        )
    return header, meta


def _sniff(head: bytes) -> str | None:
    """What a file that is not safetensors appears to be, from its first bytes."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "a ZIP archive (for example a PyTorch .pt/.pth file written by torch.save)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (for example a legacy PyTorch .pt/.pth file written by torch.save)"
    signatures = {
        b"\x89HDF\r\n\x1a\n": "an HDF5 file (for example a Keras .h5 model)",
        b"\x93NUMPY": "a NumPy .npy array",
        b"II*\x00": "a TIFF image",
        b"MM\x00*": "a TIFF image",
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"\x1f\x8b": "a gzip archive",
        b"7z\xbc\xaf": "a 7-Zip archive",
    }
    for sig, what in signatures.items():
        if head.startswith(sig):
            return what
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON/text file"
    return None


def _appears(kind: str | None) -> str:
    return f"; it appears to be {kind}" if kind else ""


# --------------------------------------------------------------------------------------------
# bundled default model


def default_model_path() -> Path:
    """Path of the model shipped with the package (``resources/s2mnet_default.safetensors``)."""
    try:
        from importlib.resources import files

        return Path(str(files("napari_s2mnet").joinpath("resources", DEFAULT_MODEL_NAME)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual loaders
        return Path(__file__).parent / "resources" / DEFAULT_MODEL_NAME


def load_default_model(device: Any = "cpu") -> ModelBundle:
    """Load the bundled default model.

    Raises:
        FileNotFoundError: The package was installed without its model file.
    """
    path = default_model_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"The bundled default model is missing (looked for {path}). Reinstall napari-s2mnet, "
            "choose a .safetensors model file, or train one: python -m napari_s2mnet train "
            "--model new --images ... --labels ... -o model.safetensors"
        )
    return load_model(path, device=device)


# --------------------------------------------------------------------------------------------
# helpers


def _torch_device(device: Any) -> Any:
    import torch

    if isinstance(device, torch.device):
        return device
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        from napari_s2mnet.devices import resolve_device

        return resolve_device("auto")
    return torch.device(str(device))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _package_version() -> str:
    from napari_s2mnet import __version__

    return __version__


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays, paths and datetimes are common in metadata; store them plainly.
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, allow_nan=True, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"The model {what} cannot be stored as JSON: {exc}. Keep it to plain "
            "numbers, strings, lists and dicts."
        ) from None
