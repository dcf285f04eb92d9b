"""Inference engine: layouts, dtypes, seamless tiling, cancellation, OOM fallback, bad input.

Most tests use a *pointwise* network (a 1x1 convolution with fixed weights: a sharp sigmoid of
the normalised intensity). Its output at a pixel depends on that pixel only, so the correct
result of the whole pipeline can be computed independently with numpy/scikit-image, and tiling
must not change it at all. Real networks (a small U-Net and S2M-Net) check the tile path against
a direct forward pass, and a U-Net with a 44 px receptive field checks that blended tiles leave
no seams.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from torch import nn

from napari_s2mnet import checkpoint, tiling
from napari_s2mnet.checkpoint import ModelBundle, new_model
from napari_s2mnet.inference import (
    ImageLayout,
    InferenceConfig,
    Progress,
    SegmentationResult,
    engine,
    guess_layout,
    run_to_end,
    segment,
    segment_iter,
)
from napari_s2mnet.model import ModelConfig
from napari_s2mnet.morphology import FEATURE_COLUMNS
from napari_s2mnet.preprocess import NormalizationConfig, normalize

GAIN = 20.0
LEVEL = 0.4037  # threshold level of the pointwise model, away from quantised normalised values


class Pointwise(nn.Module):
    """Binary: ``logit = GAIN * (mean of channels - LEVEL)``; multi-class: class k above level k."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1, stride: int = 4) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        with torch.no_grad():
            if num_classes == 1:
                self.conv.weight.fill_(GAIN / in_channels)
                self.conv.bias.fill_(-GAIN * LEVEL)
            else:  # logits k * GAIN * (x - 0.3 (k+1)/2): class k wins for x in (0.3 k, 0.3 (k+1))
                for k in range(num_classes):
                    self.conv.weight[k].fill_(GAIN * k / in_channels)
                    self.conv.bias[k] = -GAIN * 0.3 * k * (k + 1) / 2
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.conv(x)


def pointwise_bundle(in_channels: int = 1, num_classes: int = 1, **kw) -> ModelBundle:
    cfg = ModelConfig(arch="unet", in_channels=in_channels, num_classes=num_classes)
    return ModelBundle(Pointwise(in_channels, num_classes, **kw), cfg, NormalizationConfig())


def cpu(**kw) -> InferenceConfig:
    return InferenceConfig(device="cpu", **kw)


def expected_instances(image: np.ndarray, min_size: int = 10) -> np.ndarray:
    """What the pipeline must produce with the pointwise model, computed independently."""
    norm = normalize(image, NormalizationConfig(), None)
    mask = norm > LEVEL
    lab = sk_label(mask, connectivity=2)
    sizes = np.bincount(lab.ravel())
    small = sizes < min_size
    small[0] = True
    mask[small[lab]] = False
    return sk_label(mask, connectivity=2)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a renaming of the ids (a one-to-one map between them)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.fixture(scope="module")
def nuclei(dsb2018) -> np.ndarray:
    """A 256 x 320 crop of the real DSB2018 image (uint16)."""
    return dsb2018[0][:256, :320]


@pytest.fixture(scope="module")
def small_unet() -> ModelBundle:
    torch.manual_seed(0)
    return new_model(ModelConfig(arch="unet", in_channels=1, options={"base": 4, "depth": 3}))


# --------------------------------------------------------------------------------------------
# config and layout


def test_config_defaults_and_validation():
    cfg = InferenceConfig()
    assert (cfg.tile_size, cfg.overlap, cfg.batch_size, cfg.device) == (None, 0.125, 4, "auto")
    assert cfg.threshold is None and cfg.amp and not cfg.tta and not cfg.split_touching
    cfg.validate()
    for bad in (
        {"tile_size": 8},
        {"overlap": 0.8},
        {"overlap": -0.1},
        {"batch_size": 0},
        {"threshold": 1.0},
        {"threshold": 0.0},
        {"min_size": -1},
        {"split_min_distance": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(cfg, **bad).validate()


def test_guess_layout_follows_napari():
    assert guess_layout((64, 64)) == ImageLayout()
    assert guess_layout((64, 64, 3)).rgb
    assert guess_layout((64, 64, 4)).channel_axis == 2
    assert not guess_layout((3, 64, 64)).rgb  # channel-first is never guessed
    assert not guess_layout((10, 10, 3)).rgb  # too small to be colour (napari's rule)
    assert guess_layout((10, 10, 3), rgb=True).rgb
    assert not guess_layout((64, 64, 3), rgb=False).rgb
    with pytest.raises(ValueError, match="3 or 4"):
        guess_layout((64, 64, 5), rgb=True)


# --------------------------------------------------------------------------------------------
# 2-D results against an independent computation


def test_gray_2d_matches_independent_pipeline(nuclei):
    result = run_to_end(segment_iter(nuclei, pointwise_bundle(), cpu(tile_size=128)))
    assert isinstance(result, SegmentationResult)
    expected = expected_instances(nuclei)
    assert expected.max() > 10  # real nuclei were found
    assert same_partition(result.labels, expected)
    assert result.labels.dtype == np.uint8  # smallest type for < 256 objects
    assert result.labels.max() == expected.max()
    assert np.array_equal(np.unique(result.labels), np.arange(expected.max() + 1))  # sequential
    # features: one row per label, napari's index column, areas as counted
    f = result.features
    assert list(f.columns[: len(FEATURE_COLUMNS)]) == list(FEATURE_COLUMNS)
    assert f["index"].tolist() == list(range(1, expected.max() + 1))
    counts = np.bincount(result.labels.ravel())[1:]
    assert f["area_px"].tolist() == counts.tolist()
    assert (f["mean_probability"] > 0.5).all() and (f["mean_probability"] <= 1).all()
    assert result.device.startswith("CPU") and result.threshold == 0.5


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64])
def test_dtypes_give_identical_labels(nuclei, dtype):
    # Values 0..250 are exact in every dtype, so normalisation and labels must agree.
    base = np.round(nuclei.astype(np.float64) / nuclei.max() * 250)
    reference = expected_instances(base.astype(np.uint8))
    labels, _ = segment(base.astype(dtype), pointwise_bundle(), cpu(tile_size=256))
    assert same_partition(labels, reference)


