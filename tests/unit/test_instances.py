"""Instances: seeded watershed separates touching objects, 3-D labelling, IoU stitching, targets."""

from __future__ import annotations

import numpy as np
import pytest

from napari_s2mnet.instances import (
    distance_watershed,
    instance_targets,
    interior_map,
    match_scores,
    per_volume,
    seeded_watershed,
    stitch_planes,
)


def _disks(shape=(64, 96), centres=((32, 30), (32, 52)), r=12.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, dtype=np.int32)
    for i, (cy, cx) in enumerate(centres):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = i + 1  # later disks overwrite: they touch
    return lab


def _ball(shape=(21, 48, 48), centre=(10, 24, 24), r=9.0, spacing=(1.0, 1.0, 1.0)):
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((zz, yy, xx), centre, spacing, strict=True))
    return d2 <= r**2


def test_touching_disks_are_one_component_but_targets_separate_them() -> None:
    from scipy import ndimage as ndi

    lab = _disks()
    assert ndi.label(lab > 0)[1] == 1  # they touch: thresholding alone merges them
    boundary, distance = instance_targets(lab)
    assert boundary.dtype == np.float32 and distance.dtype == np.float32
    # the contact line is boundary in both objects, centres are distance 1, background 0
    x = int(np.flatnonzero(np.diff(lab[32]) == 1)[1])  # last pixel of disk 1 on row 32
    assert lab[32, x] == 1 and lab[32, x + 1] == 2
    assert boundary[32, x] == 1 and boundary[32, x + 1] == 1
    assert distance[32, 30] > 0.85 and distance[32, 52] == pytest.approx(1.0)
    assert distance[0, 0] == 0 and boundary[0, 0] == 0
    assert distance[32, x] < 0.2 and distance[32, x + 1] < 0.2


def test_targets_do_not_mark_the_image_border() -> None:
    lab = np.zeros((20, 20), dtype=np.int32)
    lab[:, :8] = 1  # an object cut by the crop's left, top and bottom edges
    boundary, distance = instance_targets(lab)
    assert boundary[:, 7].all() and not boundary[:, :7].any()
    assert distance[10, 0] == pytest.approx(1.0)  # farthest from its only true edge


def test_seeded_watershed_separates_touching_disks_from_targets() -> None:
    lab = _disks()
    fg = (lab > 0).astype(np.float32)
    boundary, distance = instance_targets(lab)
    for mode in ("distance", "contour"):
        inner = interior_map(fg, boundary=boundary, distance=distance, mode=mode)
        out, n = seeded_watershed(fg, inner)
        assert n == 2, mode
        scores = match_scores(out, lab)
        assert scores["f1@0.5"] == 1.0 and scores["ap"][0.9] == 1.0, mode


