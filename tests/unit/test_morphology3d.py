"""3-D morphology on known shapes: ball, rod, cube, L-shape; anisotropic spacing; the table."""

from __future__ import annotations

import numpy as np
import pytest

from napari_s2mnet.morphology3d import (
    COLUMNS_3D,
    FEATURE_COLUMNS_3D,
    irregularity_3d,
    object_descriptors_3d,
    object_features_3d,
    sphericity,
    tubularity_3d,
)


def _ball(r: float, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    n = [int(np.ceil(r / s)) * 2 + 3 for s in spacing]
    g = np.mgrid[: n[0], : n[1], : n[2]]
    return sum(((g[i] - n[i] // 2) * spacing[i]) ** 2 for i in range(3)) <= r * r


def _rod() -> np.ndarray:
    rod = np.zeros((10, 10, 70), dtype=bool)
    rod[2:7, 2:7, 3:67] = True  # 5 x 5 x 64
    return rod


@pytest.mark.parametrize("r", [4, 10])
def test_ball_is_spherical_and_not_tubular(r: int) -> None:
    b = _ball(r)
    assert sphericity(b) == pytest.approx(1.0, abs=0.05)
    assert tubularity_3d(b) < 0.25
    assert irregularity_3d(b) < 0.02


def test_anisotropic_ball_uses_the_spacing() -> None:
    sp = (2.0, 1.0, 1.0)
    b = _ball(10, sp)  # a physical ball sampled every 2 units in z
    d = object_descriptors_3d(b, sp)
    assert d["volume"] == pytest.approx(4 / 3 * np.pi * 10**3, rel=0.05)
    assert d["sphericity"] > 0.9
    # read with the wrong (isotropic) spacing it is a squashed ellipsoid
    assert object_descriptors_3d(b)["sphericity"] < d["sphericity"] - 0.05


def test_rod_is_tubular() -> None:
    rod = _rod()
    assert tubularity_3d(rod) > 0.9
    assert sphericity(rod) == pytest.approx(0.50, abs=0.07)  # exact prism value 0.497
    assert tubularity_3d(rod) > tubularity_3d(_ball(10)) + 0.6


def test_irregularity_grows_with_concavity() -> None:
    cube = np.zeros((20, 20, 20), dtype=bool)
    cube[2:18, 2:18, 2:18] = True
    ell = cube.copy()
    ell[2:18, 8:18, 8:18] = False  # an L-shaped prism: hull covers the removed block
    assert irregularity_3d(cube) == pytest.approx(0.0, abs=0.01)
    # hull = cube minus half the removed block: 1 - 2496 / 3296 = 0.243
    assert irregularity_3d(ell) == pytest.approx(0.243, abs=0.02)


def test_features_table_says_which_columns_are_3d() -> None:
    lab = np.zeros((24, 30, 80), dtype=np.uint16)
    b = _ball(8)
    lab[2 : 2 + b.shape[0], 2 : 2 + b.shape[1], 2 : 2 + b.shape[2]][b] = 3
    lab[5:15, 5:15, 5:75][:, :, :][_rod()[:, :, :70]] = 7
    df = object_features_3d(lab, spacing=(2.0, 0.5, 0.5))
    assert list(df.columns) == list(FEATURE_COLUMNS_3D)
    assert df.attrs["columns_3d"] == COLUMNS_3D
    assert df["label"].tolist() == [3, 7]
    ball_row = df.iloc[0]
    assert ball_row["volume"] == pytest.approx(ball_row["volume_vox"] * 0.5, rel=1e-9)
    assert ball_row["z_planes"] == int(b.any(axis=(1, 2)).sum())
    assert df.iloc[1]["tubularity_3d"] > ball_row["tubularity_3d"]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="3-D"):
        sphericity(np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="spacing"):
        object_descriptors_3d(_ball(3), spacing=(1.0, 0.0, 1.0))
    assert object_descriptors_3d(np.zeros((3, 3, 3), dtype=bool))["volume"] == 0.0


def test_update_features_3d_recomputes_only_touched_rows() -> None:
    from napari_s2mnet.morphology3d import update_features_3d

    lab = np.zeros((12, 30, 30), dtype=np.uint16)
    b = _ball(4)
    lab[1 : 1 + b.shape[0], 1 : 1 + b.shape[1], 1 : 1 + b.shape[2]][b] = 1
    lab[1 : 1 + b.shape[0], 15 : 15 + b.shape[1], 15 : 15 + b.shape[2]][b] = 2
    df = object_features_3d(lab, spacing=(2.0, 1.0, 1.0))
    edited = lab.copy()
    edited[5, 20:25, 1:6] = 3  # a new object painted on one plane
    edited[edited == 2] = 0  # object 2 erased
    out = update_features_3d(df, edited, {2, 3}, spacing=(2.0, 1.0, 1.0))
    assert out["label"].tolist() == [1, 3]
    assert out.iloc[0].equals(df.iloc[0])
    assert out.iloc[1]["volume_vox"] == 25 and out.iloc[1]["z_planes"] == 1
    with pytest.raises(ValueError, match="lead name"):
        update_features_3d(df, edited[None], {1})


def test_hull_voxel_count_is_scikit_images():
    """The line-by-line hull count equals convex_hull_image's on random blobs, boxes, an
    L-prism and a tilted slab (voxels exactly on facets count as inside in both)."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    from napari_s2mnet.morphology3d import _hull_voxels

    rng = np.random.default_rng(1)
    shapes = []
    for _ in range(40):
        shp = tuple(int(v) for v in rng.integers(4, 24, 3))
        blob = ndi.gaussian_filter(rng.random(shp), rng.uniform(0.8, 3)) > rng.uniform(0.45, 0.55)
        lab, k = ndi.label(blob)
        if k:
            big = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
            shapes.append(big[ndi.find_objects(big.astype(np.int32))[0]])
    shapes.append(np.ones((5, 7, 9), dtype=bool))
    prism = np.zeros((6, 10, 10), dtype=bool)
    prism[:, :3, :] = prism[:, :, :3] = True
    shapes.append(prism)
    zz, yy, xx = np.mgrid[:20, :20, :20]
    slab = (np.abs(zz + yy - xx - 5) < 3) & (zz < 15)
    shapes.append(slab[ndi.find_objects(slab.astype(np.int32))[0]])
    checked = 0
    for m in shapes:
        coords = np.argwhere(m)
        if len(coords) <= 3 or np.linalg.matrix_rank(coords - coords[0]) < 3:
            continue
        expected = np.count_nonzero(convex_hull_image(m, offset_coordinates=False))
        assert _hull_voxels(m) == expected
        checked += 1
    assert checked >= 30