def test_bool_image_segments_the_true_pixels():
    mask = np.zeros((64, 80), dtype=bool)
    mask[10:20, 10:30] = True
    mask[40:55, 50:70] = True
    labels, features = segment(mask, pointwise_bundle(), cpu(tile_size=64))
    assert same_partition(labels, sk_label(mask))
    assert features["area_px"].tolist() == [200, 300]


def test_spacing_gives_physical_area(nuclei):
    _, f1 = segment(nuclei, pointwise_bundle(), cpu())
    _, f2 = segment(nuclei, pointwise_bundle(), cpu(), spacing=(0.5, 0.25))
    assert np.allclose(f2["area"], f1["area_px"] * 0.125)
    with pytest.raises(ValueError, match="positive"):
        segment(nuclei, pointwise_bundle(), cpu(), spacing=(0.0, 1.0))
    with pytest.raises(ValueError, match="one value per"):
        segment(nuclei, pointwise_bundle(), cpu(), spacing=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------
# colour and channels


def test_rgb_and_rgba_with_one_channel_model(nuclei):
    gray = (nuclei / nuclei.max() * 255).astype(np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((*gray.shape, 1), 7, np.uint8)], axis=-1)
    ref = run_to_end(segment_iter(gray, pointwise_bundle(), cpu()))
    for img in (rgb, rgba):
        res = run_to_end(segment_iter(img, pointwise_bundle(), cpu()))
        assert res.labels.shape == gray.shape
        assert np.array_equal(res.labels, ref.labels)
        assert any("gray" in m for m in res.messages)
    assert any("alpha" in m for m in res.messages)


def test_gray_replicated_for_three_channel_model(nuclei):
    ref = run_to_end(segment_iter(nuclei, pointwise_bundle(), cpu()))
    res = run_to_end(segment_iter(nuclei, pointwise_bundle(in_channels=3), cpu()))
    assert np.array_equal(res.labels, ref.labels)
    assert any("replicated" in m for m in res.messages)


def test_channel_axis_anywhere(nuclei):
    two = np.stack([nuclei, nuclei[::-1]])  # (C, Y, X)
    bundle = pointwise_bundle(in_channels=2)
    a, _ = segment(two, bundle, cpu(), layout=ImageLayout(channel_axis=0))
    b, _ = segment(np.moveaxis(two, 0, -1), bundle, cpu(), layout=ImageLayout(channel_axis=-1))
    assert a.shape == nuclei.shape and np.array_equal(a, b)


def test_channel_mismatch_is_a_clear_error(nuclei):
    two = np.stack([nuclei, nuclei])
    expected = r"expects 3 input channel\(s\) but the image has 2.*shape \(2, 256, 320\)"
    with pytest.raises(ValueError, match=expected):
        segment(two, pointwise_bundle(in_channels=3), cpu(), layout=ImageLayout(channel_axis=0))
    with pytest.raises(ValueError, match="expects 1 input"):
        segment(two, pointwise_bundle(), cpu(), layout=ImageLayout(channel_axis=0))


