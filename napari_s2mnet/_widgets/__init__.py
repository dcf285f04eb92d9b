"""napari widgets (Qt). Thin: they turn user input into config dataclasses, run core generators in
napari thread workers, and turn results into layers."""
