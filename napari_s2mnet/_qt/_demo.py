"""The README's main job: napari with the S2M-Net widgets docked and the sample image segmented."""

from __future__ import annotations

from pathlib import Path


def run_demo(screenshot: Path | None = None) -> int:
    """Open napari, load the sample, dock the widgets, segment with the default model.

    Args:
        screenshot: If given, save a PNG of the whole window once the segmentation is shown, then
            quit (for headless checks and the README picture).

    Returns:
        Process exit code.
    """
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(title="napari-s2mnet demo")
    viewer.window.resize(1600, 960)
    viewer.open_sample("napari-s2mnet", "dsb2018_nuclei")
    # The one S2M-Net dock (Segment / Fine-tune / Export tabs), Segment in front.
    _, main = viewer.window.add_plugin_dock_widget("napari-s2mnet", "S2M-Net")
    seg = main.segment
    seg.image.value = viewer.layers["nuclei"]
    status = {"code": 0}

    def finished() -> None:
        if screenshot is None:
            return

        def grab() -> None:
            from napari._qt.dialogs.qt_notification import NapariQtNotification

            # The picture shows the result: whole image in view, no start-up toasts over it.
            viewer.reset_view()
            for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
                toast.close()
            viewer.screenshot(str(screenshot), canvas_only=False)
            print(f"[demo] saved window screenshot to {screenshot}")
            viewer.close()

        QTimer.singleShot(500, grab)

    def errored(exc: BaseException) -> None:
        status["code"] = 1
        print(f"[demo] segmentation failed: {exc}")
        if screenshot is not None:
            viewer.close()

    worker = seg.run()
    if worker is None:
        return 1
    worker.finished.connect(finished)
    worker.errored.connect(errored)
    napari.run()
    return status["code"]
