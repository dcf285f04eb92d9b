"""Everything that imports Qt, magicgui or napari: the widgets, the thread-worker glue and the demo.

Thin: widgets turn user input into config dataclasses, run core generators in napari thread
workers, and turn results into layers. Core modules outside this package never import Qt."""
