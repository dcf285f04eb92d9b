"""Label / feature / image files: round trips, minimal dtypes, Fiji metadata, atomic writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_s2mnet.io import (
    load_image,
    read_image,
    read_labels,
    smallest_uint_dtype,
    write_features_csv,
    write_labels,
)


def _labels(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, n + 1, size=shape, dtype=np.int64)
    lab.reshape(-1)[:1] = n  # make sure the largest id is present
    return lab


def test_smallest_uint_dtype():
    assert smallest_uint_dtype(0) == np.uint8
    assert smallest_uint_dtype(255) == np.uint8
    assert smallest_uint_dtype(256) == np.uint16
    assert smallest_uint_dtype(65535) == np.uint16
    assert smallest_uint_dtype(65536) == np.uint32
    assert smallest_uint_dtype(np.uint64(2**32)) == np.uint64
    with pytest.raises(ValueError, match=">= 0"):
        smallest_uint_dtype(-1)


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".png", ".npy"])
@pytest.mark.parametrize(
    ("n", "dtype"), [(1, np.uint8), (255, np.uint8), (300, np.uint16), (65535, np.uint16)]
)
def test_round_trip_2d_with_minimal_dtype(tmp_path, suffix, n, dtype):
    lab = _labels((40, 300), n)
    path = write_labels(tmp_path / f"lab{suffix}", lab)
    back = read_labels(path)
    assert back.dtype == dtype
    assert np.array_equal(back, lab)


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_round_trip_3d_and_4d(tmp_path, suffix):
    for shape in [(3, 20, 30), (2, 3, 10, 12)]:
        lab = _labels(shape, 500)
        back = read_labels(write_labels(tmp_path / f"s{len(shape)}{suffix}", lab))
        assert back.dtype == np.uint16 and back.shape == shape and np.array_equal(back, lab)


def test_many_labels_tiff_is_float32_for_imagej_and_reads_back_as_uint32(tmp_path):
    lab = np.arange(300 * 300, dtype=np.uint32).reshape(300, 300)  # 89999 > 65535 labels
    path = write_labels(tmp_path / "big.tif", lab, spacing=(0.5, 0.5), unit="micron")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej  # Fiji reads it (ImageJ has no 32-bit integer images)
        assert tif.pages[0].dtype == np.float32
    back = read_labels(path)
    assert back.dtype == np.uint32 and np.array_equal(back, lab)
    np_back = read_labels(write_labels(tmp_path / "big.npy", lab))
    assert np_back.dtype == np.uint32 and np.array_equal(np_back, lab)


def test_tiff_pixel_size_is_readable_like_fiji(tmp_path):
    lab = _labels((4, 30, 40), 20)
    path = write_labels(tmp_path / "stack.tif", lab, spacing=(2.0, 0.25, 0.5), unit="micrometer")
    with tifffile.TiffFile(path) as tif:
        ij = tif.imagej_metadata
        assert ij["unit"] == "micron" and ij["spacing"] == pytest.approx(2.0)
        assert ij["slices"] == 4
        page = tif.pages[0]
        xres, yres = page.tags["XResolution"].value, page.tags["YResolution"].value
        assert xres[1] / xres[0] == pytest.approx(0.5)  # X pixel size from "pixels per unit"
        assert yres[1] / yres[0] == pytest.approx(0.25)
        assert tif.series[0].axes == "ZYX"
    img = load_image(path)
    assert img.spacing == pytest.approx((2.0, 0.25, 0.5)) and img.unit == "micron"
    assert np.array_equal(img.data, lab)


def test_napari_style_arguments(tmp_path):
    lab = _labels((20, 20), 3)
    units = ("micrometer", "micrometer")
    path = write_labels(tmp_path / "a.tif", lab, spacing=(0.3, 0.3), unit=units)
    img = load_image(path)
    assert img.spacing == pytest.approx((0.3, 0.3)) and img.unit == "micron"


def test_bool_and_whole_float_labels_are_accepted(tmp_path):
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    back = read_labels(write_labels(tmp_path / "m.png", mask))
    assert back.dtype == np.uint8 and np.array_equal(back, mask)
    back = read_labels(write_labels(tmp_path / "f.npy", mask.astype(np.float64) * 7))
    assert back.dtype == np.uint8 and back.max() == 7


def test_png_limits(tmp_path):
    with pytest.raises(ValueError, match=r"2-D images only.*tif"):
        write_labels(tmp_path / "a.png", _labels((2, 10, 10), 3))
    with pytest.raises(ValueError, match=r"65535 labels.*65536"):
        write_labels(tmp_path / "b.png", _labels((300, 300), 65536))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([[0, -1]]), ">= 0"),
        (np.array([[0.5, 1.0]]), "whole numbers"),
        (np.zeros((0, 4), np.uint8), "empty"),
        (np.zeros(5, np.uint8), "at least 2 dimensions"),
    ],
)
def test_bad_labels(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        write_labels(tmp_path / "x.tif", labels)


def test_bad_extension_and_spacing(tmp_path):
    with pytest.raises(ValueError, match=r"unknown extension '\.jpg'"):
        write_labels(tmp_path / "x.jpg", _labels((5, 5), 2))
    with pytest.raises(ValueError, match="positive"):
        write_labels(tmp_path / "x.tif", _labels((5, 5), 2), spacing=(0, 1))
    with pytest.raises(ValueError, match="one value per axis"):
        write_labels(tmp_path / "x.tif", _labels((5, 5), 2), spacing=(1, 1, 1))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "lab.tif"
    old = _labels((10, 10), 3)
    write_labels(path, old)

    def broken(file, *args, **kwargs):
        with open(file, "wb") as fh:
            fh.write(b"II*\x00 partial")  # half a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="No space"):
        write_labels(path, _labels((10, 10), 9))
    assert np.array_equal(read_labels(path), old)  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["lab.tif"]  # no temporary file left
    with pytest.raises(OSError):
        write_labels(tmp_path / "new.tif", old)
    assert not (tmp_path / "new.tif").exists()


def test_features_csv_round_trip(tmp_path):
    df = pd.DataFrame({"index": [1, 2], "label": [1, 2], "area": [3.5, 4.25], "class": [1, 1]})
    path = write_features_csv(df, tmp_path / "f.csv")
    back = pd.read_csv(path)
    pd.testing.assert_frame_equal(back, df)
    with pytest.raises(ValueError, match=r"\.csv"):
        write_features_csv(df, tmp_path / "f.txt")
    with pytest.raises(TypeError, match="DataFrame"):
        write_features_csv({"a": 1}, tmp_path / "g.csv")


def test_read_image_formats_and_errors(tmp_path):
    import imageio.v3 as iio

    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "a.png", rgb)
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    assert load_image(tmp_path / "a.png").rgb
    iio.imwrite(tmp_path / "b.jpg", rgb)
    assert read_image(tmp_path / "b.jpg").shape == (20, 30, 3)
    gray16 = (np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)
    tifffile.imwrite(tmp_path / "c.tif", gray16)
    img = load_image(tmp_path / "c.tif")
    assert np.array_equal(img.data, gray16) and img.spacing is None and not img.rgb
    tifffile.imwrite(tmp_path / "d.tif", rgb, photometric="rgb")
    assert load_image(tmp_path / "d.tif").rgb

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a supported image file"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "fake.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match=r"Could not read 'fake.tif' as an image"):
        read_image(tmp_path / "fake.tif")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="Could not read"):
        read_image(tmp_path / "fake.png")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.tif")


def test_physical_unit_of_napari_units() -> None:
    from napari_s2mnet.io import physical_unit

    assert physical_unit(None) is None and physical_unit([]) is None
    assert physical_unit(("pixel", "pixel")) is None and physical_unit("px") is None
    assert physical_unit(("um", "nm")) == "nm"  # the in-plane (last) axis
    assert physical_unit("µm") == "µm"
