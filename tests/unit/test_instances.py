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
    out = per_volume(lambda v: seeded_watershed(v.astype(np.float32),
                                                v.astype(np.float32))[0], series)
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