def test_channels_pick_and_order_the_model_inputs(nuclei):
    noise = np.random.default_rng(0).integers(0, 4000, nuclei.shape).astype(nuclei.dtype)
    three = np.stack([noise, noise[::-1], nuclei])  # the nuclear stain is channel 2
    ref, _ = segment(nuclei, pointwise_bundle(), cpu())
    for channels in ((2,), (-1,)):
        lab, _ = segment(
            three, pointwise_bundle(), cpu(), layout=ImageLayout(channel_axis=0, channels=channels)
        )
        assert np.array_equal(lab, ref)
    # order follows the model's inputs: (2, 0) on a 2-channel model == the stacked pair
    pair = np.stack([nuclei, noise], axis=-1)
    a, _ = segment(
        three,
        pointwise_bundle(in_channels=2),
        cpu(),
        layout=ImageLayout(channel_axis=0, channels=(2, 0)),
    )
    b, _ = segment(
        pair, pointwise_bundle(in_channels=2), cpu(), layout=ImageLayout(channel_axis=-1)
    )
    assert np.array_equal(a, b)
    # one channel of an RGB image (no gray conversion)
    rgb = np.stack([noise, nuclei, noise], axis=-1)
    c, _ = segment(rgb, pointwise_bundle(), cpu(), layout=ImageLayout(rgb=True, channels=(1,)))
    assert np.array_equal(c, ref)
    with pytest.raises(ValueError, match=r"3 is not a channel.*valid 0\.\.2"):
        segment(three, pointwise_bundle(), cpu(), layout=ImageLayout(channel_axis=0, channels=(3,)))
    with pytest.raises(ValueError, match="needs a channel axis"):
        segment(nuclei, pointwise_bundle(), cpu(), layout=ImageLayout(channels=(0,)))
    with pytest.raises(ValueError, match=r"has 2 selected.*channels=\.\.\."):
        segment(
            three, pointwise_bundle(), cpu(), layout=ImageLayout(channel_axis=0, channels=(0, 2))
        )


def test_a_short_last_axis_read_as_space_is_pointed_out(nuclei):
    img = np.stack([nuclei[:64, :64]] * 5, axis=-1)  # (64, 64, 5): channels, or 64 slices?
    res = run_to_end(segment_iter(img, pointwise_bundle(), cpu()))
    assert res.labels.shape == img.shape
    assert any("set channel_axis=2" in m for m in res.messages)
    plain = run_to_end(segment_iter(np.stack([nuclei] * 3), pointwise_bundle(), cpu()))
    assert not any("channel_axis" in m for m in plain.messages)


def test_training_uses_the_same_channel_selection(nuclei):
    from napari_s2mnet.training.data import _normalized_planes

    noise = np.random.default_rng(1).integers(0, 4000, nuclei.shape).astype(nuclei.dtype)
    three = np.stack([noise, nuclei, noise])
    labels = (nuclei > nuclei.mean()).astype(np.uint16)
    planes, _ = _normalized_planes(
        three, labels, ImageLayout(channel_axis=0, channels=(1,)), pointwise_bundle(), "x"
    )
    direct, _ = _normalized_planes(nuclei, labels, ImageLayout(), pointwise_bundle(), "x")
    np.testing.assert_array_equal(planes, direct)


# --------------------------------------------------------------------------------------------
# stacks and time series


def test_stack_slices_have_unique_ids(nuclei):
    stack = np.stack([nuclei, nuclei[:, ::-1], nuclei[::-1]])
    # labels_3d="off": every plane on its own (3-D labelling is tested in test_instances.py)
    res = run_to_end(
        segment_iter(stack, pointwise_bundle(), cpu(labels_3d="off"), spacing=(2.0, 0.5, 0.5))
    )
    assert res.labels.shape == stack.shape
    ids = [set(np.unique(s)) - {0} for s in res.labels]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    # The stack is normalised as a whole; these slices share their statistics with a 2-D run.
    for k, sl in enumerate(stack):
        assert same_partition(res.labels[k], expected_instances(sl))
    f = res.features
    assert len(f) == res.labels.max() == len(set().union(*ids))
    assert f["index"].is_unique and "z" in f.columns
    assert sorted(f.loc[f["z"] == 1, "label"]) == sorted(ids[1])
    assert np.allclose(f["area"], f["area_px"] * 0.25)


def test_time_series_4d_and_dtype_growth():
    rng = np.random.default_rng(1)
    # Dense speckle: many objects per slice, so ids across 2 x 3 slices need uint16.
    data = (rng.random((2, 3, 96, 96)) > 0.55).astype(np.uint8) * 200
    # labels_3d="off": ids per plane (3-D labelling of stacks is tested in test_instances.py)
    cfg = cpu(min_size=1, compute_features=False, labels_3d="off")
    res = run_to_end(segment_iter(data, pointwise_bundle(), cfg))
    assert res.labels.shape == data.shape
    counts = [int(sk_label(d > 0, connectivity=2).max()) for d in data.reshape(-1, 96, 96)]
    assert res.labels.max() == sum(counts) > 255
    assert res.labels.dtype == np.uint16
    assert len(np.unique(res.labels)) == sum(counts) + 1


