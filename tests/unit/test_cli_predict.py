"""``python -m napari_s2mnet predict`` on real images: outputs, skipped files, exit codes."""

from __future__ import annotations

import logging

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from napari_s2mnet import checkpoint
from napari_s2mnet.checkpoint import new_model, save_model
from napari_s2mnet.cli import main
from napari_s2mnet.inference import InferenceConfig, run_to_end, segment_iter
from napari_s2mnet.io import read_labels
from napari_s2mnet.measure import measurement_table
from napari_s2mnet.model import ModelConfig


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    # A random-init U-Net (this seed's output follows the image intensity, so with a threshold
    # at its 80th percentile it finds nucleus-like objects; about 70 on DSB2018).
    torch.manual_seed(2)
    bundle = new_model(ModelConfig(arch="unet", in_channels=1, options={"base": 4, "depth": 2}))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(bundle, path)
    return path


@pytest.fixture(scope="module")
def threshold(dsb2018, model_file) -> float:
    """A threshold that gives this random-init model objects to find (its 80th percentile)."""
    bundle = checkpoint.load_model(model_file)
    res = run_to_end(
        segment_iter(
            dsb2018[0],
            bundle,
            InferenceConfig(
                device="cpu", tile_size=256, return_probability=True, compute_features=False
            ),
        )
    )
    return float(np.percentile(res.probability, 80))


@pytest.fixture
def inputs(tmp_path, dsb2018):
    """A folder with the DSB2018 image as ImageJ TIFF, PNG and JPG, a broken TIFF, a text file."""
    image = dsb2018[0]
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(
        folder / "a_nuclei.tif",
        image,
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"unit": "micron"},
    )
    as8 = (image / image.max() * 255).astype(np.uint8)
    iio.imwrite(folder / "b_nuclei.png", as8)
    iio.imwrite(folder / "c_rgb.jpg", np.stack([as8] * 3, axis=-1), quality=95)
    (folder / "d_broken.tif").write_bytes(b"II*\x00 not really a tiff")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(args: list[str]) -> int:
    return main(["predict", *[str(a) for a in args]])


def test_predict_folder_writes_labels_and_features(
    inputs, tmp_path, model_file, threshold, dsb2018, caplog, capsys
):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        rc = _run(
            [
                inputs,
                "-o",
                out,
                "--model",
                model_file,
                "--device",
                "cpu",
                "--tile-size",
                "256",
                "--threshold",
                threshold,
            ]
        )
    assert rc == 1  # the broken TIFF was skipped, the others were done
    assert "d_broken.tif: skipped" in caplog.text
    assert "Could not read 'd_broken.tif'" in caplog.text
    assert "notes.txt" in caplog.text  # ignored non-image, logged
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        f"{s}_{k}"
        for s in ("a_nuclei", "b_nuclei", "c_rgb")
        for k in ("labels.tif", "features.csv")
    )
    assert "[1/4] a_nuclei.tif" in capsys.readouterr().err  # the progress line

    # Files hold exactly what the Python API returns for the same image and settings.
    bundle = checkpoint.load_model(model_file)
    cfg = InferenceConfig(device="cpu", tile_size=256, threshold=threshold)
    expected = run_to_end(segment_iter(dsb2018[0], bundle, cfg, spacing=(0.5, 0.5)))
    labels = read_labels(out / "a_nuclei_labels.tif")
    assert expected.labels.max() > 20
    assert labels.dtype == expected.labels.dtype == np.uint8
    assert np.array_equal(labels, expected.labels)
    features = pd.read_csv(out / "a_nuclei_features.csv")
    assert len(features) == labels.max()
    # The CSV is the table a user reads in napari (measure.measurement_table), not the core's.
    presented = measurement_table(
        expected.features, expected.labels, spacing=(0.5, 0.5), unit="micron", image=dsb2018[0]
    )
    pd.testing.assert_frame_equal(features, presented, check_dtype=False)
    assert "scale" not in features.columns and "area" not in features.columns
    assert np.allclose(features["area_um2"], features["area_px"] * 0.25)  # 0.5 micron pixels
    first = expected.labels == features["label"].iloc[0]
    assert features["mean_intensity"].iloc[0] == pytest.approx(dsb2018[0][first].mean(), rel=1e-5)
    assert {"centroid_y_um", "centroid_x_um"} <= set(features.columns)
    with tifffile.TiffFile(out / "a_nuclei_labels.tif") as tif:
        xres = tif.pages[0].tags["XResolution"].value
        assert xres[1] / xres[0] == pytest.approx(0.5)
        assert tif.imagej_metadata["unit"] == "micron"
    # The RGB JPEG became 2-D labels.
    assert read_labels(out / "c_rgb_labels.tif").shape == dsb2018[0].shape


