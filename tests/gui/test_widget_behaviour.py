"""User-level regressions: errors, renames, the activity dock's Cancel, Stop latency, edits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _wait_worker(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def _session(viewer):
    from napari_s2mnet._qt._session import get_session

    return get_session(viewer)


def _segment_sample(viewer, seg, qtbot):
    """Click Run on the sample nuclei image, as a user; the new labels layer."""
    seg.image.value = viewer.layers["nuclei"]
    seg.run_button.native.click()
    _wait_worker(qtbot, seg)
    return viewer.layers[-1]


def test_runtime_error_in_the_model_resets_segment(viewer_with_plugin, qtbot, monkeypatch):
    """superqt drops RuntimeErrors from a generator; the widget must still recover and say why."""
    viewer, seg, _, _ = viewer_with_plugin
    bundle = _session(viewer).active()

    def broken_forward(*_args, **_kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered (simulated)")

    from napari.utils.notifications import notification_manager

    notified = []  # what napari's worker relays to the notification manager
    monkeypatch.setattr(
        notification_manager, "receive_error", lambda _type, exc, *_: notified.append(exc)
    )
    monkeypatch.setattr(bundle.model, "forward", broken_forward)
    seg.image.value = viewer.layers["nuclei"]
    n_layers = len(viewer.layers)
    seg.run_button.native.click()
    assert not seg.run_button.enabled
    qtbot.waitUntil(lambda: seg.run_button.enabled, timeout=5000)
    assert seg.worker is None
    assert "device-side assert" in seg.status.text()
    assert len(viewer.layers) == n_layers
    assert len(notified) == 1 and "device-side assert" in str(notified[0])
    assert isinstance(notified[0].__cause__, RuntimeError)


def test_pickers_follow_renamed_layers(viewer_with_plugin, qtbot):
    viewer, seg, ft, ex = viewer_with_plugin
    image = viewer.layers["nuclei"]
    gt = viewer.layers["nuclei ground truth"]
    seg.image.value = image
    ex.labels.value = gt
    image.name = "my cells"
    gt.name = "my masks"
    assert seg.image.value is image and seg.image.native.currentText() == "my cells"
    assert ex.labels.value is gt and ex.labels.native.currentText() == "my masks"
    texts = [ft.pairs.item(i).text() for i in range(ft.pairs.count())]
    assert any("my cells" in t and "my masks" in t for t in texts), texts
    # another layer arrives: the pickers still point at the same layer objects
    viewer.add_image(np.zeros((64, 64), np.float32), name="other image")
    viewer.add_labels(np.zeros((64, 64), np.uint16), name="other labels")
    assert seg.image.value is image and seg.image.native.currentText() == "my cells"
    assert ex.labels.value is gt and ex.labels.native.currentText() == "my masks"
    seg.run_button.native.click()
    _wait_worker(qtbot, seg)
    assert viewer.layers[-1].name == "my cells S2M-Net"


def test_activity_dock_cancel_stops_segment(viewer_with_plugin, qtbot):
    """The task manager's Cancel button calls ``cancel()`` on the progress object."""
    from napari.utils import cancelable_progress

    viewer, seg, _, _ = viewer_with_plugin
    stack = np.random.default_rng(0).random((8, 512, 512)).astype(np.float32)
    seg.image.value = viewer.add_image(stack, name="stack")
    seg.advanced["tile_size"].value = 128
    n_layers = len(viewer.layers)
    worker = seg.run()
    pbar = worker.pbar
    assert isinstance(pbar, cancelable_progress)  # napari shows Cancel only for these
    with qtbot.waitSignal(worker.yielded, timeout=30_000):
        pass
    pbar.cancel()
    _wait_worker(qtbot, seg, timeout=30_000)
    assert len(viewer.layers) == n_layers
    assert seg.run_button.enabled and not seg.cancel_button.enabled
    assert "Cancelled" in seg.status.text()


def _finetune_on_gt(viewer, ft, crop=256, batch=4):
    gt = viewer.layers["nuclei ground truth"]
    ft.set_checked(gt, True)
    ft.budget_mode.value = "seconds"
    ft.budget_value.value = 600
    ft.advanced["crop_size"].value = crop
    ft.advanced["batch_size"].value = batch
    ft.advanced["val_fraction"].value = 0.0  # no validation: each applied step is the result


