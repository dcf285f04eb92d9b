"""``python -m napari_s2mnet train / predict / info``: the final summary, and a DSSAU-Net round trip.

Synthetic images of bright discs on a noisy background, written as TIFF files; the models are
trained for one virtual epoch (10 steps) on the CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_s2mnet.checkpoint import load_model
from napari_s2mnet.cli import main
from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
from napari_s2mnet.io import read_labels
from napari_s2mnet.model import count_parameters

REPO = Path(__file__).resolve().parents[2]


def _write_discs(folder: Path, n_images: int, side: int, n_discs: int) -> tuple[Path, Path]:
    """``folder/img/<i>.tif`` (uint8) and ``folder/lab/<i>.tif`` (instance ids), non-overlapping."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    (folder / "lab").mkdir()
    yy, xx = np.mgrid[:side, :side]
    for i in range(n_images):
        lab = np.zeros((side, side), np.uint16)
        k = 0
        while k < n_discs:
            cy, cx = rng.integers(9, side - 9, 2)
            r = int(rng.integers(4, 8))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2) ** 2].any():
                continue  # keep discs apart so every one is its own object
            k += 1
            lab[disc] = k
        img = ((lab > 0) * 150.0 + rng.normal(30, 8, lab.shape)).clip(0, 255).astype(np.uint8)
        tifffile.imwrite(folder / "img" / f"{i}.tif", img)
        tifffile.imwrite(folder / "lab" / f"{i}.tif", lab)
    return folder / "img", folder / "lab"


def test_train_prints_the_final_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Two images of 160 px: a quarter (40 rows >= the 32 px minimum band) of each validates.
    images, labels = _write_discs(tmp_path, n_images=2, side=160, n_discs=14)
    out = tmp_path / "model.safetensors"
    rc = main(
        [
            "train",
            "--images",
            str(images),
            "--labels",
            str(labels),
            "-o",
            str(out),
            "--model",
            "new",
            "--arch",
            "unet",
            "--loss",
            "dicebce",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--crop-size",
            "64",
            "--seed",
            "0",
            "--val-fraction",
            "0.25",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # The last three lines: the run's message, the numbers, where the model went.
    message, numbers, saved = lines[-3:]
    assert saved == f"saved: {out}"
    m = re.fullmatch(r"steps: (\d+)  best validation Dice: (\d\.\d{3})  time: (\d+\.\d) s", numbers)
    assert m, numbers
    history = load_model(out).metadata["history"][-1]
    # The printed numbers are the saved model's.
    assert int(m.group(1)) == history["steps"] == 10
    assert float(m.group(2)) == pytest.approx(history["best_val_dice"], abs=5e-4)
    assert message.startswith("completed: 10 steps in ")
    assert f"-> {m.group(2)} (best at step {history['best_step']})" in message
    assert lines[0].startswith("training on 2 image(s) with 28 objects")


def _cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "napari_s2mnet", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_dssau_train_predict_info_end_to_end(tmp_path: Path) -> None:
    images, labels = _write_discs(tmp_path, n_images=2, side=96, n_discs=6)
    model = tmp_path / "dssau.safetensors"
    proc = _cli(
        "train",
        "--images",
        images,
        "--labels",
        labels,
        "-o",
        model,
        "--model",
        "new",
        "--arch",
        "dssau",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--crop-size",
        "64",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps: 10  best validation Dice: n/a" in proc.stderr
    assert proc.stderr.rstrip().endswith(f"saved: {model}")
    bundle = load_model(model)
    assert bundle.config.arch == "dssau" and bundle.config.in_channels == 1
    assert bundle.metadata["history"][-1]["steps"] == 10

    # Ten steps teach the model little: threshold at its own 90th percentile so that the
    # labels have objects to compare.
    image = tifffile.imread(images / "0.tif")
    cfg = InferenceConfig(device="cpu", return_probability=True, compute_features=False)
    prob = run_to_end(segment_iter(image, bundle, cfg)).probability
    threshold = float(np.percentile(prob, 90))
    assert 0.0 < threshold < 1.0

    out = tmp_path / "pred"
    proc = _cli(
        "predict",
        images / "0.tif",
        "-o",
        out,
        "--model",
        model,
        "--device",
        "cpu",
        "--threshold",
        repr(threshold),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["0_features.csv", "0_labels.tif"]
    written = read_labels(out / "0_labels.tif")
    # The file holds what the Python API gives with the re-read model on the same image.
    cfg = InferenceConfig(device="cpu", threshold=threshold)
    expected = run_to_end(segment_iter(image, bundle, cfg))
    assert written.shape == image.shape and expected.labels.max() > 0
    assert np.array_equal(written, expected.labels)
    table = pd.read_csv(out / "0_features.csv")
    assert len(table) == int(expected.labels.max())
    assert {"label", "area_px", "mean_intensity"} <= set(table.columns)

    proc = _cli("info", model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = {
        k.strip(): v.strip() for k, v in (ln.split(" : ", 1) for ln in proc.stdout.splitlines())
    }
    assert info["model file"] == str(model)
    assert '"arch": "dssau"' in info["config"]
    assert info["parameters"] == f"{count_parameters(bundle.model):,}"
