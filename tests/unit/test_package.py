"""The installable foundation: cheap import, valid manifest found by napari, wheel contents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
EXPECTED_WIDGETS = {"Segment", "Fine-tune", "Export"}

# Printed by a subprocess: the plugin's contributions as napari's plugin manager sees them.
DISCOVER = r"""
import json, napari_s2mnet
from importlib.metadata import distribution
from npe2 import PluginManager
pm = PluginManager.instance()
pm.discover()
mf = pm.get_manifest("napari-s2mnet")
import importlib.resources as r
print(json.dumps({
    "file": str(napari_s2mnet.__file__),
    # PEP 610: how the installer got the package ({"dir_info": {"editable": true}} for -e).
    "direct_url": json.loads(distribution("napari-s2mnet").read_text("direct_url.json") or "null"),
    "widgets": [w.display_name for w in mf.contributions.widgets or []],
    "writers": sorted(e for w in mf.contributions.writers or [] for e in w.filename_extensions),
    "samples": [s.key for s in mf.contributions.sample_data or []],
    "sample_exists": (r.files("napari_s2mnet") / "resources" / "sample" / "dsb2018_nuclei.tif").is_file(),
}))
"""


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kw)


def test_import_is_light():
    """Importing the package (what napari does at start-up) pulls in neither torch nor Qt."""
    code = (
        "import sys, napari_s2mnet, napari_s2mnet.cli, napari_s2mnet._writer, "
        "napari_s2mnet._sample_data, napari_s2mnet.preprocess\n"
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'PyQt6', 'napari') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = _run([PY, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"


def test_config_modules_do_not_import_torch():
    """Widgets import config dataclasses from inference/training/checkpoint without torch."""
    code = (
        "import sys\n"
        "from napari_s2mnet.inference import InferenceConfig\n"
        "from napari_s2mnet.training import FinetuneConfig\n"
        "import napari_s2mnet.checkpoint, napari_s2mnet.io, napari_s2mnet.morphology\n"
        "print('torch' in sys.modules)"
    )
    out = _run([PY, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_npe2_validate():
    npe2 = Path(PY).parent / "npe2"
    out = _run([str(npe2), "validate", "napari_s2mnet"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_manifest_found_in_editable_install():
    out = _run([PY, "-c", DISCOVER], cwd="/")  # cwd "/": the repo is not on sys.path by accident
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    # Editable: the installer recorded it so, pointing at this checkout, and the import is the
    # checkout's source (a plain install would import a copy from site-packages).
    assert info["direct_url"]["dir_info"].get("editable") is True, info["direct_url"]
    assert info["direct_url"]["url"] == REPO.as_uri()
    assert Path(info["file"]).resolve().is_relative_to(REPO / "napari_s2mnet")
    assert EXPECTED_WIDGETS <= set(info["widgets"])
    assert {".tif", ".png", ".npy", ".csv"} <= set(info["writers"])
    assert info["samples"] == ["dsb2018_nuclei"]
    assert info["sample_exists"]


@pytest.mark.slow
def test_wheel_ships_manifest_and_resources_in_fresh_venv(tmp_path):
    """Build the wheel, install it into a new venv, and let napari discover the plugin there."""
    uv = [PY, "-m", "uv"]
    if _run([*uv, "--version"]).returncode != 0:
        pytest.skip("uv is not installed in the test environment (run .ci/setup)")
    dist = tmp_path / "dist"
    out = _run([*uv, "build", "--wheel", "-o", str(dist), str(REPO)])
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_s2mnet/napari.yaml" in names
    assert "napari_s2mnet/resources/sample/dsb2018_nuclei.tif" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "napari_s2mnet:napari.yaml" in zipfile.ZipFile(wheel).read(entry).decode()

    venv = tmp_path / "venv"
    assert _run([*uv, "venv", "-q", "--python", PY, str(venv)]).returncode == 0
    vpy = venv / "bin" / "python"
    links = ["--find-links", "/opt/wheels"] if os.path.isdir("/opt/wheels") else []
    out = _run(
        [
            *uv,
            "pip",
            "install",
            "-q",
            "--python",
            str(vpy),
            *links,
            "-c",
            str(REPO / ".ci" / "constraints.txt"),
            str(wheel),
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run([str(vpy), "-c", DISCOVER], cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert str(venv) in info["file"], "imported the repo copy instead of the installed wheel"
    assert not ((info["direct_url"] or {}).get("dir_info") or {}).get("editable")
    assert EXPECTED_WIDGETS <= set(info["widgets"])
    assert info["sample_exists"]
    shutil.rmtree(venv, ignore_errors=True)


def test_public_api_names_are_the_modules_objects():
    """``napari_s2mnet.<name>`` is the object its module defines (loaded lazily)."""
    import napari_s2mnet
    from napari_s2mnet import checkpoint, inference, training

    for name, module in [
        ("segment", inference),
        ("segment_iter", inference),
        ("InferenceConfig", inference),
        ("finetune", training),
        ("train", training),
        ("FinetuneConfig", training),
        ("load_model", checkpoint),
        ("save_model", checkpoint),
        ("load_default_model", checkpoint),
    ]:
        assert getattr(napari_s2mnet, name) is getattr(module, name)
        assert name in napari_s2mnet.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        napari_s2mnet.no_such_name  # noqa: B018