def _moving_average_z(prob: np.ndarray, n: int) -> np.ndarray:
    """Mean over the clipped window z-n..z+n of the last lead axis, computed independently."""
    out = np.empty_like(prob)
    depth = prob.shape[-3]
    for idx in np.ndindex(*prob.shape[:-3]):
        for z in range(depth):
            lo, hi = max(0, z - n), min(depth, z + n + 1)
            out[(*idx, z)] = prob[(*idx, slice(lo, hi))].mean(axis=0)
    return out


@pytest.mark.parametrize(("shape", "n"), [((5,), 1), ((6,), 2), ((2, 4), 1), ((3,), 5)])
def test_z_context_averages_probabilities_along_z_only(shape, n):
    """2.5-D smoothing: each slice's probabilities are the mean over its +-n z neighbours, never
    across time points; labels are thresholded from the smoothed map."""
    rng = np.random.default_rng(4)
    data = rng.normal(0.4, 0.2, (*shape, 40, 48)).astype(np.float32)
    axis_names = ("t", "z")[-len(shape) :]
    layout = ImageLayout(axis_names=axis_names)
    plain = run_to_end(
        segment_iter(
            data, pointwise_bundle(), cpu(return_probability=True, min_size=0), layout=layout
        )
    )
    smooth = run_to_end(
        segment_iter(
            data,
            pointwise_bundle(),
            cpu(return_probability=True, min_size=0, z_context=n),
            layout=layout,
        )
    )
    expected = _moving_average_z(plain.probability, n)
    np.testing.assert_allclose(smooth.probability, expected, atol=1e-6)
    assert not np.allclose(smooth.probability, plain.probability)
    fg = smooth.labels > 0
    assert np.array_equal(fg, smooth.probability > smooth.threshold)
    assert smooth.n_tiles == plain.n_tiles  # no extra network passes


def test_z_context_is_ignored_for_2d_and_validated(nuclei):
    a = segment(nuclei, pointwise_bundle(), cpu())[0]
    b = segment(nuclei, pointwise_bundle(), cpu(z_context=2))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="z_context"):
        cpu(z_context=-1).validate()


def test_per_slice_normalisation_option():
    # A dim slice and a bright one: stack statistics keep the dim slice empty, per-slice ones don't.
    rng = np.random.default_rng(2)
    dim = rng.integers(0, 10, (64, 64))
    bright = dim.copy()
    bright[20:40, 20:40] = 1000
    stack = np.stack([dim, bright]).astype(np.uint16)
    whole, _ = segment(stack, pointwise_bundle(), cpu(min_size=1))
    per, _ = segment(stack, pointwise_bundle(), cpu(min_size=1, normalize_per_slice=True))
    assert whole[0].max() == 0 and whole[1].max() > 0
    assert per[0].max() > 0


# --------------------------------------------------------------------------------------------
# tiling


@pytest.mark.parametrize(("tile", "overlap", "batch"), [(64, 0.25, 4), (48, 0.5, 3), (32, 0.0, 1)])
def test_tiling_is_seamless_for_a_pointwise_model(nuclei, tile, overlap, batch):
    crop = nuclei[:, :301]  # width not a multiple of the stride
    one = run_to_end(segment_iter(crop, pointwise_bundle(), cpu(return_probability=True)))
    tiled = run_to_end(
        segment_iter(
            crop,
            pointwise_bundle(),
            cpu(tile_size=tile, overlap=overlap, batch_size=batch, return_probability=True),
        )
    )
    assert one.n_tiles == 1 and tiled.n_tiles > 4
    assert np.abs(one.probability - tiled.probability).max() < 1e-5
    direct = 1 / (1 + np.exp(-GAIN * (normalize(crop, NormalizationConfig(), None) - LEVEL)))
    assert np.abs(one.probability - direct).max() < 1e-5
    assert np.array_equal(one.labels, tiled.labels)


@pytest.mark.parametrize("arch", ["unet", "s2mnet"])
def test_one_tile_equals_a_direct_forward_pass(arch, nuclei):
    options = (
        {"base": 4, "depth": 3}
        if arch == "unet"
        else {"widths": [8, 8, 16, 16, 16], "stem": 8, "expansion": 2, "head_widths": [8, 8]}
    )
    torch.manual_seed(0)
    bundle = new_model(ModelConfig(arch=arch, in_channels=1, options=options))
    img = nuclei[:128, :192]  # a multiple of both strides: no padding anywhere
    res = run_to_end(segment_iter(img, bundle, cpu(tile_size=256, return_probability=True)))
    assert res.n_tiles == 1
    x = torch.from_numpy(normalize(img, bundle.normalization, None))[None, None]
    bundle.model.eval()
    with torch.no_grad():
        direct = torch.sigmoid(bundle.model(x))[0, 0].numpy()
    assert np.abs(res.probability - direct).max() < 1e-3


