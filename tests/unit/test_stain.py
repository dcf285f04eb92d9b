"""Input transforms for brightfield and H&E/IHC images (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from napari_s2mnet.layout import ImageLayout
from napari_s2mnet.stain import brightfield_warning, hematoxylin, transform_input

RGB = ImageLayout(rgb=True, channel_axis=-1)


def test_invert_is_exact_for_unsigned_and_float_images():
    u8 = np.array([[0, 10], [200, 255]], np.uint8)
    out, _ = transform_input(u8, ImageLayout(), "invert")
    assert out.dtype == np.uint8 and out.tolist() == [[255, 245], [55, 0]]
    f = np.array([[0.5, 1.0], [2.0, 3.0]], np.float32)
    assert transform_input(f, ImageLayout(), "invert")[0].tolist() == [[3.0, 2.5], [1.5, 0.5]]
    assert transform_input(u8, ImageLayout(), "none")[0] is u8


def test_hematoxylin_makes_ihc_nuclei_bright():
    ihc = data.immunohistochemistry()
    h, lay = transform_input(ihc, RGB, "hematoxylin")
    assert h.shape == ihc.shape[:2] and h.dtype == np.float32 and not lay.rgb
    # Nuclei are the blue-stained, darkest pixels of the blue channel: they are the
    # brightest of the hematoxylin channel.
    gray = ihc.mean(axis=-1)
    dark = gray < np.percentile(gray, 10)
    bright_bg = gray > np.percentile(gray, 70)
    assert np.median(h[dark]) > np.median(h[bright_bg])
    # A stack of RGB planes: the same per plane.
    stack = hematoxylin(np.stack([ihc[:64, :64], ihc[64:128, :64]]))
    np.testing.assert_allclose(stack[1], h[64:128, :64], rtol=1e-5, atol=1e-6)


def test_brightfield_warning_names_the_fix():
    ihc = data.immunohistochemistry()
    msg = brightfield_warning(ihc, RGB, "none")
    assert msg and "hematoxylin" in msg and "invert" in msg
    assert brightfield_warning(ihc, RGB, "hematoxylin") is None
    fluo = np.zeros((64, 64, 3), np.uint8)
    fluo[20:30, 20:30] = 250
    assert brightfield_warning(fluo, RGB, "none") is None
    assert brightfield_warning(ihc[..., 0], ImageLayout(), "none") is None


def test_bad_transforms_are_explained():
    with pytest.raises(ValueError, match="input_transform must be one of"):
        transform_input(np.zeros((4, 4)), ImageLayout(), "hed")
    with pytest.raises(ValueError, match="needs an RGB image"):
        transform_input(np.zeros((8, 8)), ImageLayout(), "hematoxylin")
    from napari_s2mnet.inference import InferenceConfig

    with pytest.raises(ValueError, match="input_transform"):
        InferenceConfig(input_transform="hed").validate()
