"""Glue between core generators and napari's thread workers.

Core work is a generator that yields progress objects and returns its result. Here it runs in a
napari thread worker (listed in napari's task manager), its progress drives a cancelable napari
progress bar (the activity dock shows its Cancel button), and errors become napari notifications
instead of frozen windows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import notification_manager
from qtpy.QtCore import QThreadPool


class JobError(Exception):
    """A ``RuntimeError`` raised by a job, re-raised under a type superqt reports.

    superqt's ``GeneratorWorker`` takes any ``RuntimeError`` for "the worker was deleted": it
    only warns and never emits ``errored`` or ``finished``, so the widget would wait forever
    (CUDA out-of-memory errors, for one, are ``RuntimeError``\\ s). The original is ``__cause__``.
    """


class _JobProgress(cancelable_progress):
    """A cancelable progress bar whose ``cancel()`` calls its callback at once.

    napari's ``cancelable_progress`` only runs the callback while it is iterated; ours is
    driven by a worker's yields, so the dock's Cancel button must act directly.
    """

    def cancel(self) -> None:
        """Mark the bar cancelled and run the callback (once)."""
        first = not self.is_canceled
        super().cancel()
        if first and self.cancel_callback is not None:
            self.cancel_callback()


def _reraising(gen_func: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator]:
    """``gen_func`` with every ``RuntimeError`` turned into a :class:`JobError`."""

    @functools.wraps(gen_func)
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        try:
            return (yield from gen_func(*args, **kwargs))
        except RuntimeError as exc:
            raise JobError(str(exc) or type(exc).__name__) from exc

    return wrapper


def _keep_a_pool_thread_free() -> None:
    """Let Qt's global thread pool grow so that one thread stays free for Qt itself.

    Workers run in ``QThreadPool.globalInstance()``, which Qt also uses to convert large images
    when it repaints the window, and the GUI thread waits for that conversion while holding the
    GIL. If Python workers fill the pool (its size is the number of cores: two on a small
    machine, e.g. a fine-tune finishing its step plus a Segment run), they wait for the GIL and
    the window deadlocks. A spare thread lets the conversion run.
    """
    pool = QThreadPool.globalInstance()
    needed = pool.activeThreadCount() + 2  # the running ones, the new worker, one spare
    if pool.maxThreadCount() < needed:
        pool.setMaxThreadCount(needed)


def start_worker(
    gen_func: Callable[..., Generator[Any, None, Any]],
    *args: Any,
    desc: str,
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_cancel: Callable[[], None] | None = None,
    **kwargs: Any,
) -> GeneratorWorker:
    """Run ``gen_func(*args, **kwargs)`` in a napari worker with a cancelable progress bar.

    Yielded objects with ``done`` and ``total`` attributes (or ``step``/``total_steps``) move the
    progress bar, ``worker.pbar``. Its Cancel (in napari's activity dock) calls ``on_cancel``
    (default: ``worker.quit``, effective at the next yield). An error becomes one napari
    notification (with its traceback); ``on_error`` is for the widget's own state. The worker is
    started before returning.
    """
    # _ignore_errors: superqt would re-raise in the main thread, which reaches napari only
    # through sys.excepthook (installed by napari.run(), not in IPython or scripts).
    worker: GeneratorWorker = create_worker(
        _reraising(gen_func), *args, _start_thread=False, _ignore_errors=True, **kwargs
    )
    pbar = _JobProgress(total=0, desc=desc, cancel_callback=on_cancel or worker.quit)
    worker.pbar = pbar  # where napari's own create_worker(_progress=...) keeps its bar

    def _yielded(value: Any) -> None:
        # The widget first: updating napari's progress bar can process pending events, and a
        # queued ``returned`` handled in there would otherwise run before this report, which
        # then overwrote the widget's final status (seen under load in the GUI tests).
        if on_yield is not None:
            on_yield(value)
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

    def _errored(exc: BaseException) -> None:
        if on_error is not None:
            on_error(exc)
        notification_manager.receive_error(type(exc), exc, exc.__traceback__)

    worker.yielded.connect(_yielded)
    if on_return is not None:
        worker.returned.connect(on_return)
    worker.errored.connect(_errored)
    worker.finished.connect(pbar.close)
    if on_finish is not None:
        worker.finished.connect(on_finish)
    _keep_a_pool_thread_free()
    worker.start()
    return worker