def _calibrated_unet(image: np.ndarray) -> ModelBundle:
    """A random 3-level U-Net whose probabilities span ``(0, 1)`` on ``image``.

    A freshly initialised net's logits are almost constant (std ~1e-3), so any tiling would agree
    to 1e-5. Rescaling the last 1x1 convolution to logit std 3 (and mean 0) makes the probability
    map structured and the test sensitive, without changing the net's receptive field.
    """
    torch.manual_seed(0)
    bundle = new_model(ModelConfig(arch="unet", in_channels=1, options={"base": 4, "depth": 3}))
    net = bundle.model.eval()
    x = torch.from_numpy(normalize(image, bundle.normalization, None))[None, None]
    with torch.no_grad():
        logits = net(x)
        scale = 3.0 / float(logits.std())
        net.classifier.weight.mul_(scale)
        net.classifier.bias.mul_(scale)
        net.classifier.bias.sub_(float(net(x).mean()))
    return bundle


def test_tiling_has_no_seams_with_a_real_network(nuclei):
    img = nuclei[:, :256]
    bundle = _calibrated_unet(img)
    # Receptive field of the 3-level U-Net: 44 px (one output pixel's gradient reaches 22 px
    # either side); 99.98 % of it lies within 16 px. 128 px tiles overlapping by 0.375 -> 48 px.
    tile, overlap = 128, 0.375
    one = run_to_end(segment_iter(img, bundle, cpu(tile_size=256, return_probability=True)))
    tiled = run_to_end(
        segment_iter(img, bundle, cpu(tile_size=tile, overlap=overlap, return_probability=True))
    )
    assert one.probability.min() < 0.01 and one.probability.max() > 0.99  # a structured map

    err = np.abs(tiled.probability - one.probability)
    assert err.max() < 0.01  # small everywhere ...

    # ... and no worse on the tile borders: a seam is a band of larger error along the lines
    # where a tile starts or ends inside the image (its zero padding replaces real context).
    g = tiling.grid(img.shape, tile, overlap, bundle.model.stride)
    assert one.n_tiles == 1 and tiled.n_tiles == g.n_tiles >= 4 and g.starts_y == g.starts_x
    lines = [*g.starts_y[1:], *(s + g.tile_y for s in g.starts_y[:-1])]
    dist = np.abs(np.arange(img.shape[0])[:, None] - np.array(lines)[None]).min(axis=1)
    near = (dist[:, None] <= 2) | (dist[None, :] <= 2)
    assert 0.02 < near.mean() < 0.5
    assert err[near].max() <= 1.5 * err[~near].max()
    assert err[near].mean() < 1e-3


def test_tiles_are_stride_aligned_and_cover_the_image():
    for size, tile, stride in [(100, 32, 8), (513, 128, 32), (31, 64, 4), (1, 64, 16)]:
        g = tiling.grid((size, size), tile, 0.25, stride)
        assert all(s % stride == 0 for s in g.starts_y)
        assert g.tile_y % stride == 0 and g.starts_y[0] == 0
        assert g.starts_y[-1] + g.tile_y >= size > g.starts_y[-1] + g.tile_y - stride
        gaps = np.diff(g.starts_y)
        assert (gaps > 0).all() and (gaps <= g.tile_y).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (37, 53)])
def test_tiny_and_odd_images_work(shape, small_unet):
    img = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    res = run_to_end(segment_iter(img, small_unet, cpu(tile_size=32, return_probability=True)))
    assert res.labels.shape == shape and res.probability.shape == shape
    assert np.isfinite(res.probability).all()


def test_tta_averages_flipped_predictions(nuclei):
    class Asym(nn.Module):  # a one-sided kernel: flipping the input changes the output
        stride = 1

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[0, 0, 0, 0] = 8.0
                self.conv.bias.fill_(-3.0)

        def forward(self, x):
            return self.conv(x)

    bundle = ModelBundle(Asym(), ModelConfig(arch="unet", in_channels=1))
    img = nuclei[:64, :64]
    plain = run_to_end(segment_iter(img, bundle, cpu(return_probability=True)))
    tta = run_to_end(segment_iter(img, bundle, cpu(return_probability=True, tta=True)))
    x = torch.from_numpy(normalize(img, bundle.normalization, None))[None, None]
    with torch.no_grad():
        manual = (
            sum(
                torch.sigmoid(bundle.model(x.flip(d) if d else x)).flip(d)
                if d
                else torch.sigmoid(bundle.model(x))
                for d in [(), (-1,), (-2,), (-2, -1)]
            )
            / 4
        )
    # Interior only: the tile is mirror-padded to the stride, torch zero-pads inside the conv.
    assert np.abs(tta.probability - manual[0, 0].numpy())[1:-1, 1:-1].max() < 1e-5
    assert np.abs(tta.probability - plain.probability).max() > 0.01


# --------------------------------------------------------------------------------------------
# post-processing options


