"""README and docs screenshots at 1920 x 1080, with the defaults a user gets (issue 16).

Run under a 1920 x 1080 X server, e.g.::

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/screenshots.py

Writes ``docs/images/window.png`` (the whole window: the S2M-Net dock on the Segment tab, the
sample segmented by the bundled model with default settings, the features table docked) and one
picture per tab: ``segment.png``, ``finetune.png``, ``export.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/images"), help="output folder")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-s2mnet")
    win = viewer.window._qt_window
    win.showNormal()
    win.resize(1920, 1080)
    win.move(0, 0)
    viewer.open_sample("napari-s2mnet", "dsb2018_nuclei")
    _, main_widget = viewer.window.add_plugin_dock_widget("napari-s2mnet", "S2M-Net")
    seg = main_widget.segment
    seg.image.value = viewer.layers["nuclei"]
    worker = seg.run()
    if worker is None:
        return 1
    while seg.worker is not None:  # the segmentation runs in a thread; keep Qt alive
        QApplication.processEvents()
        time.sleep(0.05)
    result = viewer.layers[-1]
    seg.show_table()
    viewer.layers.selection.active = result
    viewer.reset_view()

    def settle() -> None:
        for _ in range(20):
            QApplication.processEvents()
        for toast in win.findChildren(NapariQtNotification):
            toast.close()
        QApplication.processEvents()

    settle()
    viewer.screenshot(str(args.out / "window.png"), canvas_only=False)
    print(f"saved {args.out / 'window.png'} ({win.width()} x {win.height()})")
    for index, name in enumerate(("segment", "finetune", "export")):
        main_widget.tabs.setCurrentIndex(index)
        settle()
        path = args.out / f"{name}.png"
        main_widget.grab().save(str(path))
        print(f"saved {path}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
