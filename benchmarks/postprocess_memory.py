"""Peak memory of instance post-processing on a large plane: whole-image vs per-component (issue 18).

Usage::

    python -m benchmarks.postprocess_memory              # 8192^2, both methods
    python -m benchmarks.postprocess_memory --size 4096

Each method runs in a fresh process on the same synthetic maps of the instance head (foreground,
boundary, distance: a tiled pattern of touching and isolated disks). Reported: the peak RSS
*above* the process's RSS once the maps exist (``ru_maxrss``), its ratio to the maps' own size
(3 x float32 planes), and its ratio to the whole-image method measured in the same run, plus
the wall time and the object count (which must agree).

* ``whole``: what :func:`napari_s2mnet.inference.postprocess.instances` did before: the three
  maps stacked into one array, one watershed over the whole image;
* ``per_component``: today's path: no stacking (the engine blends only the foreground and
  distance maps), one flood per foreground component whose label array becomes the output
  (:func:`napari_s2mnet.instances.seeded_watershed`, ``per_object=True``);
* ``segment``: all of :func:`~napari_s2mnet.inference.segment_iter` after the network (the
  bundled model's engine returns fresh copies of the synthetic maps instead of running), so
  the blended maps, labels, renumbering and features are in the peak, and each map is held
  only where ``segment`` holds it. Its peak is read from the kernel's high-water mark
  (``VmHWM``, reset before the call) above the RSS before the call.

The maps' own memory (allocated before the baseline) is the same for both, so the engine's
saving of the unused boundary map (one float32 plane) is not in this table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np


def _maps(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, head) maps: a 128-px tile with two touching disks and one alone, repeated."""
    from napari_s2mnet.instances import instance_targets

    tile = np.zeros((128, 128), dtype=np.int32)
    yy, xx = np.mgrid[:128, :128]
    for i, (cy, cx, r) in enumerate(((40, 36, 18), (40, 68, 16), (96, 90, 14)), start=1):
        tile[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    boundary, distance = instance_targets(tile)
    reps = (size // 128, size // 128)
    fg = np.tile((tile > 0).astype(np.float32) * 0.9 + 0.05, reps)
    head = np.empty((2, *fg.shape), dtype=np.float32)
    head[0] = np.tile(boundary, reps)
    head[1] = np.tile(distance, reps)
    return fg, head


def _segment_path(size: int) -> None:
    """The ``segment`` method (see the module docstring); prints its JSON line."""
    from benchmarks.inference import _reset_peak_rss, _status_gb
    from napari_s2mnet.checkpoint import load_default_model
    from napari_s2mnet.inference import (
        InferenceConfig,
        engine,
        postprocess,
        run_to_end,
        segment_iter,
    )

    fg, head = _maps(size)
    distance = head[1].copy()
    del head

    def fake_predict(self: Any, region: Any, plan: Any, stats: Any, counter: Any) -> Any:
        maps = [fg.copy(), distance.copy()]  # what the blending returns: fresh arrays
        if "maps" not in postprocess.Predicted.__dataclass_fields__:  # before per-map lists
            maps = np.stack(maps)
        if False:  # a generator, like the real one
            yield None
        return maps

    engine.Engine._predict_once = fake_predict  # type: ignore[method-assign]
    bundle = load_default_model()
    image = np.zeros((size, size), dtype=np.uint16)
    image[::7, ::5] = 1000  # normalisation needs some spread; the network does not run
    before = _status_gb("VmRSS")
    if not _reset_peak_rss():
        raise SystemExit("the segment method needs Linux's /proc/self/clear_refs")
    t0 = time.perf_counter()
    cfg = InferenceConfig(device="cpu", backend="torch")
    res = run_to_end(segment_iter(image, bundle, cfg))
    wall = time.perf_counter() - t0
    extra = (_status_gb("VmHWM") - before) * 1024
    print(json.dumps({"extra_mib": extra, "wall": wall, "n": len(res.features)}))


def _worker(size: int, method: str) -> None:
    import resource

    if method == "segment":
        _segment_path(size)
        return

    from napari_s2mnet.inference.config import InferenceConfig
    from napari_s2mnet.inference.postprocess import instances

    fg, head = _maps(size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "whole":
        from napari_s2mnet.instances import interior_map, seeded_watershed

        maps = np.concatenate([fg[None], head])
        inner = interior_map(maps[0], boundary=maps[1], distance=maps[2])
        _lab, n = seeded_watershed(maps[0], inner, per_object=False)
    else:
        _lab, n = instances(fg, 0.5, InferenceConfig(), head[1])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (peak - base) / 1024, "wall": wall, "n": int(n)}))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--worker", choices=["whole", "per_component", "segment"])
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.size, args.worker)
        return 0
    maps_mib = 3 * args.size**2 * 4 / 2**20
    print(
        f"# postprocess_memory: {args.size}^2, maps {maps_mib:.0f} MiB, {time.strftime('%F %H:%M')}"
    )
    rows = {}
    for method in ("whole", "per_component", "segment"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.postprocess_memory",
                "--size",
                str(args.size),
                "--worker",
                method,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| method | extra peak RSS (MiB) | / maps | / whole | wall s | objects |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in rows.items():
        print(
            f"| {method} | {r['extra_mib']:.0f} | {r['extra_mib'] / maps_mib:.2f} | "
            f"{r['extra_mib'] / rows['whole']['extra_mib']:.2f} | {r['wall']:.1f} | {r['n']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