def test_stop_during_backward_gives_a_usable_model_at_once(viewer_with_plugin, qtbot, monkeypatch):
    """Stop lands in a multi-second CPU backward pass; the model is usable within a second."""
    from napari_s2mnet import training

    viewer, seg, ft, _ = viewer_with_plugin
    session = _session(viewer)
    before = session.active()
    n_previous = len(session._previous)
    original = training._Run.backward
    calls = []
    in_backward = threading.Event()

    def watched_backward(self, loss):
        calls.append(1)
        if len(calls) >= 2:  # one step applied already: Stop has a result to hand out
            in_backward.set()
        return original(self, loss)

    monkeypatch.setattr(training._Run, "backward", watched_backward)
    _finetune_on_gt(viewer, ft)
    ft.run_button.native.click()
    worker = ft.worker
    assert worker is not None
    qtbot.waitUntil(in_backward.is_set, timeout=120_000)
    t0 = time.perf_counter()
    ft.stop_button.native.click()
    qtbot.waitUntil(lambda: session.active() is not before, timeout=1000)
    latency = time.perf_counter() - t0
    assert latency < 1.0, f"the stopped model took {latency:.2f} s to become active"
    stopped = session.active()
    assert ft.worker is worker, "the interrupted step should still be finishing"
    assert not ft.run_button.enabled
    assert "finishing the interrupted step" in ft.status.text().lower()
    assert ft.revert_button.enabled
    assert ft.plot.n_points >= 1
    # Segment uses the stopped model straight away
    seg.image.value = viewer.layers["nuclei"]
    n_layers = len(viewer.layers)
    seg.run_button.native.click()
    # Two Python workers at once: Qt's global pool keeps a thread for its own image conversions
    # (the GUI thread waits for them holding the GIL; a full pool froze the window here).
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    assert pool.activeThreadCount() < pool.maxThreadCount()
    _wait_worker(qtbot, seg)
    assert len(viewer.layers) == n_layers + 1
    assert viewer.layers[-1].__class__.__name__ == "Labels"
    # the worker's own late result neither replaces the model nor adds history
    _wait_worker(qtbot, ft, timeout=60_000)
    assert session.active() is stopped
    assert len(session._previous) == n_previous + 1
    assert ft.run_button.enabled
    assert "finishing" not in ft.status.text()


def test_stop_before_any_step_keeps_the_previous_model(viewer_with_plugin, qtbot, monkeypatch):
    """Cancel from the activity dock while the first step is still in its backward pass."""
    from napari_s2mnet import training

    viewer, _, ft, _ = viewer_with_plugin
    session = _session(viewer)
    before = session.active()
    n_previous = len(session._previous)
    original = training._Run.backward
    in_backward, release = threading.Event(), threading.Event()

    def held_backward(self, loss):
        in_backward.set()
        release.wait(30)  # hold the first step open until the test has clicked Stop
        return original(self, loss)

    monkeypatch.setattr(training._Run, "backward", held_backward)
    _finetune_on_gt(viewer, ft, crop=64, batch=1)
    ft.run_button.native.click()
    try:
        qtbot.waitUntil(in_backward.is_set, timeout=60_000)
        ft.worker.pbar.cancel()  # the activity dock's Cancel: the same as Stop
        assert session.active() is before
        status = ft.status.text().lower()
        assert "stopped before any step: the previous model stays active" in status
        assert "finishing the interrupted step" in status
        assert not ft.run_button.enabled
    finally:
        release.set()
    _wait_worker(qtbot, ft, timeout=60_000)
    assert session.active() is before  # the worker's late result (1 step) is ignored
    assert len(session._previous) == n_previous
    assert ft.run_button.enabled


def test_no_improvement_does_not_claim_a_fine_tuned_model(viewer_with_plugin):
    """A finished run whose best state is the starting model keeps (and says it keeps) it."""
    from napari_s2mnet.training import FinetuneResult

    viewer, _, ft, _ = viewer_with_plugin
    session = _session(viewer)
    before = session.active()
    result = FinetuneResult(
        bundle=before,
        history=[],
        best_val_dice=0.5,
        initial_val_dice=0.5,
        stopped_reason="early stopping",
        steps=20,
        best_step=0,
    )
    ft._done(result)
    assert session.active() is before
    assert "no improvement: the starting model is kept" in ft.status.text()
    assert "now active" not in ft.status.text()