def test_split_touching_separates_two_disks():
    yy, xx = np.mgrid[:80, :120]
    two = ((yy - 40) ** 2 + (xx - 42) ** 2 < 20**2) | ((yy - 40) ** 2 + (xx - 76) ** 2 < 20**2)
    img = two.astype(np.uint8) * 200
    merged, _ = segment(img, pointwise_bundle(), cpu())
    split, feats = segment(img, pointwise_bundle(), cpu(split_touching=True, split_min_distance=10))
    assert merged.max() == 1 and split.max() == 2
    assert np.array_equal(split > 0, two)
    assert abs(feats["area_px"][0] - feats["area_px"][1]) < 30


def test_min_size_and_fill_holes():
    img = np.zeros((60, 60), np.uint8)
    img[5:8, 5:8] = 200  # 9 px
    yy, xx = np.mgrid[:60, :60]
    r = np.hypot(yy - 35, xx - 35)
    img[(r < 15) & (r > 6)] = 200  # a ring with a hole
    lab, _ = segment(img, pointwise_bundle(), cpu(min_size=10))
    assert lab.max() == 1 and lab[6, 6] == 0 and lab[35, 35] == 0
    lab2, _ = segment(img, pointwise_bundle(), cpu(min_size=5, fill_holes=True))
    assert lab2.max() == 2 and lab2[35, 35] > 0 and lab2[6, 6] > 0
    assert np.array_equal(lab2 == lab2[35, 35], ndi.binary_fill_holes(r < 15) & (r < 15))


def test_threshold_from_model_and_config(nuclei):
    bundle = pointwise_bundle()
    bundle.metadata["threshold"] = 0.9
    high = run_to_end(segment_iter(nuclei, bundle, cpu()))
    low = run_to_end(segment_iter(nuclei, bundle, cpu(threshold=0.1)))
    assert high.threshold == 0.9 and low.threshold == 0.1
    assert (high.labels > 0).sum() < (low.labels > 0).sum()


def test_uncertainty_is_normalised_entropy(nuclei):
    res = run_to_end(
        segment_iter(nuclei, pointwise_bundle(), cpu(uncertainty=True, return_probability=True))
    )
    p = res.probability.astype(np.float64)
    assert res.uncertainty.dtype == np.float32
    assert res.uncertainty.min() >= 0 and res.uncertainty.max() <= 1
    near_half = np.abs(p - 0.5) < 0.01
    assert near_half.any() and (res.uncertainty[near_half] > 0.99).all()
    sure = (p < 1e-4) | (p > 1 - 1e-4)
    assert (res.uncertainty[sure] < 0.01).all()


def test_multiclass_gives_semantic_labels(nuclei):
    bundle = pointwise_bundle(num_classes=3)
    res = run_to_end(
        segment_iter(nuclei, bundle, cpu(tile_size=64, return_probability=True, uncertainty=True))
    )
    norm = normalize(nuclei, bundle.normalization, None).astype(np.float64)
    k = np.arange(3)[:, None, None]
    logits = GAIN * k * norm[None] - GAIN * 0.3 * k * (k + 1) / 2
    expected = logits.argmax(0)
    assert res.semantic and res.threshold is None
    assert res.labels.dtype == np.uint8
    assert (res.labels == expected).mean() > 0.999  # ties at class borders may differ
    soft = np.exp(logits - logits.max(0))
    soft /= soft.sum(0)
    assert np.abs(res.probability - (1 - soft[0])).max() < 1e-4
    f = res.features
    assert f["label"].tolist() == sorted(set(np.unique(res.labels)) - {0})
    assert (f["class"] == f["label"]).all()
    # a stack: still one row per class
    stack = np.stack([nuclei, nuclei])
    res3 = run_to_end(segment_iter(stack, bundle, cpu()))
    assert res3.features["label"].tolist() == f["label"].tolist()
    assert res3.features["area_px"].tolist() == [2 * a for a in f["area_px"]]
    assert np.allclose(res3.features["scale"], f["scale"])


# --------------------------------------------------------------------------------------------
# progress and cancellation


def test_progress_counts_tiles_and_slices(nuclei):
    stack = np.stack([nuclei] * 2)
    gen = segment_iter(stack, pointwise_bundle(), cpu(tile_size=128, overlap=0.25, batch_size=2))
    reports = []
    result = run_to_end(gen, reports.append)
    assert all(isinstance(p, Progress) for p in reports)
    tiles = result.n_tiles // 2
    assert tiles == 3 * 3  # 256 x 320 with 128 px tiles, 32 px overlap
    assert reports[0].total == 2 * (tiles + 1) and reports[0].done == 0
    done = [p.done for p in reports]
    assert done == sorted(done) and reports[-1].done == reports[-1].total
    assert any("slice 2/2: tile" in p.message for p in reports)


