"""Device selection, descriptions and the out-of-memory fallback policy."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from napari_s2mnet import devices
from napari_s2mnet.devices import (
    FallbackState,
    describe_device,
    is_oom_error,
    next_fallback,
    resolve_device,
    supports_amp,
)


def _fake_cuda(monkeypatch, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 1024**3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)


def _fake_mps(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_mps(monkeypatch, False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    _fake_mps(monkeypatch, True)
    assert resolve_device("auto") == torch.device("mps")
    _fake_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("CUDA") == torch.device("cuda", 0)


def test_explicit_devices_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_mps(monkeypatch, False)
    with pytest.raises(ValueError, match=r"CUDA is not available.*'auto' or 'cpu'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(3)
    _fake_cuda(monkeypatch, count=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\) found"):
        resolve_device("cuda:2")


def test_describe_devices(monkeypatch):
    threads = torch.get_num_threads()
    text = describe_device(torch.device("cpu"))
    assert text == f"CPU ({threads} thread{'s' if threads != 1 else ''})"
    assert describe_device("cpu") == text
    _fake_cuda(monkeypatch)
    assert describe_device(torch.device("cuda", 0)) == "CUDA: NVIDIA H100 80GB HBM3 (80 GB)"
    assert describe_device(torch.device("mps")) == "Apple MPS (Metal GPU)"


def test_amp_only_on_cuda():
    assert supports_amp(torch.device("cuda", 0))
    assert not supports_amp(torch.device("cpu"))
    assert not supports_amp(torch.device("mps"))


def test_oom_errors_are_recognised():
    assert is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_oom_error(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert not is_oom_error(ValueError("out of memory"))  # not from torch


def test_fallback_order_gpu():
    state = FallbackState("cuda:0", 512, 4)
    steps = []
    while (step := next_fallback(state, min_tile=128, multiple=32)) is not None:
        state, message = step
        steps.append((state, message))
    assert [s for s, _ in steps] == [
        FallbackState("cuda:0", 512, 1),
        FallbackState("cuda:0", 256, 1),
        FallbackState("cuda:0", 128, 1),
        FallbackState("cpu", 128, 1),
    ]
    assert "1 tile per batch" in steps[0][1]
    assert "retrying with 256 px tiles" in steps[1][1]
    assert "continuing on the CPU" in steps[-1][1]


def test_fallback_keeps_stride_multiples_and_ends_on_cpu():
    state, _ = next_fallback(FallbackState("cpu", 352, 1), min_tile=96, multiple=32)
    assert state.tile_size == 160  # 176 rounded down to a multiple of 32
    assert next_fallback(FallbackState("cpu", 96, 1), min_tile=96, multiple=32) is None


def test_importing_devices_does_not_import_torch():
    code = "import sys, napari_s2mnet.devices, napari_s2mnet.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert devices.__name__ == "napari_s2mnet.devices"
