"""MASL, SCC and Dice+BCE: behaviour on perfect / bad predictions, gradients, learnable weights,
morphology modulation, reference-formula parity, multi-class inputs, the spectral term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_s2mnet import morphology
from napari_s2mnet.losses import (
    COMPONENTS,
    LOSS_NAMES,
    MASL,
    DiceBCELoss,
    SCCLoss,
    build_loss,
    spectral_correlation,
)
from napari_s2mnet.losses import components as C

H = W = 64


def disk_mask(h: int = H, w: int = W, r: float = 18, center=None) -> torch.Tensor:
    cy, cx = center if center is not None else (h / 2, w / 2)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()


def line_mask(h: int = H, w: int = W, width: int = 3) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[h // 2 - width // 2 : h // 2 - width // 2 + width, 4 : w - 4] = 1
    return m


def perfect_logits(y: torch.Tensor) -> torch.Tensor:
    """Saturated logits that reproduce a binary target (B, 1, H, W)."""
    return (2 * y - 1) * 20.0


def binary_batch() -> torch.Tensor:
    return torch.stack([disk_mask(), line_mask()]).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Components: perfect vs bad predictions, gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPONENTS)
def test_each_component_is_minimal_for_perfect_and_larger_for_bad(name: str) -> None:
    y = binary_batch()
    crit = MASL(1, components=(name,), learned_weights=False)
    perfect = crit(perfect_logits(y), y).item()
    assert crit.last_components[name] == pytest.approx(perfect, abs=1e-6)
    bad = crit(perfect_logits(1 - y), y).item()
    noisy = crit(torch.randn_like(y), y).item()
    assert perfect < 1e-6
    assert bad > 100 * max(perfect, 1e-6)
    assert noisy > 100 * max(perfect, 1e-6)


@pytest.mark.parametrize("name", COMPONENTS)
def test_multiclass_components_minimal_for_perfect(name: str) -> None:
    ids = (disk_mask() + 2 * line_mask()).clamp(max=2).long().unsqueeze(0).repeat(2, 1, 1)
    perfect = F.one_hot(ids, 3).permute(0, 3, 1, 2).float() * 40 - 20
    crit = MASL(3, components=(name,))
    assert crit(perfect, ids).item() < 1e-6
    assert crit(torch.zeros_like(perfect), ids).item() > 1e-3  # uninformative prediction
    if name != "str":  # channel-summed L_str is blind to a permutation of the classes
        assert crit(perfect.flip(1), ids).item() > 1e-3


@pytest.mark.parametrize("name", [*COMPONENTS, None])
def test_gradients_flow_to_logits(name: str | None) -> None:
    y = binary_batch()
    z = torch.randn_like(y, requires_grad=True)
    crit = MASL(1, components=(name,) if name else COMPONENTS)
    crit(z, y).backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


def test_multiclass_bce_is_stable_for_saturated_logits() -> None:
    ids = torch.randint(0, 4, (2, 16, 16))
    z = (torch.randn(2, 4, 16, 16) * 1000).requires_grad_()
    loss = MASL(4)(z, ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()
    # Matches the naive formula where the naive one is finite.
    z2 = torch.randn(2, 4, 8, 8)
    y2 = F.one_hot(torch.randint(0, 4, (2, 8, 8)), 4).permute(0, 3, 1, 2).float()
    p = torch.softmax(z2, 1)
    naive = -(y2 * p.log() + (1 - y2) * (1 - p).log())
    torch.testing.assert_close(C.bce_elementwise(z2, y2), naive, atol=1e-5, rtol=1e-5)


def test_total_is_weighted_average_of_components() -> None:
    y = binary_batch()
    z = torch.randn_like(y)
    crit = MASL(1)
    total = crit(z, y).item()
    lc = crit.last_components
    num = sum(lc[f"w_{c}"] * lc[f"alpha_{c}"] * lc[c] for c in COMPONENTS)
    den = sum(lc[f"w_{c}"] * lc[f"alpha_{c}"] for c in COMPONENTS)
    assert total == pytest.approx(num / (den + 1e-6), rel=1e-5)
    assert lc["total"] == pytest.approx(total)
    assert lc["w_sca"] == pytest.approx(0.5)
    assert lc["w_core"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Learnable weights
# ---------------------------------------------------------------------------------------------


def test_weights_train_under_adam_and_move_as_derived() -> None:
    y = binary_batch()
    z = torch.randn_like(y)
    crit = MASL(1)
    assert any(p is crit.weights for p in crit.parameters())
    before = crit.weights.detach().clone()
    opt = torch.optim.Adam(crit.parameters(), lr=1e-2)
    loss = crit(z, y)
    lc = crit.last_components
    opt.zero_grad()
    loss.backward()
    opt.step()
    crit.clamp_weights_()
    after = crit.weights.detach()
    assert not torch.allclose(before, after)
    # dL/dw_j = a_j (L_j - L_mean) / sum(w a): below-average components gain weight.
    for i, c in enumerate(crit.components):
        if lc[c] < lc["total"] - 1e-4:
            assert after[i] > before[i], c
        elif lc[c] > lc["total"] + 1e-4:
            assert after[i] < before[i], c


def test_clamp_weights_projects_to_bounds() -> None:
    crit = MASL(1)
    opt = torch.optim.SGD(crit.parameters(), lr=1e4)  # absurd steps to leave the box
    y = binary_batch()
    for _ in range(3):
        opt.zero_grad()
        crit(torch.randn_like(y), y).backward()
        opt.step()
        crit.clamp_weights_()
        assert crit.weights.min() >= 0.1
        assert crit.weights.max() <= 10.0
    with torch.no_grad():
        crit.weights.copy_(torch.tensor([50.0, -3.0, 0.05, 10.0, 0.1]))
    crit.clamp_weights_()
    assert crit.weights.tolist() == pytest.approx([10.0, 0.1, 0.1, 10.0, 0.1])


def test_fixed_weights_flag() -> None:
    crit = MASL(1, learned_weights=False)
    assert list(crit.parameters()) == []
    assert "weights" in dict(crit.named_buffers())
    y = binary_batch()
    z = torch.randn_like(y, requires_grad=True)
    crit(z, y).backward()
    assert crit.weights.grad is None
    assert crit.weight_dict == {"core": 1.0, "bnd": 1.0, "str": 1.0, "sca": 0.5, "tex": 0.5}


# ---------------------------------------------------------------------------------------------
# Modulation
# ---------------------------------------------------------------------------------------------


def test_alpha_comes_from_morphology_descriptors() -> None:
    crit = MASL(1)
    y_line = line_mask().expand(2, 1, H, W).contiguous()
    y_disk = disk_mask().expand(2, 1, H, W).contiguous()
    crit(torch.randn_like(y_line), y_line)
    a_line = dict(crit.last_components)
    crit(torch.randn_like(y_disk), y_disk)
    a_disk = dict(crit.last_components)
    assert a_line["alpha_bnd"] > a_disk["alpha_bnd"]
    assert a_line["alpha_str"] > a_disk["alpha_str"]
    assert a_disk["alpha_core"] > a_line["alpha_core"]  # the disk is more compact
    # Exactly the modulation table applied to morphology.batch_descriptors.
    d = {k: float(v.mean()) for k, v in morphology.batch_descriptors(y_line[:, 0] > 0.5).items()}
    assert a_line["alpha_core"] == pytest.approx(1 + 0.5 * d["compactness"], rel=1e-6)
    assert a_line["alpha_bnd"] == pytest.approx(
        1 + 1.5 * d["tubularity"] + d["compactness"], rel=1e-6
    )
    assert a_line["alpha_str"] == pytest.approx(1 + d["tubularity"], rel=1e-6)
    assert a_line["alpha_sca"] == pytest.approx(1 + 1.5 * d["irregularity"], rel=1e-6)
    assert a_line["alpha_tex"] == pytest.approx(1 + d["irregularity"], rel=1e-6)


def test_no_modulation_flag_sets_alphas_to_one() -> None:
    y = binary_batch()
    crit = MASL(1, modulation=False)
    crit(torch.randn_like(y), y)
    assert all(crit.last_components[f"alpha_{c}"] == 1.0 for c in COMPONENTS)


def test_per_sample_modulation() -> None:
    y = binary_batch()  # disk, line
    z = torch.randn_like(y)
    per_batch = MASL(1, learned_weights=False)
    per_sample = MASL(1, learned_weights=False, per_sample=True)
    lb, ls = per_batch(z, y), per_sample(z, y)
    assert not torch.isclose(lb, ls)
    # Per-sample loss == mean of each sample's own weighted average.
    singles = [MASL(1, learned_weights=False)(z[i : i + 1], y[i : i + 1]) for i in range(2)]
    assert ls.item() == pytest.approx(float(sum(singles) / 2), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Reference-code formulas (parity flag)
# ---------------------------------------------------------------------------------------------


def test_reference_formulas_reproduce_the_inverted_tubularity() -> None:
    # methods.md §1.7.2: 352^2 disk (r = 80) -> tau 0.97, c 0.50; 3-px line -> tau 0.33.
    disk = disk_mask(352, 352, 80).view(1, 1, 352, 352)
    line = line_mask(352, 352, 3).view(1, 1, 352, 352)
    ref_disk = C.reference_descriptors(disk)
    ref_line = C.reference_descriptors(line)
    assert ref_disk["tubularity"].item() == pytest.approx(0.97, abs=0.02)
    assert ref_line["tubularity"].item() == pytest.approx(0.33, abs=0.02)
    assert ref_disk["compactness"].item() == pytest.approx(0.50, abs=0.03)
    # The bug, documented: the code calls the disk more tubular than the line ...
    assert ref_disk["tubularity"] > ref_line["tubularity"]
    # ... and our descriptors do not.
    ours_disk = morphology.mask_descriptors(disk[0, 0].numpy())
    ours_line = morphology.mask_descriptors(line[0, 0].numpy())
    assert ours_line["tubularity"] > 0.8 > 0.2 > ours_disk["tubularity"]
    assert ours_disk["compactness"] > 0.9
    # The flag routes MASL's modulation through the reference formulas.
    alphas = {}
    for name, m in (("disk", disk), ("line", line)):
        crit = MASL(1, reference_formulas=True)
        crit(torch.zeros_like(m), m)
        alphas[name] = crit.last_components["alpha_str"]
    assert alphas["disk"] > alphas["line"]


def test_reference_perimeter_eps_inside_sqrt_bias() -> None:
    m = disk_mask(128, 128, 30).view(1, 1, 128, 128)
    fixed = C.soft_perimeter(m).item()
    ref = C.soft_perimeter(m, eps_inside_sqrt=True).item()
    assert ref - fixed == pytest.approx(math.sqrt(1e-6) * 128 * 128, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Multi-class inputs and validation
# ---------------------------------------------------------------------------------------------


def test_multiclass_shapes_targets_and_subset() -> None:
    ids = torch.randint(0, 4, (2, 32, 32))
    z = torch.randn(2, 4, 32, 32, requires_grad=True)
    crit = MASL(4, components=("core", "bnd"), modulation=False)  # EndoVis configuration
    loss = crit(z, ids)
    loss.backward()
    assert loss.ndim == 0
    assert set(crit.last_components) == {
        "core",
        "w_core",
        "alpha_core",
        "bnd",
        "w_bnd",
        "alpha_bnd",
        "total",
    }
    onehot = F.one_hot(ids, 4).permute(0, 3, 1, 2).float()
    assert crit(z, onehot).item() == pytest.approx(loss.item(), rel=1e-6)
    assert crit(z, ids.unsqueeze(1)).item() == pytest.approx(loss.item(), rel=1e-6)
    # Descriptors for multi-class use the union foreground.
    full = MASL(4)
    full(z, ids)
    d = morphology.batch_descriptors((ids > 0).numpy())
    assert full.last_components["alpha_core"] == pytest.approx(
        1 + 0.5 * d["compactness"].mean(), rel=1e-6
    )


def test_binary_target_layouts_agree() -> None:
    y = binary_batch()
    z = torch.randn_like(y)
    crit = MASL(1, learned_weights=False)
    a = crit(z, y).item()
    assert crit(z, y[:, 0]).item() == pytest.approx(a)
    assert crit(z, y.bool()).item() == pytest.approx(a)


def test_bad_inputs_raise_clear_errors() -> None:
    crit = MASL(1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        crit(torch.randn(2, 1, 8, 8), torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crit(torch.randn(1, 1, 8, 8), torch.full((1, 8, 8), 2.0))
    with pytest.raises(ValueError, match="num_classes"):
        crit(torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8).long())
    with pytest.raises(TypeError, match="integer class ids"):
        MASL(3)(torch.randn(1, 3, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        MASL(3)(torch.randn(1, 3, 8, 8), torch.full((1, 8, 8), 3).long())
    with pytest.raises(ValueError, match="subset"):
        MASL(1, components=("core", "shape"))


# ---------------------------------------------------------------------------------------------
# SCC
# ---------------------------------------------------------------------------------------------


def test_scc_identical_masks_give_one() -> None:
    g = binary_batch()[:, 0]
    for variant in ("magnitude", "complex", "real_imag"):
        scc, valid = spectral_correlation(g, g, variant=variant)
        assert valid.all()
        torch.testing.assert_close(scc, torch.ones(2), atol=1e-5, rtol=0)
    y = binary_batch()
    loss = SCCLoss(DiceBCELoss(1), lam=1.0)
    loss(perfect_logits(y), y)
    assert loss.last_components["spectral"] < 1e-5
    assert loss.last_components["scc"] == pytest.approx(1.0, abs=1e-5)


def test_scc_complex_variant_is_spatial_cosine_similarity() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(3, 2, 24, 40, generator=gen)
    g = (torch.rand(3, 2, 24, 40, generator=gen) > 0.6).float()
    scc, _ = spectral_correlation(p, g, variant="complex")
    cos = (p * g).sum((-2, -1)) / (p.norm(dim=(-2, -1)) * g.norm(dim=(-2, -1)))
    torch.testing.assert_close(scc, cos, atol=1e-5, rtol=1e-5)
    # The magnitude variant is genuinely different.
    mag, _ = spectral_correlation(p, g, variant="magnitude")
    assert (mag - cos).abs().max() > 1e-2


def test_scc_magnitude_variant_is_translation_invariant() -> None:
    g = disk_mask(r=10).view(1, 1, H, W)
    p = torch.sigmoid(torch.randn(1, 1, H, W) + 3 * (2 * g - 1))
    base, _ = spectral_correlation(p, g)
    shifted, _ = spectral_correlation(torch.roll(p, shifts=(7, -13), dims=(-2, -1)), g)
    torch.testing.assert_close(base, shifted, atol=1e-5, rtol=1e-5)
    log_base, _ = spectral_correlation(p, g, log_magnitude=True)
    assert not torch.allclose(log_base, base)
    # The complex variant is not translation invariant.
    c0, _ = spectral_correlation(p, g, variant="complex")
    c1, _ = spectral_correlation(
        torch.roll(p, shifts=(7, -13), dims=(-2, -1)), g, variant="complex"
    )
    assert (c0 - c1).abs().max() > 0.1


def test_scc_skips_zero_variance_pairs() -> None:
    p = torch.rand(2, 1, 16, 16)
    g = torch.zeros(2, 1, 16, 16)
    g[1, 0, 4:9, 4:9] = 1
    _, valid = spectral_correlation(p, g)
    assert valid.tolist() == [[False], [True]]
    spatial = DiceBCELoss(1)
    loss = SCCLoss(spatial, lam=0.5)
    z = torch.randn(2, 1, 16, 16, requires_grad=True)
    empty = torch.zeros(2, 1, 16, 16)
    total = loss(z, empty)
    assert total.item() == pytest.approx(spatial(z, empty).item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(z.grad).all()


def test_scc_loss_gradients_multiclass_and_background() -> None:
    ids = torch.randint(0, 3, (2, 16, 16))
    z = torch.randn(2, 3, 16, 16, requires_grad=True)
    for bg in (False, True):
        loss = SCCLoss(DiceBCELoss(3), lam=0.5, include_background=bg)
        val = loss(z, ids)
        val.backward()
        assert torch.isfinite(z.grad).all()
        lc = loss.last_components
        assert val.item() == pytest.approx(lc["spatial"] + 0.5 * lc["spectral"], rel=1e-5)
        assert {"bce", "dice", "spatial", "scc", "spectral", "total"} <= set(lc)
    with pytest.raises(ValueError, match="variant"):
        SCCLoss(DiceBCELoss(1), variant="phase")


def test_scc_lam_zero_equals_spatial() -> None:
    y = binary_batch()
    z = torch.randn_like(y)
    masl = MASL(1, learned_weights=False)
    assert SCCLoss(masl, lam=0.0)(z, y).item() == pytest.approx(masl(z, y).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Dice + BCE and build_loss
# ---------------------------------------------------------------------------------------------


def test_dicebce_binary_and_multiclass() -> None:
    y = binary_batch()
    crit = DiceBCELoss(1)
    assert crit(perfect_logits(y), y).item() < 1e-3
    assert crit(perfect_logits(1 - y), y).item() > 1.0
    ids = torch.randint(0, 3, (2, 8, 8))
    z = torch.randn(2, 3, 8, 8, requires_grad=True)
    mc = DiceBCELoss(3)
    val = mc(z, ids)
    val.backward()
    assert mc.last_components["bce"] == pytest.approx(F.cross_entropy(z, ids).item(), rel=1e-5)
    assert val.item() == pytest.approx(
        0.5 * mc.last_components["bce"] + 0.5 * mc.last_components["dice"], rel=1e-5
    )


def test_build_loss_names_and_options() -> None:
    y = binary_batch()
    for name in LOSS_NAMES:
        for nc in (1, 3):
            loss = build_loss(name, nc)
            target = y if nc == 1 else (y[:, 0] * 2).long()
            z = torch.randn(2, nc, H, W, requires_grad=True)
            loss(z, target).backward()
            assert isinstance(loss.last_components, dict) and "total" in loss.last_components
            assert torch.isfinite(z.grad).all()
    loss = build_loss("MASL + SCC", 1, lam=0.25, variant="complex", learned_weights=False)
    assert isinstance(loss, SCCLoss) and isinstance(loss.spatial_loss, MASL)
    assert loss.lam == 0.25 and loss.variant == "complex"
    assert not loss.spatial_loss.learned_weights
    loss.clamp_weights_()  # forwards to MASL, must not fail
    with pytest.raises(ValueError, match="Unknown loss"):
        build_loss("focal", 1)
    with pytest.raises(ValueError, match="lam"):
        build_loss("masl", 1, lam=0.5)  # SCC option without +scc
    db = build_loss("dicebce", 1, bce_weight=1.0)
    assert db.bce_weight == 1.0


def test_loss_ignores_autocast_and_stays_fp32() -> None:
    y = binary_batch()
    z = torch.randn_like(y)
    crit = MASL(1, learned_weights=False)
    ref = crit(z, y)
    with torch.autocast("cpu", dtype=torch.float16):
        out = crit(z, y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    assert np.isfinite(out.item())