def test_auto_tile_size_is_the_models_training_crop(nuclei):
    """``tile_size=None`` tiles with the crop size in the model's history, else 512."""
    bundle = pointwise_bundle()
    assert bundle.trained_tile_size is None and bundle.tile_size == 512
    untiled = segment_iter(nuclei, bundle, cpu(tile_size=None, overlap=0.0))
    assert run_to_end(untiled).n_tiles == 1  # 256 x 320 fits one 512 tile
    bundle.metadata["history"] = [{"config": {"crop_size": 96}}, {"config": {"crop_size": 32}}]
    assert bundle.tile_size == 96  # the first (from-scratch) run decides, not a later fine-tune
    tiled = run_to_end(segment_iter(nuclei, bundle, cpu(tile_size=None, overlap=0.0)))
    assert tiled.n_tiles == 3 * 4  # 96 px tiles over 256 x 320 (balanced to 3 x 4)
    bundle.metadata["tile_size"] = 128
    assert bundle.tile_size == 128


@pytest.mark.parametrize("z_context", [0, 1])
@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_closing_the_generator_cancels_cleanly(nuclei, stop_after, z_context):
    bundle = pointwise_bundle()
    bundle.model.train()
    bundle.model.conv.eval()  # mixed modes must come back exactly
    weights = bundle.model.conv.weight.detach().clone()
    gen = segment_iter(
        np.stack([nuclei] * 2), bundle, cpu(tile_size=64, batch_size=2, z_context=z_context)
    )
    for _ in range(stop_after + 1):
        next(gen)
    gen.close()  # no exception, nothing returned
    with pytest.raises(StopIteration):
        next(gen)
    assert bundle.model.training and not bundle.model.conv.training
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert torch.equal(bundle.model.conv.weight, weights)
    calls = len(bundle.model.calls)
    assert calls == stop_after  # work stopped at the yield


def test_model_mode_restored_after_a_full_run(nuclei):
    bundle = pointwise_bundle()
    bundle.model.train()
    segment(nuclei, bundle, cpu())
    assert bundle.model.training


# --------------------------------------------------------------------------------------------
# out-of-memory fallback