def test_predict_files_all_ok_exit_zero(inputs, tmp_path, model_file, dsb2018):
    out = tmp_path / "out2"
    # A tiny RGB PNG: too small for napari's colour guess, but the file says it is RGB.
    small = (dsb2018[0][:24, :20] / dsb2018[0].max() * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "tiny.png", np.stack([small] * 3, axis=-1))
    rc = _run(
        [
            inputs / "a_nuclei.tif",
            inputs / "b_nuclei.png",
            tmp_path / "tiny.png",
            "-o",
            out,
            "--model",
            model_file,
            "--device",
            "cpu",
            "--tile-size",
            "512",
        ]
    )
    assert rc == 0
    assert (out / "b_nuclei_labels.tif").is_file() and (out / "b_nuclei_features.csv").is_file()
    assert read_labels(out / "tiny_labels.tif").shape == (24, 20)


def test_channel_mismatch_is_explained(tmp_path, model_file, dsb2018, caplog):
    tifffile.imwrite(
        tmp_path / "two.tif", np.stack([dsb2018[0]] * 2), imagej=True, metadata={"axes": "CYX"}
    )
    rc = _run(
        [tmp_path / "two.tif", "-o", tmp_path / "out", "--model", model_file, "--device", "cpu"]
    )
    assert rc == 1
    assert "expects 1 input channel(s) but the image has 2" in caplog.text


def test_non_image_and_missing_inputs_are_skipped(inputs, tmp_path, model_file, caplog):
    out = tmp_path / "out3"
    rc = _run(
        [
            inputs / "notes.txt",
            inputs / "missing.tif",
            inputs / "b_nuclei.png",
            "-o",
            out,
            "--model",
            model_file,
            "--device",
            "cpu",
        ]
    )
    assert rc == 1
    assert "not a supported image file" in caplog.text
    assert "no such file or folder" in caplog.text
    assert (out / "b_nuclei_labels.tif").is_file()


def test_clear_errors_exit_two(inputs, tmp_path, model_file, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run([empty, "-o", tmp_path / "o", "--model", model_file]) == 2
    assert "No input images" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "gone.safetensors")
    assert _run([inputs / "a_nuclei.tif", "-o", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "default model is missing" in err and "gone.safetensors" in err
    assert (
        _run(
            [
                inputs / "a_nuclei.tif",
                "-o",
                tmp_path / "o",
                "--model",
                model_file,
                "--tile-size",
                "4",
            ]
        )
        == 2
    )
    assert "tile_size" in capsys.readouterr().err


def test_z_context_flag_reaches_the_engine(tmp_path, model_file, threshold, dsb2018, capsys):
    """--z-context N writes what segment_iter(..., z_context=N) returns for the same stack."""
    img = dsb2018[0][:128, :128]
    stack = np.stack([img, img[::-1], img[:, ::-1], img])
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    rc = _run(
        [
            tmp_path / "stack.tif",
            "-o",
            tmp_path / "out",
            "--model",
            model_file,
            "--device",
            "cpu",
            "--threshold",
            threshold,
            "--z-context",
            "1",
        ]
    )
    assert rc == 0
    bundle = checkpoint.load_model(model_file)
    cfg = InferenceConfig(device="cpu", threshold=threshold, z_context=1, compute_features=False)
    expected = run_to_end(segment_iter(stack, bundle, cfg)).labels
    plain = run_to_end(
        segment_iter(
            stack,
            bundle,
            InferenceConfig(device="cpu", threshold=threshold, compute_features=False),
        )
    ).labels
    labels = read_labels(tmp_path / "out" / "stack_labels.tif")
    assert np.array_equal(labels, expected)
    assert not np.array_equal(labels > 0, plain > 0)  # the smoothing changed the masks
    assert (
        _run(
            [
                tmp_path / "stack.tif",
                "-o",
                tmp_path / "o2",
                "--model",
                model_file,
                "--z-context",
                "-1",
            ]
        )
        == 2
    )
    assert "z_context" in capsys.readouterr().err


def test_channels_flag_picks_the_model_input(tmp_path, dsb2018, model_file, threshold):
    image = dsb2018[0]
    noise = np.random.default_rng(0).integers(0, int(image.max()), image.shape).astype(image.dtype)
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    tifffile.imwrite(tmp_path / "one" / "x.tif", image)
    tifffile.imwrite(
        tmp_path / "three" / "x.tif",
        np.stack([noise, noise[::-1], image]),
        photometric="minisblack",
    )
    common = ["--model", model_file, "--device", "cpu", "--threshold", threshold]
    assert _run([tmp_path / "one", "-o", tmp_path / "out1", *common]) == 0
    assert (
        _run(
            [
                tmp_path / "three",
                "-o",
                tmp_path / "out3",
                *common,
                "--channel-axis",
                "0",
                "--channels",
                "2",
            ]
        )
        == 0
    )
    one, three = (read_labels(tmp_path / d / "x_labels.tif") for d in ("out1", "out3"))
    assert one.max() > 10 and np.array_equal(one, three)
    # without --channels a 1-channel model refuses 3 channels (logged, file skipped)
    assert _run([tmp_path / "three", "-o", tmp_path / "out4", *common, "--channel-axis", "0"]) == 1
