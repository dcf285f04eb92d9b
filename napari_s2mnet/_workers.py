"""Glue between core generators and napari's thread workers.

Core work is a generator that yields progress objects and returns its result. Here it runs in a
napari thread worker (listed in napari's task manager with a cancel button), its progress drives a
napari progress bar, and errors become napari notifications instead of frozen windows.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress
from napari.utils.notifications import show_error


def start_worker(
    gen_func: Callable[..., Generator[Any, None, Any]],
    *args: Any,
    desc: str,
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    **kwargs: Any,
) -> GeneratorWorker:
    """Run ``gen_func(*args, **kwargs)`` in a napari worker with a progress bar.

    Yielded objects with ``done`` and ``total`` attributes (or ``step``/``total_steps``) move the
    progress bar. The worker is started before returning.
    """
    worker: GeneratorWorker = create_worker(gen_func, *args, _start_thread=False, **kwargs)
    pbar = progress(total=0, desc=desc)

    def _yielded(value: Any) -> None:
        done = getattr(value, "done", getattr(value, "step", None))
        total = getattr(value, "total", getattr(value, "total_steps", None))
        if total:
            if pbar.total != total:
                pbar.total = int(total)
            if done is not None:
                pbar.n = int(done)
                pbar.refresh()
        msg = getattr(value, "message", None)
        if msg:
            pbar.set_description(f"{desc}: {msg}")
        if on_yield is not None:
            on_yield(value)

    def _errored(exc: BaseException) -> None:
        if on_error is not None:
            on_error(exc)
        else:
            show_error(f"{desc} failed: {exc}")

    worker.yielded.connect(_yielded)
    if on_return is not None:
        worker.returned.connect(on_return)
    worker.errored.connect(_errored)
    worker.finished.connect(pbar.close)
    if on_finish is not None:
        worker.finished.connect(on_finish)
    worker.start()
    return worker