def test_seeded_watershed_keeps_unseeded_objects() -> None:
    fg = np.zeros((30, 30), dtype=np.float32)
    fg[5:10, 5:10] = 1  # foreground with no interior seed
    out, n = seeded_watershed(fg, np.zeros_like(fg))
    assert n == 1 and (out[5:10, 5:10] == 1).all()


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("ndim", [2, 3])
def test_per_component_watershed_is_the_whole_image_watershed(ndim: int) -> None:
    """The memory-lean per-component flood gives exactly the whole-image partition: touching
    objects, seedless components (joined diagonally), seeds below min_seed_size, noise."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    shape = (96, 128) if ndim == 2 else (12, 48, 64)
    fg = ndi.gaussian_filter(rng.random(shape), 2.0)
    fg = (fg - fg.min()) / (fg.max() - fg.min())
    inner = ndi.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)
    inner = (inner - inner.min()) / (inner.max() - inner.min())
    fg[(slice(None),) * (ndim - 1) + (slice(0, 4),)] = 0.9  # a seedless strip
    inner[(slice(None),) * (ndim - 1) + (slice(0, 4),)] = 0.0
    if ndim == 2:  # diagonal-only contacts: two seedless squares, a seeded one with a tail
        fg[-12:, -40:] = inner[-12:, -40:] = 0.0
        fg[-12:-9, -40:-37] = fg[-9:-6, -37:-34] = 0.9  # seedless, touching at a corner
        fg[-12:-6, -20:-14] = 0.9
        inner[-11:-7, -19:-15] = 0.9  # seeded square
        fg[-6:-4, -14:-12] = 0.9  # its tail, joined at a corner only
    for seed_threshold in (0.5, 0.6):
        whole, n_whole = seeded_watershed(
            fg, inner, threshold=0.45, seed_threshold=seed_threshold, per_object=False
        )
        parts, n_parts = seeded_watershed(
            fg, inner, threshold=0.45, seed_threshold=seed_threshold, per_object=True
        )
        assert n_whole == n_parts > 3
        assert whole.max() == n_whole and parts.max() == n_parts
        assert _same_partition(whole, parts)
        # the watershed itself ran: some face-connected component holds several objects
        comp, n_comp = ndi.label(fg > 0.45)
        assert any(len(np.unique(whole[comp == i])) > 1 for i in range(1, n_comp + 1))


def test_distance_watershed_splits_touching_disks() -> None:
    lab = _disks()
    out, n = distance_watershed(lab > 0, min_distance=5)
    assert n == 2
    assert match_scores(out, lab)["f1@0.5"] == 1.0


def test_3d_ball_is_one_object_across_planes() -> None:
    spacing = (2.0, 1.0, 1.0)  # anisotropic: z planes twice as far apart
    ball = _ball(spacing=spacing)
    assert ball.any(axis=(1, 2)).sum() >= 9  # spans many planes
    fg = ball.astype(np.float32)
    from scipy import ndimage as ndi

    edt = ndi.distance_transform_edt(ball, sampling=spacing)
    out, n = seeded_watershed(fg, (edt / edt.max()).astype(np.float32), spacing=spacing)
    assert n == 1 and (out[ball] == 1).all()
    out, n = distance_watershed(ball, spacing=spacing, min_distance=5)
    assert n == 1
    # per-plane labels (each plane numbered from 1) stitched into one object
    planes = np.stack([ndi.label(p)[0] for p in ball])
    stitched = stitch_planes(planes)
    assert np.unique(stitched[ball]).tolist() == [1] and stitched.max() == 1


def test_two_touching_balls_in_3d() -> None:
    spacing = (2.0, 1.0, 1.0)
    a = _ball(shape=(21, 48, 64), centre=(10, 24, 22), r=9.0, spacing=spacing)
    b = _ball(shape=(21, 48, 64), centre=(10, 24, 39), r=9.0, spacing=spacing)
    gt = np.where(b, 2, np.where(a, 1, 0)).astype(np.int32)
    from scipy import ndimage as ndi

    assert ndi.label(gt > 0)[1] == 1
    out, n = distance_watershed(gt > 0, spacing=spacing, min_distance=5)
    assert n == 2 and match_scores(out, gt)["f1@0.5"] == 1.0


def test_stitching_starts_new_objects_and_respects_threshold() -> None:
    planes = np.zeros((3, 10, 10), dtype=np.int32)
    planes[0, 2:6, 2:6] = 1
    planes[1, 2:6, 2:6] = 5  # same object, other id in this plane
    planes[1, 7:9, 7:9] = 1  # new object (no overlap below)
    planes[2, 5:6, 5:6] = 3  # overlaps object 1 with IoU 1/16 < 0.25: new object
    out = stitch_planes(planes)
    assert out[0, 3, 3] == out[1, 3, 3] == 1
    assert out[1, 8, 8] == 2 and out[2, 5, 5] == 3
    with pytest.raises(ValueError, match="IoU"):
        stitch_planes(planes, threshold=0)


def test_per_volume_never_links_time_points() -> None:
    ball = _ball(shape=(9, 20, 20), centre=(4, 10, 10), r=4)
    series = np.stack([ball, ball])  # (T, Z, Y, X): the same object at two time points
    out = per_volume(
        lambda v: seeded_watershed(v.astype(np.float32), v.astype(np.float32))[0], series
    )
    assert set(np.unique(out[0])) == {0, 1} and set(np.unique(out[1])) == {0, 2}


def test_match_scores() -> None:
    gt = _disks()
    s = match_scores(gt, gt)
    assert s["f1@0.5"] == 1.0 and s["mAP"] == 1.0 and s["n_gt"] == 2
    merged = (gt > 0).astype(np.int32)
    s = match_scores(merged, gt)  # one merged object: at most one match
    assert s["n_pred"] == 1 and s["f1@0.5"] <= 2 / 3
    assert match_scores(np.zeros_like(gt), gt)["f1@0.5"] == 0.0


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        seeded_watershed(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(TypeError, match="integer"):
        instance_targets(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="spacing"):
        distance_watershed(np.ones((4, 4)), spacing=(1.0,))


# --------------------------------------------------------------------------------------------
# The inference engine with an instance head (an exact stand-in network) and old model files


class _DistanceOracle:
    """Stand-in for a trained instance-head network whose input IS the normalised distance map.

    foreground = input > 0.05, boundary = never, distance = the input: what a perfect network
    predicts for an image that shows each object's distance map.
    """

    @staticmethod
    def build():
        import torch
        from torch import nn

        from napari_s2mnet.checkpoint import ModelBundle
        from napari_s2mnet.model import ModelConfig
        from napari_s2mnet.preprocess import NormalizationConfig

        class Oracle(nn.Module):
            stride = 4

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                p = x.clamp(1e-4, 1 - 1e-4)
                return torch.cat(
                    [40 * (x - 0.05), torch.full_like(x, -10.0), torch.log(p / (1 - p))], dim=1
                )

        cfg = ModelConfig(arch="unet", in_channels=1, num_classes=1, instance_head=True)
        return ModelBundle(Oracle(), cfg, NormalizationConfig(method="none"))


def _distance_image(gt: np.ndarray, spacing=None) -> np.ndarray:
    from scipy import ndimage as ndi

    out = np.zeros(gt.shape, dtype=np.float32)
    for i in range(1, int(gt.max()) + 1):
        d = ndi.distance_transform_edt(gt == i, sampling=spacing)
        out[gt == i] = (d / d.max())[gt == i]
    return out


def test_segment_with_instance_head_separates_touching_disks() -> None:
    from napari_s2mnet.inference import InferenceConfig, segment

    gt = _disks()
    bundle = _DistanceOracle.build()
    lab, feats = segment(_distance_image(gt), bundle, InferenceConfig(device="cpu"))
    assert lab.max() == 2 and len(feats) == 2  # defaults: no option needed
    assert match_scores(lab.astype(np.int32), gt)["f1@0.5"] == 1.0


@pytest.mark.parametrize("mode", ["stitch", "watershed"])
def test_segment_labels_a_stack_in_3d(mode: str) -> None:
    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.morphology3d import COLUMNS_3D

    spacing = (2.0, 1.0, 1.0)
    a = _ball(shape=(15, 40, 64), centre=(7, 20, 20), r=9.0, spacing=spacing)
    b = _ball(shape=(15, 40, 64), centre=(7, 20, 37), r=9.0, spacing=spacing)
    gt = np.where(b, 2, np.where(a, 1, 0)).astype(np.int32)  # two touching balls
    img = _distance_image(gt, spacing)
    lab, feats = segment(
        img,
        _DistanceOracle.build(),
        InferenceConfig(device="cpu", labels_3d=mode, min_size=0),
        spacing=spacing,
    )
    assert lab.max() == 2 and match_scores(lab.astype(np.int32), gt)["f1@0.5"] == 1.0
    assert set(np.unique(lab[3:12, 20, 20])) == {1} or set(np.unique(lab[3:12, 20, 20])) == {2}
    assert len(feats) == 2 and feats.attrs["columns_3d"] == COLUMNS_3D
    assert feats["z_planes"].min() >= 7
    assert feats["volume"].to_numpy() == pytest.approx(feats["volume_vox"].to_numpy() * 2.0)
    # the plane-by-plane behaviour of old is one option away
    flat, _ = segment(
        img,
        _DistanceOracle.build(),
        InferenceConfig(device="cpu", labels_3d="off", min_size=0),
        spacing=spacing,
    )
    assert flat.max() > 10


def test_time_points_are_never_linked() -> None:
    from napari_s2mnet.inference import InferenceConfig, segment
    from napari_s2mnet.layout import ImageLayout

    gt = _ball(shape=(9, 24, 24), centre=(4, 12, 12), r=5.0).astype(np.int32)
    series = np.stack([_distance_image(gt)] * 3)  # (T, Z, Y, X): one object, three times
    lab, feats = segment(
        series,
        _DistanceOracle.build(),
        InferenceConfig(device="cpu"),
        layout=ImageLayout(axis_names=("t", "z")),
    )
    assert [set(np.unique(lab[t])) - {0} for t in range(3)] == [{1}, {2}, {3}]
    assert feats["t"].tolist() == [0, 1, 2]


def test_old_binary_model_file_loads_and_works_as_before() -> None:
    """A model file written before the instance head (tests/data, saved by that code)."""
    from pathlib import Path

    import torch

    from napari_s2mnet.checkpoint import load_model
    from napari_s2mnet.inference import InferenceConfig, segment

    data = Path(__file__).resolve().parents[1] / "data"
    bundle = load_model(data / "old_binary_s2mnet_tiny.safetensors")
    assert not bundle.config.instance_head and bundle.config.out_channels == 1
    x = np.random.default_rng(0).random((1, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        y = bundle.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, np.load(data / "old_binary_s2mnet_tiny_logits.npy"), atol=1e-5)
    lab, _ = segment(x[0, 0], bundle, InferenceConfig(device="cpu", min_size=0))
    assert lab.shape == (32, 32)


def test_float16_interior_gives_the_float32_partition() -> None:
    """segment() keeps the distance map as float16 (half its memory at 8192^2): on maps that
    carry real detail the partition is the float32 one, and no float32 copy is made."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    lab = _disks(shape=(96, 160), centres=((30, 30), (30, 52), (66, 100), (66, 121), (48, 140)))
    fg = ndi.gaussian_filter((lab > 0).astype(np.float32), 1.0) + 0.02 * rng.random(lab.shape)
    _, distance = instance_targets(lab)
    distance = ndi.gaussian_filter(distance, 1.0) + 0.01 * rng.random(lab.shape).astype(np.float32)
    half = distance.astype(np.float16)
    assert interior_map(fg, distance=half).dtype == np.float16  # kept, not copied to float32
    full, n_full = seeded_watershed(fg, distance)
    part, n_half = seeded_watershed(fg, half)
    assert n_full == n_half == 5
    assert (full != part).mean() < 1e-3
    assert match_scores(part, lab)["f1@0.5"] == 1.0
