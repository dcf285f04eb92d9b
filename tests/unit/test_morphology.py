"""Morphology descriptors: values on known shapes, scale invariance, regionprops agreement,
ranges, empty inputs and incremental feature-table updates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage import draw, measure

from napari_s2mnet import morphology as M

# ---------------------------------------------------------------------------------------------
# Synthetic shapes, rasterised at the requested size (scaling re-draws the shape, it does not
# repeat pixels, so a scaled disk is still a digital disk).
# ---------------------------------------------------------------------------------------------


def disk(r: float) -> np.ndarray:
    n = int(2 * r) + 9
    m = np.zeros((n, n), bool)
    rr, cc = draw.disk((n // 2, n // 2), r, shape=m.shape)
    m[rr, cc] = True
    return m


def ellipse(a: float, b: float, rotation: float = 0.0) -> np.ndarray:
    n = int(2 * a) + 9
    m = np.zeros((n, n), bool)
    rr, cc = draw.ellipse(n // 2, n // 2, b, a, shape=m.shape, rotation=rotation)
    m[rr, cc] = True
    return m


def square(s: int) -> np.ndarray:
    m = np.zeros((s + 8, s + 8), bool)
    m[4 : 4 + s, 4 : 4 + s] = True
    return m


def hline(width: int, length: int) -> np.ndarray:
    m = np.zeros((width + 8, length + 8), bool)
    m[4 : 4 + width, 4 : 4 + length] = True
    return m


def star(r: float, points: int = 5, inner: float = 0.4) -> np.ndarray:
    n = int(2 * r) + 9
    ang = np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    rr, cc = draw.polygon(n / 2 + rad * np.sin(ang), n / 2 + rad * np.cos(ang), (n, n))
    m = np.zeros((n, n), bool)
    m[rr, cc] = True
    return m


def random_blobs(rng: np.random.Generator, shape=(96, 96), n=12) -> np.ndarray:
    noise = ndi.gaussian_filter(rng.random(shape), sigma=rng.uniform(1.5, 4))
    return noise > np.quantile(noise, rng.uniform(0.5, 0.9))


# ---------------------------------------------------------------------------------------------
# Known shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [10, 20, 40, 80])
def test_disk_is_compact_convex_and_not_tubular(r: int) -> None:
    d = M.object_descriptors(disk(r))
    assert d["compactness"] >= 0.9
    assert d["tubularity"] <= 0.2
    assert d["irregularity"] <= 0.05


@pytest.mark.parametrize("length", [60, 100, 200])
def test_thin_line_is_tubular_and_not_compact(length: int) -> None:
    d = M.object_descriptors(hline(3, length))
    assert d["tubularity"] >= 0.8
    assert d["compactness"] < 0.3
    assert d["irregularity"] == pytest.approx(0.0, abs=1e-9)


def test_diagonal_line_is_tubular() -> None:
    m = np.zeros((80, 80), bool)
    for k in range(-1, 2):  # a 3-px-thick anti-aliasing-free diagonal band
        m |= np.eye(80, k=k, dtype=bool)
    assert M.object_descriptors(m)["tubularity"] >= 0.8


def test_tubularity_orders_shapes_by_elongation() -> None:
    t_disk = M.tubularity(disk(40))
    t_square = M.tubularity(square(60))
    t_e2 = M.tubularity(ellipse(60, 30))
    t_e4 = M.tubularity(ellipse(60, 15))
    t_line = M.tubularity(hline(3, 150))
    assert t_disk < t_square < t_e2 < t_e4 < t_line
    # Ellipse with semi-axes a >= b: 1 - b/a; square: 1 - pi/4.
    assert t_e2 == pytest.approx(0.5, abs=0.04)
    assert t_e4 == pytest.approx(0.75, abs=0.04)
    assert t_square == pytest.approx(1 - np.pi / 4, abs=0.02)


def test_tubularity_of_even_and_odd_widths_is_unbiased() -> None:
    # A bar of width w, length L: 1 - pi (w/2)^2 / (w L) exactly on the half-pixel lattice.
    for w in (2, 3, 4, 7):
        expected = 1 - np.pi * (w / 2) ** 2 / (w * 120)
        assert M.tubularity(hline(w, 120)) == pytest.approx(expected, abs=1e-9)


def test_rings_and_trees_are_tubular() -> None:
    yy, xx = np.mgrid[:90, :90] - 45
    ring = (np.hypot(yy, xx) <= 40) & (np.hypot(yy, xx) > 36)
    assert M.tubularity(ring) > 0.9
    tree = np.zeros((120, 120), bool)
    tree[60, 10:110] = True
    tree[10:110, 60] = True
    tree[20:60, 30] = True
    tree = ndi.binary_dilation(tree)
    assert M.tubularity(tree) > 0.9


def test_compactness_orders_disk_square_ellipse_line() -> None:
    c = [M.compactness(x) for x in (disk(40), square(60), ellipse(60, 30), hline(3, 100))]
    assert c == sorted(c, reverse=True)
    assert c[1] == pytest.approx(0.89, abs=0.04)  # Crofton (4 dirs) on an axis-aligned square


def test_star_is_more_irregular_than_disk() -> None:
    for r in (20, 40, 80):
        i_star = M.irregularity(star(r))
        i_disk = M.irregularity(disk(r))
        assert i_star > 0.35
        assert i_star > i_disk + 0.3
        assert M.object_descriptors(star(r))["compactness"] < 0.5


def test_square_and_ellipse_are_convex() -> None:
    assert M.irregularity(square(30)) == pytest.approx(0.0, abs=1e-9)
    assert M.irregularity(ellipse(60, 15, rotation=0.5)) < 0.05


# ---------------------------------------------------------------------------------------------
# Scale invariance (shape re-drawn at x2 and x4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda s: disk(12 * s),
        lambda s: square(15 * s),
        lambda s: ellipse(20 * s, 10 * s, rotation=0.3),
        lambda s: ellipse(24 * s, 6 * s),
        lambda s: star(20 * s),
        lambda s: hline(3 * s, 40 * s),
    ],
    ids=["disk", "square", "ellipse2", "ellipse4", "star", "bar"],
)
def test_descriptors_are_scale_invariant(make) -> None:
    base = M.object_descriptors(make(1))
    for s in (2, 4):
        d = M.object_descriptors(make(s))
        for key in ("compactness", "tubularity", "irregularity"):
            assert d[key] == pytest.approx(base[key], abs=0.07), (key, s, base[key], d[key])


def test_tubularity_exactly_invariant_to_pixel_replication() -> None:
    m = ellipse(20, 7, rotation=0.4)
    t1 = M.tubularity(m)
    for f in (2, 3):
        assert M.tubularity(np.kron(m, np.ones((f, f), bool))) == pytest.approx(t1, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Agreement with scikit-image regionprops
# ---------------------------------------------------------------------------------------------


def test_agreement_with_regionprops() -> None:
    rng = np.random.default_rng(3)
    labels = measure.label(random_blobs(rng, (128, 128)))
    df = M.object_features(labels)
    props = {p.label: p for p in measure.regionprops(labels)}
    assert len(df) == len(props) > 3
    for row in df.itertuples(index=False):
        p = props[row.label]
        assert row.area_px == p.area
        assert row.irregularity == pytest.approx(1 - p.solidity, abs=1e-9)
        expected_c = min(1.0, 4 * np.pi * p.area / p.perimeter_crofton**2)
        assert row.compactness == pytest.approx(expected_c, abs=1e-9)
        # The inscribed radius to the pixel-square boundary lies between the pixel-centre EDT
        # maximum minus half a pixel diagonal (nearest background corner) and that maximum.
        dt_max = ndi.distance_transform_edt(np.pad(p.image, 1)).max()
        lo = np.clip(1 - np.pi * dt_max**2 / p.area, 0, 1)
        hi = np.clip(1 - np.pi * (dt_max - np.sqrt(0.5)) ** 2 / p.area, 0, 1)
        assert lo - 1e-9 <= row.tubularity <= hi + 1e-9


# ---------------------------------------------------------------------------------------------
# Ranges, whole masks, batches, empty input
# ---------------------------------------------------------------------------------------------


def test_ranges_on_random_blobs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(6):
        m = random_blobs(rng)
        d = M.mask_descriptors(m)
        for k in M.DESCRIPTORS:
            assert 0.0 <= d[k] <= 1.0
        assert d["scale"] == pytest.approx(m.mean())
        df = M.object_features(measure.label(m))
        for k in ("compactness", "tubularity", "irregularity", "scale"):
            assert df[k].between(0, 1).all()


def test_mask_descriptors_are_area_weighted_over_components() -> None:
    a, b = disk(30), hline(3, 60)
    canvas = np.zeros((120, 200), bool)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[100 : 100 + b.shape[0], 100 : 100 + b.shape[1]] = b
    da, db = M.object_descriptors(a), M.object_descriptors(b)
    d = M.mask_descriptors(canvas)
    wa, wb = a.sum(), b.sum()
    for k in ("compactness", "tubularity", "irregularity"):
        assert d[k] == pytest.approx((wa * da[k] + wb * db[k]) / (wa + wb), abs=1e-9)
    assert d["scale"] == pytest.approx((wa + wb) / canvas.size)


def test_component_inside_another_components_box() -> None:
    # A ring with a dot in its hole: the ring's bounding box contains the dot.
    yy, xx = np.mgrid[:60, :60] - 30
    r = np.hypot(yy, xx)
    m = (r <= 25) & (r > 20) | (r <= 3)
    ring_only = (r <= 25) & (r > 20)
    dot_only = r <= 3
    d = M.mask_descriptors(m)
    dr, dd = M.object_descriptors(ring_only), M.object_descriptors(dot_only)
    w = ring_only.sum(), dot_only.sum()
    assert d["tubularity"] == pytest.approx(
        (w[0] * dr["tubularity"] + w[1] * dd["tubularity"]) / sum(w), abs=1e-9
    )


def test_batch_descriptors_shapes_and_inputs() -> None:
    line = np.zeros((40, 40), bool)
    line[20:23, 5:35] = True
    blob = np.zeros((40, 40), bool)
    blob[draw.disk((20, 20), 14)] = True
    batch = np.stack([blob, np.zeros((40, 40), bool), line])
    out = M.batch_descriptors(batch.astype(np.float32))
    assert set(out) == set(M.DESCRIPTORS)
    for v in out.values():
        assert v.shape == (3,)
    assert out["tubularity"][2] > out["tubularity"][0]
    assert all(out[k][1] == 0 for k in M.DESCRIPTORS)
    out4 = M.batch_descriptors(batch[:, None])
    np.testing.assert_allclose(out4["compactness"], out["compactness"])
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        M.batch_descriptors(batch[0])


def test_empty_inputs() -> None:
    assert M.mask_descriptors(np.zeros((16, 16), bool)) == dict.fromkeys(M.DESCRIPTORS, 0.0)
    d = M.object_descriptors(np.zeros((8, 8)))
    assert all(v == 0.0 for v in d.values())
    df = M.object_features(np.zeros((16, 16), np.uint16))
    assert list(df.columns) == list(M.FEATURE_COLUMNS)
    assert len(df) == 0
    assert M.object_features(np.ones((4, 4), int), label_ids=[5]).empty


def test_tiny_objects_are_finite() -> None:
    for m in (np.ones((1, 1)), np.ones((1, 2)), np.ones((1, 3)), np.eye(4)):
        d = M.object_descriptors(m.astype(bool))
        for k in M.DESCRIPTORS:
            assert 0.0 <= d[k] <= 1.0


# ---------------------------------------------------------------------------------------------
# Feature tables
# ---------------------------------------------------------------------------------------------


def _labels_with_objects(rng: np.random.Generator, shape=(160, 160), n=25) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    k = 0
    for _ in range(200):
        if k == n:
            break
        r, c = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        rr, cc = draw.ellipse(
            r, c, rng.uniform(2, 9), rng.uniform(2, 9), shape=shape, rotation=rng.uniform(0, 3)
        )
        if (lab[rr, cc] != 0).any():
            continue
        k += 1
        lab[rr, cc] = 3 * k  # non-consecutive ids
    return lab


def test_object_features_columns_and_values() -> None:
    rng = np.random.default_rng(1)
    lab = _labels_with_objects(rng)
    prob = rng.random(lab.shape)
    classes = np.where(lab > 0, 2, 0)
    classes[lab == 3] = 3
    df = M.object_features(lab, spacing=(0.5, 0.25), probability=prob, classes=classes)
    assert list(df.columns) == list(M.FEATURE_COLUMNS)
    ids = np.unique(lab)[1:]
    assert df["label"].tolist() == ids.tolist()
    assert (df["index"] == df["label"]).all()
    assert isinstance(df.index, pd.RangeIndex)
    for row in df.to_dict("records"):
        obj = lab == row["label"]
        assert row["area_px"] == obj.sum()
        assert row["area"] == pytest.approx(obj.sum() * 0.125)
        assert row["scale"] == pytest.approx(obj.sum() / lab.size)
        assert row["mean_probability"] == pytest.approx(prob[obj].mean())
        assert row["class"] == (3 if row["label"] == 3 else 2)
        d = M.object_descriptors(obj)
        for k in ("compactness", "tubularity", "irregularity"):
            assert row[k] == pytest.approx(d[k])


def test_object_features_defaults_and_label_ids() -> None:
    lab = _labels_with_objects(np.random.default_rng(2))
    df = M.object_features(lab)
    assert (df["class"] == 1).all()
    assert df["mean_probability"].isna().all()
    ids = df["label"].tolist()
    sub = M.object_features(lab, label_ids=[ids[3], ids[0], 10_000])
    assert sub["label"].tolist() == sorted([ids[0], ids[3]])
    pd.testing.assert_frame_equal(sub, df[df["label"].isin(sub["label"])].reset_index(drop=True))


def test_object_features_huge_sparse_ids() -> None:
    lab = np.zeros((20, 20), np.int64)
    lab[2:5, 2:5] = 2**40
    lab[10:15, 10:12] = 7
    df = M.object_features(lab)
    assert df["label"].tolist() == [7, 2**40]
    assert df["area_px"].tolist() == [10, 9]


def test_object_features_bad_input() -> None:
    with pytest.raises(TypeError, match="integer"):
        M.object_features(np.zeros((4, 4), float))
    with pytest.raises(ValueError, match="2-D"):
        M.object_features(np.zeros((2, 4, 4), int))
    with pytest.raises(ValueError, match="non-negative"):
        M.object_features(-np.ones((4, 4), int))
    with pytest.raises(ValueError, match="shape"):
        M.object_features(np.ones((4, 4), int), probability=np.ones((3, 3)))
    with pytest.raises(ValueError, match="spacing"):
        M.object_features(np.ones((4, 4), int), spacing=(1.0, 0.0))


def test_update_features_equals_full_recompute_after_random_edits() -> None:
    rng = np.random.default_rng(5)
    lab = _labels_with_objects(rng, n=30)
    prob = rng.random(lab.shape)
    df = M.object_features(lab, probability=prob, spacing=(2.0, 2.0))
    for step in range(12):
        before = lab.copy()
        kind = step % 4
        r, c = rng.integers(0, lab.shape[0] - 20, 2)
        ids = np.unique(lab)[1:]
        if kind == 0:  # paint an existing label over a patch (may merge into neighbours)
            lab[r : r + 12, c : c + 12] = rng.choice(ids)
        elif kind == 1:  # erase a patch
            lab[r : r + 15, c : c + 15] = 0
        elif kind == 2:  # delete one whole object
            lab[lab == rng.choice(ids)] = 0
        else:  # paint a brand-new label
            lab[r : r + 6, c : c + 9] = lab.max() + 1
        touched = np.unique(np.concatenate([before[before != lab], lab[before != lab]]))
        df = M.update_features(df, lab, touched, probability=prob, spacing=(2.0, 2.0))
        full = M.object_features(lab, probability=prob, spacing=(2.0, 2.0))
        pd.testing.assert_frame_equal(df, full)


def test_update_features_from_nothing_and_errors() -> None:
    lab = _labels_with_objects(np.random.default_rng(7), n=5)
    ids = np.unique(lab)[1:]
    pd.testing.assert_frame_equal(M.update_features(None, lab, ids), M.object_features(lab))
    with pytest.raises(ValueError, match="missing columns"):
        M.update_features(pd.DataFrame({"label": [1]}), lab, ids)
    with pytest.raises(TypeError, match="unexpected"):
        M.update_features(None, lab, ids, label_ids=[1])


def _stack_features(stack: np.ndarray, spacing=(2.0, 2.0)) -> pd.DataFrame:
    """The engine's stack table computed independently: per plane, ids unique, a z column."""
    parts = []
    for z, plane in enumerate(stack):
        part = M.object_features(plane, spacing=spacing)
        part["z"] = z
        parts.append(part)
    return pd.concat(parts, ignore_index=True).sort_values("label").reset_index(drop=True)


