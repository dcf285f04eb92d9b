"""Checks of an untrusted model-file header before anything is built from it.

A ``.safetensors`` model file is untrusted input: its JSON header names the architecture, its sizes
and its normalisation, and a crafted header could otherwise make the loader build a network of
billions of parameters, recurse without bound in the JSON parser, or load settings that then
segment into nothing. Everything here refuses with a ``ValueError`` that says what is wrong, fast
and without large allocations:

* :func:`check_json_depth` bounds the nesting of a JSON text *before* it is parsed;
* :func:`validate_model_config` checks the type and range of every config field, including each
  architecture option against the type declared by the architecture's options dataclass;
* :func:`validate_metadata` checks the metadata fields the package reads (threshold, tile size,
  training history);
* :func:`guarded_build` builds the network while counting the elements every tensor factory asks
  for, and stops as soon as the count exceeds what the file's own tensor table can hold; so a
  header whose config disagrees with its (size-checked) tensors is refused before any large
  allocation, and the exact shapes are then compared entry by entry.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

from napari_s2mnet.model.registry import ModelConfig

MAX_JSON_DEPTH = 64  # our headers nest about 6 deep
MAX_CHANNELS = 1024  # in_channels / num_classes
MAX_OPTION_INT = 8192  # any integer architecture option (widths, K, depths ...)
MAX_OPTION_LEN = 32  # entries of a tuple option (stages ...)
MAX_TILE = 16384  # tile / crop sizes stored in the metadata
MIN_TILE = 16

_ESCAPES = re.compile(rb"\\.", re.DOTALL)
_STRINGS = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")
_OPEN = np.frombuffer(b"{[", np.uint8)


def check_json_depth(raw: bytes | str, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` without parsing it (no recursion).

    Escapes and string literals are removed first (brackets inside strings do not nest), then the
    running bracket depth is computed in bounded chunks with numpy.

    Raises:
        ValueError: The nesting exceeds ``limit``.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", _ESCAPES.sub(b"", data)))
    depth = 0
    chunk = 1 << 20
    for start in range(0, len(brackets), chunk):
        a = np.frombuffer(brackets, np.uint8, count=min(chunk, len(brackets) - start), offset=start)
        steps = np.where(np.isin(a, _OPEN), 1, -1).astype(np.int32)
        running = np.cumsum(steps, dtype=np.int64) + depth
        if running.size and int(running.max()) > limit:
            raise ValueError(
                f"{what} is nested more than {limit} levels deep; a model file's header is never "
                "nested like this, so the file is damaged or crafted."
            )
        depth = int(running[-1])


# --------------------------------------------------------------------------------------------
# config fields


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_real(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float | np.floating)) and math.isfinite(float(v))


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``, or a ValueError naming ``name``."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}.")
    return int(value)


def check_real(value: Any, name: str, lo: float, hi: float) -> float:
    """``value`` as a finite float in ``[lo, hi]``, or a ValueError naming ``name``."""
    if not _is_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}.")
    return float(value)


def validate_model_config(data: Any) -> ModelConfig:
    """A :class:`ModelConfig` from an untrusted dict, every field checked.

    Raises:
        ValueError: A field is missing, unknown, of the wrong type or out of range, the
            architecture is unknown, or its options are invalid; the message names the field.
    """
    from napari_s2mnet.model.registry import get_spec, resolve_options

    if not isinstance(data, Mapping):
        raise ValueError(f"the model config must be a JSON object, got {type(data).__name__}.")
    allowed = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; expected {sorted(allowed)}.")
    arch = data.get("arch", "s2mnet")
    if not isinstance(arch, str) or not 0 < len(arch) <= 64:
        raise ValueError(f"arch must be an architecture name (a string), got {arch!r}.")
    in_channels = check_int(data.get("in_channels", 3), "in_channels", 1, MAX_CHANNELS)
    num_classes = check_int(data.get("num_classes", 1), "num_classes", 1, MAX_CHANNELS)
    options = data.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a JSON object, got {options!r}.")
    spec = get_spec(arch)  # ValueError listing the known names
    hints = typing.get_type_hints(spec.options_cls)
    for key, value in options.items():
        if key not in hints:
            raise ValueError(
                f"unknown option {key!r} for architecture {arch!r}; valid options: {sorted(hints)}."
            )
        _check_option(f"options.{key}", value, hints[key])
    instance_head = data.get("instance_head", False)  # issue 15; absent in older files
    if not isinstance(instance_head, bool):
        raise ValueError(f"instance_head must be true or false, got {instance_head!r}.")
    if instance_head and num_classes != 1:
        raise ValueError(f"instance_head needs num_classes=1, got {num_classes}.")
    config = ModelConfig(
        arch=arch,
        in_channels=in_channels,
        num_classes=num_classes,
        options=dict(options),
        instance_head=instance_head,
    )
    try:
        resolve_options(config)  # the architecture's own consistency checks
    except TypeError as exc:
        raise ValueError(f"invalid options for {arch!r}: {exc}") from None
    return config


def _check_option(name: str, value: Any, hint: Any) -> None:
    """Check one option value against its declared type (JSON lists stand for tuples)."""
    if not _conforms(value, hint):
        raise ValueError(f"{name} must be {_describe(hint)}, got {value!r}.")
    _check_option_ranges(name, value)


def _check_option_ranges(name: str, value: Any) -> None:
    if isinstance(value, list | tuple):
        if len(value) > MAX_OPTION_LEN:
            raise ValueError(f"{name} has {len(value)} entries; at most {MAX_OPTION_LEN} allowed.")
        for i, item in enumerate(value):
            _check_option_ranges(f"{name}[{i}]", item)
    elif _is_int(value):
        check_int(value, name, -MAX_OPTION_INT, MAX_OPTION_INT)
    elif isinstance(value, float):
        leaf = name.rsplit(".", 1)[-1]
        if "eps" in leaf:
            check_real(value, name, 1e-12, 1.0)
        elif "momentum" in leaf:
            check_real(value, name, 0.0, 1.0)
        else:
            check_real(value, name, -1e6, 1e6)
    elif isinstance(value, str) and len(value) > 64:
        raise ValueError(f"{name} is a {len(value)}-character string; at most 64 allowed.")


def _conforms(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_real(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        if not isinstance(value, list | tuple):
            return False
        args = typing.get_args(hint)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _conforms(v, a) for v, a in zip(value, args, strict=True)
        )
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return False  # an option type this checker does not know: refuse rather than guess


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


# --------------------------------------------------------------------------------------------
# metadata


def validate_metadata(meta: Mapping[str, Any]) -> None:
    """Check the metadata fields the package reads (``name``, ``threshold``, ``tile_size``,
    ``diameter``, ``history[].config.crop_size``); other entries are free-form provenance.

    Raises:
        ValueError: One of those fields has the wrong type or an unusable value.
    """
    if "name" in meta and not isinstance(meta["name"], str):
        raise ValueError(f"metadata name must be a string, got {meta['name']!r}.")
    if meta.get("threshold") is not None:
        check_real(meta["threshold"], "metadata threshold", 0.0, 1.0)
    if meta.get("tile_size") not in (None, 0):
        check_int(meta["tile_size"], "metadata tile_size", MIN_TILE, MAX_TILE)
    if meta.get("diameter") is not None:  # training object diameter in pixels (issue 14)
        check_real(meta["diameter"], "metadata diameter", 2.0, 2000.0)
    history = meta.get("history")
    if history is None:
        return
    if not isinstance(history, list):
        raise ValueError(
            f"metadata history must be a list of training runs, got {type(history).__name__}."
        )
    for i, run in enumerate(history):
        if not isinstance(run, Mapping):
            raise ValueError(f"metadata history[{i}] must be an object, got {run!r}.")
        cfg = run.get("config")
        if cfg is None:
            continue
        if not isinstance(cfg, Mapping):
            raise ValueError(f"metadata history[{i}].config must be an object, got {cfg!r}.")
        if cfg.get("crop_size") not in (None, 0):
            check_int(
                cfg["crop_size"], f"metadata history[{i}].config.crop_size", MIN_TILE, MAX_TILE
            )


# --------------------------------------------------------------------------------------------
# building within the file's own size


class _TooLarge(Exception):
    pass


_FACTORIES_BY_SIZE = ("empty", "zeros", "ones", "rand", "randn", "full", "empty_strided", "randint")
_LIKE = ("empty_like", "zeros_like", "ones_like", "rand_like", "randn_like", "full_like")


def _requested(func: Any, args: tuple, kwargs: dict) -> int:
    """Elements a tensor-making call will allocate (0 if it allocates nothing big we can see)."""
    import torch

    name = getattr(func, "__name__", "")
    if func in {getattr(torch, n) for n in _FACTORIES_BY_SIZE}:
        if "size" in kwargs:
            size: Any = kwargs["size"]
        elif name in ("full", "empty_strided"):
            size = args[0] if args else ()
        elif name == "randint":
            size = next((a for a in reversed(args) if isinstance(a, list | tuple | torch.Size)), ())
        else:
            size = (
                args[0]
                if len(args) == 1 and isinstance(args[0], list | tuple | torch.Size)
                else args
            )
        return math.prod(int(s) for s in size)
    if func in (torch.arange, torch.linspace):
        nums = [a for a in args if isinstance(a, int | float)]
        if func is torch.linspace:
            return int(nums[2]) if len(nums) > 2 else int(kwargs.get("steps", 0))
        if len(nums) == 1:
            return max(0, math.ceil(nums[0]))
        if len(nums) >= 2:
            step = nums[2] if len(nums) > 2 else kwargs.get("step", 1)
            return max(0, math.ceil((nums[1] - nums[0]) / step))
        return 0
    if func in {getattr(torch, n) for n in _LIKE} or name in ("clone", "contiguous", "repeat"):
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is None:
            return 0
        n = t.numel()
        if name == "repeat":
            reps = args[1:] if len(args) > 1 else ()
            if len(reps) == 1 and isinstance(reps[0], list | tuple | torch.Size):
                reps = reps[0]
            n *= math.prod(int(r) for r in reps) if reps else 1
        return n
    return 0


def guarded_build(config: ModelConfig, max_elements: int) -> Any:
    """Build ``config``'s network, refusing before any allocation beyond ``max_elements``.

    Every tensor factory call made while the network is constructed (``torch.empty`` of a conv
    weight, ``ones`` of a norm, clones ...) is counted *before* it runs; once the total exceeds
    ``max_elements`` the build stops with a ValueError. Use a budget a few times the number of
    elements the file's tensor table holds: a config that agrees with its tensors never reaches it.

    Raises:
        ValueError: The network would exceed the budget, or the architecture refuses the config.
    """
    from torch.overrides import TorchFunctionMode

    from napari_s2mnet.model import build_model

    total = 0

    class _Budget(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types_: Any, args: tuple = (), kwargs: Any = None
        ) -> Any:
            nonlocal total
            kwargs = kwargs or {}
            try:
                need = _requested(func, args, kwargs)
            except (TypeError, ValueError, IndexError):
                need = 0
            total += need
            if total > max_elements:
                raise _TooLarge
            return func(*args, **kwargs)

    try:
        with _Budget():
            return build_model(config)
    except _TooLarge:
        raise ValueError(
            f"its config (arch {config.arch!r}, in_channels={config.in_channels}, num_classes="
            f"{config.num_classes}, options={config.options}) describes a network larger than the "
            f"weights stored in the file (more than {max_elements:,} elements would be allocated); "
            "the config and the weights disagree (damaged or crafted file)."
        ) from None
