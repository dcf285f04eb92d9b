"""``python -m napari_s2mnet``: the command-line interface (see :mod:`napari_s2mnet.cli`)."""

from napari_s2mnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