def test_update_stack_features_equals_full_recompute_after_edits() -> None:
    rng = np.random.default_rng(11)
    planes = []
    offset = 0
    for _ in range(4):  # ids unique across planes, as the inference engine makes them
        lab = _labels_with_objects(rng, n=8)
        planes.append(np.where(lab > 0, lab + offset, 0))
        offset = int(planes[-1].max())
    stack = np.stack(planes)
    df = _stack_features(stack)
    for step in range(8):
        before = stack.copy()
        z = int(rng.integers(0, 4))
        ids = np.unique(stack[z])[1:]
        if step % 3 == 0:
            stack[z][stack[z] == rng.choice(ids)] = 0  # delete an object
        elif step % 3 == 1:
            r, c = rng.integers(0, stack.shape[1] - 20, 2)
            stack[z, r : r + 7, c : c + 9] = stack.max() + 1  # a brand-new object
        else:
            r, c = rng.integers(0, stack.shape[1] - 20, 2)
            stack[z, r : r + 12, c : c + 12] = 0  # erase a patch
        changed = before != stack
        touched = np.unique(np.concatenate([before[changed], stack[changed]]))
        df = M.update_stack_features(df, stack, touched, [(z,)], ("z",), spacing=(2.0, 2.0))
        pd.testing.assert_frame_equal(df, _stack_features(stack), check_dtype=False)
    with pytest.raises(ValueError, match="lead name"):
        M.update_stack_features(df, stack, [1], [(0,)], ("t", "z"))