def test_a_late_progress_report_keeps_the_final_status(viewer_with_plugin):
    """napari's progress bar processes events, so the run's result can be handled before its
    last progress report; that report must not overwrite the final status (seen under load)."""
    from napari_s2mnet.training import FinetuneResult, TrainReport

    viewer, _, ft, _ = viewer_with_plugin
    before = _session(viewer).active()
    result = FinetuneResult(
        bundle=before, history=[], best_val_dice=None, stopped_reason="completed", steps=3
    )
    ft._returned = False
    ft._done(result)
    final = ft.status.text()
    assert final.startswith("Done (completed")
    ft._report(TrainReport(step=3, epoch=1, total_steps=3, loss=0.5, message="completed: 3 steps"))
    assert ft.status.text() == final
    assert ft.plot.n_points >= 1  # the point itself is still plotted


def test_painting_checks_the_pair_in_finetune(viewer_with_plugin, qtbot):
    viewer, seg, ft, _ = viewer_with_plugin
    gt = viewer.layers["nuclei ground truth"]
    ft.set_checked(gt, True)  # a user choice that a rebuild must keep
    out = _segment_sample(viewer, seg, qtbot)
    assert not any(lab is out for _, lab in ft.selected_pairs())
    out.visible = True
    out.data_setitem((np.array([5, 5, 6]), np.array([5, 6, 5])), 7)
    qtbot.waitUntil(lambda: any(lab is out for _, lab in ft.selected_pairs()), timeout=3000)
    assert any(lab is gt for _, lab in ft.selected_pairs())


def test_painting_a_label_above_255_on_a_result(viewer_with_plugin, qtbot):
    viewer, seg, _, _ = viewer_with_plugin
    out = _segment_sample(viewer, seg, qtbot)
    assert out.data.dtype.itemsize >= 2
    out.visible = True
    yy, xx = np.mgrid[10:20, 10:20]
    out.data_setitem((yy.ravel(), xx.ravel()), 300)
    assert int(out.data[15, 15]) == 300
    qtbot.waitUntil(lambda: 300 in set(out.features["label"]), timeout=5000)


def test_features_table_shows_morphology(viewer_with_plugin, qtbot):
    """napari's own Features table (Layers > Metadata > Features table widget) lists the morphology
    columns."""
    from qtpy.QtCore import Qt

    viewer, seg, _, _ = viewer_with_plugin
    out = _segment_sample(viewer, seg, qtbot)
    _, table = viewer.window.add_plugin_dock_widget("napari", "Features table widget")
    viewer.layers.selection.active = out
    model = table.table.model()
    headers = {
        model.headerData(i, Qt.Orientation.Horizontal, Qt.ItemDataRole.DisplayRole)
        for i in range(model.columnCount())
    }
    for col in (
        "compactness",
        "tubularity",
        "irregularity",
        "area_fraction",
        "area_px",
        "centroid_y_px",
        "mean_intensity",
    ):
        assert col in headers, headers
    assert model.rowCount() == len(out.features) > 0


def test_continue_resumes_a_timed_out_run(viewer_with_plugin, qtbot):
    """Continue picks the run up where its time budget ended (one run in the model's history)."""
    viewer, _, ft, _ = viewer_with_plugin
    _finetune_on_gt(viewer, ft, crop=64, batch=2)
    ft.budget_value.value = 3
    assert not ft.continue_button.enabled
    ft.run_button.native.click()
    _wait_worker(qtbot, ft)
    first = ft.last_result
    assert first.stopped_reason == "time budget" and first.steps > 0, ft.status.text()
    assert ft.continue_button.enabled
    points = ft.plot.n_points
    ft.continue_button.native.click()
    assert "Continuing from step" in ft.status.text()
    _wait_worker(qtbot, ft)
    second = ft.last_result
    assert second is not first and second.steps > first.steps, ft.status.text()
    assert second.elapsed >= 3 + 3 - 0.5  # the budget counts from where the run ended
    history = second.bundle.metadata["history"]
    assert len(history) == len(first.bundle.metadata["history"])  # the same run, continued
    assert history[-1]["steps"] == second.steps
    assert ft.plot.n_points > points  # the plot kept its points and grew
    assert ft.plot.steps[points] == first.steps + 1  # ... from where the first part ended