class OOMAbove(Pointwise):
    """Raises CUDA's out-of-memory error for batches larger than ``limit`` pixels."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2] * x.shape[3] > self.limit:
            self.calls.append(("oom", *x.shape))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def test_oom_retries_with_one_tile_then_smaller_tiles(nuclei):
    reference = run_to_end(segment_iter(nuclei, pointwise_bundle(), cpu(return_probability=True)))
    net = OOMAbove(limit=64 * 64)
    bundle = ModelBundle(net, ModelConfig(arch="unet", in_channels=1))
    reports: list[Progress] = []
    res = run_to_end(
        segment_iter(nuclei, bundle, cpu(tile_size=128, batch_size=4, return_probability=True)),
        reports.append,
    )
    assert any("1 tile per batch" in m for m in res.messages)
    assert any("128 px tiles; retrying with 64 px" in m for m in res.messages)
    assert np.abs(res.probability - reference.probability).max() < 1e-5
    assert reports[-1].done == reports[-1].total  # totals were updated to the new tiling


def test_oom_on_gpu_falls_back_to_cpu(nuclei, monkeypatch):
    """Simulated GPU: the engine thinks it runs on cuda:0; every 'GPU' forward pass runs out."""
    from napari_s2mnet import devices

    state = {"on": "cpu"}

    def fake_resolve(device="auto"):
        return torch.device("cuda", 0) if device in ("auto", "cuda") else torch.device(device)

    def fake_to(obj, device):
        state["on"] = str(device)
        return obj.to("cpu")

    class GPUOnlyOOM(Pointwise):
        def forward(self, x):
            if state["on"] != "cpu":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
            return super().forward(x)

    monkeypatch.setattr(devices, "resolve_device", fake_resolve)
    monkeypatch.setattr(
        devices,
        "describe_device",
        lambda d: "CUDA: Fake GPU (1 GB)" if d.type == "cuda" else "CPU (test)",
    )
    monkeypatch.setattr(engine, "_to_device", fake_to)
    bundle = ModelBundle(GPUOnlyOOM(), ModelConfig(arch="unet", in_channels=1))
    res = run_to_end(segment_iter(nuclei, bundle, InferenceConfig(tile_size=256, amp=False)))
    assert any("continuing on the CPU" in m for m in res.messages)
    assert res.device == "CPU (test)"
    assert same_partition(res.labels, expected_instances(nuclei))
    assert next(bundle.model.parameters()).device.type == "cpu"


def test_other_runtime_errors_are_not_swallowed(nuclei):
    class Broken(Pointwise):
        def forward(self, x):
            raise RuntimeError("some bug")

    bundle = ModelBundle(Broken(), ModelConfig(arch="unet", in_channels=1))
    with pytest.raises(RuntimeError, match="some bug"):
        segment(nuclei, bundle, cpu())


def test_wrong_output_shape_is_reported(nuclei):
    bundle = pointwise_bundle(num_classes=2)
    bundle.config = ModelConfig(arch="unet", in_channels=1, num_classes=1)
    with pytest.raises(RuntimeError, match=r"returned shape \(\d+, 2,"):
        segment(nuclei, bundle, cpu())


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("image", "exc", "match"),
    [
        (np.zeros((0, 10)), ValueError, "empty"),
        (np.zeros(10), ValueError, "at least 2 dimensions"),
        (np.zeros((2, 2, 2, 8, 8)), ValueError, "5-D image data"),
        (np.zeros((8, 8), dtype=complex), TypeError, "dtype complex128"),
        (np.array([["a", "b"]]), TypeError, "dtype"),
        (None, TypeError, "None"),
    ],
)
def test_bad_images(image, exc, match):
    with pytest.raises(exc, match=match):
        segment(image, pointwise_bundle(), cpu())


def test_nan_and_inf_are_refused_with_a_fix(nuclei):
    img = nuclei.astype(np.float32)
    img[3, 4] = np.nan
    img[5, 6] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN/Inf value\(s\).*nan_to_num"):
        segment(img, pointwise_bundle(), cpu())


def test_bad_layout_and_model_arguments(nuclei):
    with pytest.raises(ValueError, match="channel_axis=5"):
        segment(nuclei, pointwise_bundle(), cpu(), layout=ImageLayout(channel_axis=5))
    with pytest.raises(ValueError, match="RGB"):
        segment(nuclei, pointwise_bundle(), cpu(), layout=ImageLayout(rgb=True))
    with pytest.raises(TypeError, match="ModelBundle"):
        segment(nuclei, Pointwise(), cpu())
    with pytest.raises(TypeError, match="unknown option"):
        segment(nuclei, pointwise_bundle(), tile_sise=64)
    with pytest.raises(ValueError, match=r"Unknown device|not available"):
        segment(nuclei, pointwise_bundle(), device="tpu")


def test_missing_default_model_is_a_clear_error(nuclei, monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="default model"):
        segment(nuclei)


def test_segment_accepts_config_overrides(nuclei):
    bundle = pointwise_bundle()
    labels, features = segment(
        nuclei, bundle, device="cpu", tile_size=64, overlap=0.25, min_size=50
    )
    ref = expected_instances(nuclei, min_size=50)
    assert same_partition(labels, ref) and len(features) == ref.max()
    assert all(c[2] == 64 for c in bundle.model.calls)


def test_memory_stays_near_two_float_maps():
    """Traced numpy memory of a 2048^2 run (input excluded) stays near two full-size maps.

    Expected: the float32 probability accumulator, the int32 connected components, a bool mask
    and the uint8 result (2.5 maps), plus a fixed overhead for a batch of tiles and the
    normalisation sample that does not grow with the image. No float copy of the image.
    """
    import tracemalloc

    side = 2048
    img = np.zeros((side, side), dtype=np.uint16)
    img[::64, :] = 1000  # thin lines: a few objects
    bundle = pointwise_bundle()
    cfg = cpu(tile_size=512, compute_features=False)
    tracemalloc.start()
    tracemalloc.reset_peak()
    labels, _ = segment(img, bundle, cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    float_map = side * side * 4
    assert labels.max() == side // 64
    fixed = 32 * 2**20
    assert peak < 2.5 * float_map + fixed, f"peak {peak / float_map:.2f} float32 maps"


def test_post_processing_frees_the_distance_map_before_renumbering(monkeypatch):
    """SliceResults.add pops the blended maps it is done with: the distance map is gone by the
    time the labels are renumbered (the post-processing peak; 256 MiB at 8192^2, issue 18)."""
    import weakref

    from napari_s2mnet.inference import postprocess as pp
    from napari_s2mnet.instances import instance_targets
    from napari_s2mnet.layout import plan_image, resolve_layout

    yy, xx = np.mgrid[:64, :96]
    lab = np.zeros((64, 96), dtype=np.int32)
    for i, (cy, cx) in enumerate(((32, 30), (32, 52)), start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 144] = i  # two touching disks
    fg = (lab > 0).astype(np.float32)
    distance = instance_targets(lab)[1]
    alive = weakref.ref(distance)
    maps = [fg, distance]
    del distance
    seen = []
    drop_small = pp._drop_small

    def spy(*args, **kwargs):
        seen.append(alive() is None)
        return drop_small(*args, **kwargs)

    monkeypatch.setattr(pp, "_drop_small", spy)
    plan = plan_image(fg, resolve_layout(fg, None), 1, [])
    out = pp.SliceResults(plan, InferenceConfig(min_size=0), True, 0.5, (1.0, 1.0), {})
    out.timings.update(postprocess=0.0, features=0.0)
    out.add((), maps)
    assert seen == [True] and maps == []
    assert out.total_objects == 2  # the distance map did split the touching disks
