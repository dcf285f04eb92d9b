"""Unit tests of the networks: S2M-Net (MRF-SE, SSTM, BFD), the U-Net baseline, the registry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from napari_s2mnet.model import ModelConfig, available_models, build_model, count_parameters
from napari_s2mnet.model.base import crop_padding, pad_to_multiple
from napari_s2mnet.model.blocks import (
    SSTM,
    BFDStage,
    ChannelLayerNorm,
    MRFSEBlock,
    SpectralFilter,
)
from napari_s2mnet.model.registry import resolve_options
from napari_s2mnet.model.s2mnet import S2MNet, S2MNetOptions
from napari_s2mnet.model.unet import UNet, UNetOptions


@pytest.fixture(scope="module")
def s2m() -> S2MNet:
    torch.manual_seed(0)
    return build_model(ModelConfig()).eval()


# --------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------


def test_parameter_count_matches_reference_structure(s2m: S2MNet) -> None:
    n = count_parameters(s2m)
    assert 4_700_000 <= n <= 4_800_000
    # Derive the expected count from the spec's analytic count of the reference code
    # (4,768,920) and the two documented deviations: the paper's d=16 spatial bottleneck
    # instead of a C x C dense layer, and a K x (K//2+1) half-plane filter at every stage
    # instead of the code's k x k filter with k = min(32, stage size at 352^2).
    opts = S2MNetOptions()
    code_k = [min(opts.K, 352 // 2 ** (i + 1)) for i in range(5)]
    expected = 4_768_920
    for c, k, spatial in zip(opts.widths, code_k, opts.sstm_use_spatial, strict=True):
        expected += c * opts.K * (opts.K // 2 + 1) - c * k * k
        if spatial:
            expected += (c * opts.d + opts.d + opts.d * c + c) - (c * c + c)
    assert n == expected


def test_unet_parameter_count_close_to_s2mnet(s2m: S2MNet) -> None:
    unet = build_model(ModelConfig("unet"))
    assert abs(count_parameters(unet) / count_parameters(s2m) - 1) < 0.10
    assert unet.stride == 2 ** (UNetOptions().depth - 1)


def test_code_parity_flags_change_the_count_as_derived() -> None:
    # spatial_bottleneck=False is the code's C x C projection: + sum(C^2 + C - 2Cd - d - C).
    base = count_parameters(S2MNet())
    full = count_parameters(S2MNet(options=S2MNetOptions(spatial_bottleneck=False)))
    widths = [64, 80, 128]
    assert full - base == sum(c * c - 2 * c * 16 - 16 for c in widths)


#: The reference code's filter sides at its 352^2 training size: min(32, 176/88/44/22/11).
CODE_K = (32, 32, 32, 22, 11)


def test_reference_structure_counts_the_spec_analytic_4768920() -> None:
    parity = {"spectral_mode": "resize", "spatial_bottleneck": False}
    without = count_parameters(S2MNet(options=S2MNetOptions(**parity)))
    model = S2MNet(options=S2MNetOptions(**parity, spectral_k=CODE_K))
    assert count_parameters(model) == 4_768_920  # methods.md §1.6
    assert without == 4_927_704  # K = 32 everywhere: + 80 (32^2 - 22^2) + 128 (32^2 - 11^2)
    shapes = [tuple(e.sstm.spectral.weight.shape) for e in model.encoders]
    assert shapes == [(c, k, k) for c, k in zip(S2MNetOptions().widths, CODE_K, strict=True)]
    # At the training size every stage's map is at least its filter: no filter resizing.
    x = torch.rand(1, 3, 352, 352)
    sizes: list[int] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        sizes.append(inputs[0].shape[-1])

    handles = [e.sstm.spectral.register_forward_hook(record) for e in model.encoders]
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 1, 352, 352)
    for h in handles:
        h.remove()
    assert [min(32, s) for s in sizes] == list(CODE_K)


def test_spectral_k_is_per_stage_and_defaults_to_k() -> None:
    default = S2MNet(options=S2MNetOptions(**SMALL))
    same = S2MNet(options=S2MNetOptions(**SMALL, spectral_k=(32,) * 5))
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in same.state_dict().items()
    }
    # crop mode stores the half plane: (C, k, k//2 + 1)
    small = S2MNet(options=S2MNetOptions(**SMALL, spectral_k=(8, 8, 6, 5, 3)))
    shapes = [tuple(e.sstm.spectral.weight.shape) for e in small.encoders]
    assert shapes == [(8, 8, 5), (8, 8, 5), (16, 6, 4), (16, 5, 3), (16, 3, 2)]
    config = ModelConfig(options={**SMALL, "spectral_k": [8, 8, 6, 5, 3]})  # JSON gives lists
    back = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert resolve_options(back).spectral_k == (8, 8, 6, 5, 3)
    with torch.no_grad():
        assert build_model(back).eval()(torch.rand(1, 3, 50, 70)).shape == (1, 1, 50, 70)
    with pytest.raises(ValueError, match="one filter side per stage"):
        S2MNetOptions(spectral_k=(32, 32))
    with pytest.raises(ValueError, match="integers >= 1"):
        S2MNetOptions(spectral_k=(32, 32, 32, 0, 11))


# --------------------------------------------------------------------------------------------
# Shapes, channels, classes, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(97, 131), (1, 1), (33, 17)])
def test_output_shape_for_odd_sizes(s2m: S2MNet, hw: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = s2m(x)
    assert y.shape == (2, 1, *hw)
    assert torch.isfinite(y).all()
    assert y.is_contiguous()


@pytest.mark.parametrize(("cin", "ncls"), [(1, 1), (4, 1), (1, 3), (4, 5)])
@pytest.mark.parametrize("arch", ["s2mnet", "unet"])
def test_channels_and_classes(arch: str, cin: int, ncls: int) -> None:
    model = build_model(ModelConfig(arch, in_channels=cin, num_classes=ncls)).eval()
    with torch.no_grad():
        y = model(torch.rand(1, cin, 45, 38))
    assert y.shape == (1, ncls, 45, 38)
    assert model.stride >= 16


def test_unet_any_size_and_bilinear_variant() -> None:
    model = UNet(2, 1, UNetOptions(base=8, depth=4, up="bilinear")).eval()
    with torch.no_grad():
        for hw in [(1, 1), (33, 17), (8, 100)]:
            assert model(torch.rand(1, 2, *hw)).shape == (1, 1, *hw)


def test_outputs_are_logits_not_probabilities(s2m: S2MNet) -> None:
    # A head ending in a sigmoid would confine the output to [0, 1]; logits are not confined.
    with torch.no_grad():
        s2m.head.classifier.bias.fill_(50.0)
        try:
            y = s2m(torch.rand(1, 3, 32, 32))
        finally:
            s2m.head.classifier.bias.zero_()
    assert y.min() > 1.0


def test_eval_is_deterministic_and_batch_independent(s2m: S2MNet) -> None:
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        a = s2m(x)
        b = s2m(x[1:2])
    torch.testing.assert_close(a[1:2], b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("x", "err"),
    [
        (torch.rand(3, 32, 32), ValueError),  # no batch axis
        (torch.rand(1, 2, 32, 32), ValueError),  # wrong channel count
        (torch.randint(0, 9, (1, 3, 32, 32)), TypeError),  # integer image
        (torch.rand(1, 3, 0, 5), ValueError),  # empty
    ],
)
def test_bad_input_gives_clear_error(s2m: S2MNet, x: torch.Tensor, err: type) -> None:
    with pytest.raises(err, match=r"S2MNet"):
        s2m(x)


@pytest.mark.parametrize(
    "options",
    [
        {"widths": (24, 32)},  # flag tuples no longer match
        {"spectral_mode": "fancy"},
        {"bfd_routing": "maybe"},
        {"kernel_sizes": (3, 4)},
        {"dropout": 1.0},
        {"no_such_option": 1},
    ],
)
def test_bad_options_raise_value_error(options: dict) -> None:
    with pytest.raises(ValueError):
        build_model(ModelConfig(options=options))


def test_pad_and_crop_roundtrip() -> None:
    for h, w in [(1, 1), (5, 40), (31, 33), (64, 64)]:
        x = torch.rand(1, 2, h, w)
        padded, pads = pad_to_multiple(x, 32)
        assert padded.shape[-2] % 32 == 0 and padded.shape[-1] % 32 == 0
        torch.testing.assert_close(crop_padding(padded, pads), x)


# --------------------------------------------------------------------------------------------
# SSTM spectral branch: paper crop formula
# --------------------------------------------------------------------------------------------


def _crop_set(k: int, n: int) -> set[int]:
    """Unshifted indices of the centred-crop frequencies -k//2 .. k - k//2 - 1 (mod n)."""
    return {f % n for f in range(-(k // 2), k - k // 2)}


def _paper_formula(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Re(IFFT(ifftshift(ZeroPad(Crop_K(fftshift(FFT x)) * M)))), M: (C, Kh, Kw) real."""
    h, w = x.shape[-2:]
    kh, kw = m.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    r0, c0 = h // 2 - kh // 2, w // 2 - kw // 2
    out = torch.zeros_like(spec)
    out[..., r0 : r0 + kh, c0 : c0 + kw] = spec[..., r0 : r0 + kh, c0 : c0 + kw] * m
    return torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1))).real


def _mirror(a: torch.Tensor) -> torch.Tensor:
    """a(-f) for an unshifted (..., H, W) frequency array."""
    return torch.roll(torch.flip(a, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def _set_half_plane(sf: SpectralFilter, v: torch.Tensor) -> None:
    """Write a (C, Kh, Kw//2+1) centred-row block into the filter (module layout, see docs)."""
    kh = v.shape[1]
    r0 = sf.k // 2 - kh // 2
    with torch.no_grad():
        sf.weight.zero_()
        sf.weight[:, r0 : r0 + kh, : v.shape[2]] = v.float()


@pytest.mark.parametrize(
    ("h", "w", "k"),
    [(24, 20, 9), (30, 28, 8), (12, 10, 32), (22, 22, 32), (19, 26, 12), (11, 11, 32)],
)
def test_rfft_half_plane_filter_equals_paper_formula(h: int, w: int, k: int) -> None:
    """Paper filter M on the centred crop -> module half-plane filter -> same output."""
    torch.manual_seed(h * w + k)
    c = 3
    kh, kw = min(k, h), min(k, w)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    m = torch.randn(c, kh, kw, dtype=torch.float64)
    if kh % 2 == 0 and kh < h:
        # For an even crop the frequency +Kh/2 is outside it, but M(-Kh/2, fc <= 0) leaks onto
        # it through Re(IFFT): those entries fall outside the Kh x (Kw//2+1) half plane.
        m[:, 0, : kw // 2 + 1] = 0.0
    ref = _paper_formula(x, m)

    # Effective (Hermitian-symmetrised) response (M(f) + M(-f)) / 2 on the unshifted grid.
    rows = [f % h for f in range(-(kh // 2), kh - kh // 2)]
    cols = [f % w for f in range(-(kw // 2), kw - kw // 2)]
    full = torch.zeros(c, h, w, dtype=torch.float64)
    full[:, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = m
    sym = (full + _mirror(full)) / 2
    v = sym[:, rows, : kw // 2 + 1]
    left = sym[:, :, : w // 2 + 1].clone()
    left[:, rows, : kw // 2 + 1] = 0
    assert left.abs().max() == 0  # the whole response lies inside the module's half-plane block

    sf = SpectralFilter(c, k=k)
    _set_half_plane(sf, v)
    out = sf(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("h", "w", "k"), [(30, 28, 8), (24, 20, 9), (40, 36, 32), (16, 16, 32)])
def test_every_module_filter_is_a_paper_filter(h: int, w: int, k: int) -> None:
    """Random half-plane filter -> an equivalent paper filter M exists on the crop."""
    torch.manual_seed(k + h)
    c = 2
    kh, kw = min(k, h), min(k, w)
    sf = SpectralFilter(c, k=k)
    with torch.no_grad():
        sf.weight.normal_()
    x = torch.randn(1, c, h, w)
    out = sf(x)

    half = sf.half_plane_filter(h, w).double()  # what multiplies rfft2(x)
    # irfft2 keeps interior columns and their mirrors, and the Hermitian part of columns 0
    # (and W/2): extend to the full plane accordingly.
    a = torch.zeros(c, h, w, dtype=torch.float64)
    a[:, :, : w // 2 + 1] = half
    a[:, :, 1 : (w + 1) // 2] *= 2
    eff = (a + _mirror(a)) / 2
    rset, cset = _crop_set(kh, h), _crop_set(kw, w)
    m = torch.zeros(c, kh, kw, dtype=torch.float64)
    for i, fr in enumerate(range(-(kh // 2), kh - kh // 2)):
        for j, fc in enumerate(range(-(kw // 2), kw - kw // 2)):
            r, q = fr % h, fc % w
            mirrored_inside = (-fr) % h in rset and (-fc) % w in cset
            m[:, i, j] = eff[:, r, q] * (1 if mirrored_inside else 2)
    for r in range(h):
        for q in range(w):
            if not ((r in rset and q in cset) or ((-r) % h in rset and (-q) % w in cset)):
                assert eff[:, r, q].abs().max() == 0, "response outside the paper crop"
    torch.testing.assert_close(out.double(), _paper_formula(x.double(), m), rtol=1e-4, atol=1e-4)


def test_spectral_identity_with_ones_on_full_spectrum() -> None:
    sf = SpectralFilter(4, k=32)
    with torch.no_grad():
        sf.weight.fill_(1.0)
    for h, w in [(20, 17), (32, 32), (7, 30), (1, 1)]:
        x = torch.randn(2, 4, h, w)
        torch.testing.assert_close(sf(x), x, rtol=1e-5, atol=1e-5)


def test_spectral_crop_is_a_low_pass() -> None:
    n, k = 64, 16
    i = torch.arange(n, dtype=torch.float32)
    low = torch.cos(2 * torch.pi * 3 * i / n)[:, None] * torch.cos(2 * torch.pi * 2 * i / n)[None]
    high = torch.cos(2 * torch.pi * 25 * i / n)[:, None] * torch.ones(n)[None]
    sf = SpectralFilter(1, k=k)
    with torch.no_grad():
        sf.weight.fill_(1.0)
    out = sf((low + high)[None, None])[0, 0]
    torch.testing.assert_close(out, low, rtol=1e-4, atol=1e-4)
    assert (out - low - high).abs().max() > 0.9  # the high-frequency pattern really was removed


def test_spectral_init_is_the_radial_gaussian() -> None:
    sf = SpectralFilter(2, k=32)
    w = sf.weight[0]
    assert w.shape == (32, 17)
    dc = w[16, 0].item()  # row K//2 is frequency 0 (centred rows), column 0 is frequency 0
    assert dc == pytest.approx(0.5 * torch.exp(torch.tensor(-(0.25**2) / 0.045)).item(), rel=1e-5)
    assert w.max().item() == pytest.approx(0.5, abs=2e-3)  # peak at r = 0.25
    torch.testing.assert_close(sf.weight[0], sf.weight[1])


def test_resize_mode_runs_and_keeps_shape() -> None:
    sf = SpectralFilter(3, k=8, mode="resize")
    assert sf.weight.shape == (3, 8, 8)
    for hw in [(20, 14), (5, 5)]:
        assert sf(torch.randn(1, 3, *hw)).shape == (1, 3, *hw)


def test_fft_path_survives_cpu_autocast() -> None:
    torch.manual_seed(1)
    sstm = SSTM(8, k=4, use_spatial=True).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        ref = sstm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            spec = sstm.spectral(x.bfloat16())
            out = sstm(x)
    assert spec.dtype == torch.float32  # FFT ran in fp32 even under autocast
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_model_forward_under_cpu_autocast_tiny() -> None:
    opts = S2MNetOptions(
        widths=(4, 4, 8),
        stem=4,
        K=4,
        d=2,
        sstm_use_spatial=(False, True, True),
        sstm_use_spectral=(True, True, True),
    )
    model = S2MNet(options=opts).eval()
    assert model.stride == 8
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.rand(1, 3, 8, 8))
    assert y.shape == (1, 1, 8, 8)
    assert torch.isfinite(y.float()).all()


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def test_mrf_se_matches_the_concat_formula() -> None:
    # The block sums per-branch 1x1 convs instead of concatenating: must equal the spec formula.
    torch.manual_seed(0)
    block = MRFSEBlock(8).eval()
    assert block.se.reduce.out_channels == max(48 // 16, 8)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 8, 10, 12)
        h = block.expand(x)
        m = block.merge(torch.cat([b(h) for b in block.branches], dim=1))
        ref = x + block.project(block.se(m))
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_channel_layer_norm_matches_nn_layernorm() -> None:
    x = torch.randn(2, 5, 3, 4)
    ln = ChannelLayerNorm(5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = nn.LayerNorm(5, eps=1e-6)
    ref.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x), ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    torch.testing.assert_close(
        ln(x.contiguous(memory_format=torch.channels_last)), ln(x), rtol=1e-6, atol=1e-6
    )


def test_sstm_norm_layout_follows_reference_code() -> None:
    def n_ln(m: nn.Module) -> int:
        return sum(isinstance(x, ChannelLayerNorm) for x in m.modules())

    assert n_ln(SSTM(8, use_spatial=False)) == 2  # LN(spectral) + output LN
    assert n_ln(SSTM(8, use_spatial=True)) == 4  # per-branch LNs + fusion LN + output LN
    assert n_ln(SSTM(8, use_spatial=True, extra_norms=False)) == 1  # paper: LN on fusion only
    off = SSTM(8, use_spectral=False, use_spatial=False)
    x = torch.randn(1, 8, 5, 5)
    assert torch.equal(off(x), x)


def test_bfd_boundary_map_and_routings() -> None:
    torch.manual_seed(0)
    d, e = torch.randn(2, 6, 4, 4), torch.randn(2, 5, 8, 8)
    for routing in ["soft", "hard", "learned", "none"]:
        stage = BFDStage(6, 5, 8, routing=routing)
        out, beta = stage.forward_with_boundary(d, e)
        assert out.shape == (2, 8, 8, 8) and beta.shape == (2, 1, 8, 8)
        assert beta.min() >= 0 and beta.max() <= 1
        assert (out >= 0).all()  # ReLU output
    with pytest.raises(ValueError, match="bfd_routing"):
        BFDStage(6, 5, 8, routing="bad")


def test_batchnorm_uses_keras_statistics(s2m: S2MNet) -> None:
    bns = [m for m in s2m.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)


def test_forward_with_boundaries(s2m: S2MNet) -> None:
    with torch.no_grad():
        logits, betas = s2m.forward_with_boundaries(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 1, 64, 64)
    assert [b.shape[-1] for b in betas] == [4, 8, 16, 32]
    # expand, 3 depthwise, merge, 2 SE, project: 8 kernels per stage
    assert len(s2m.mrf_se_kernels()) == 5 * 8
    assert all(k.dim() == 4 for k in s2m.mrf_se_kernels())


# --------------------------------------------------------------------------------------------
# Training behaviour
# --------------------------------------------------------------------------------------------


SMALL = {"widths": (8, 8, 16, 16, 16), "stem": 8, "expansion": 2}


def _assert_all_parameters_get_gradients(
    model: nn.Module, x: torch.Tensor, may_be_zero: str = "\0"
) -> None:
    """Every parameter gets a finite gradient, non-zero unless its name contains ``may_be_zero``."""
    model.train()
    logits = model(x)
    target = (torch.rand_like(logits) > 0.5).float()
    nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        if may_be_zero not in name:
            assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_gradients_reach_all_parameters() -> None:
    torch.manual_seed(0)
    _assert_all_parameters_get_gradients(S2MNet(), torch.rand(2, 3, 64, 64))


def test_training_works_after_inference_mode_calls() -> None:
    # Inference (inference_mode) then fine-tuning on the same model object must work: nothing
    # cached during inference may leak inference tensors into autograd.
    torch.manual_seed(0)
    model = S2MNet(options=S2MNetOptions(**SMALL)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    _assert_all_parameters_get_gradients(model, x)


def test_unet_gradients_reach_all_parameters() -> None:
    torch.manual_seed(0)
    _assert_all_parameters_get_gradients(
        UNet(options=UNetOptions(base=8)), torch.rand(2, 3, 32, 32)
    )


@pytest.mark.parametrize(
    "variant",
    [
        {"spectral_mode": "resize"},
        {"spatial_bottleneck": False},
        {"extra_norms": False},
        {"bfd_routing": "hard"},
        {"bfd_routing": "learned"},
        {"bfd_routing": "none"},
        {"sstm_use_spatial": (True,) * 5},
        {"sstm_use_spatial": (False,) * 5, "sstm_use_spectral": (False,) * 5},
        {"sstm_use_spatial": (True,) * 5, "sstm_use_spectral": (False,) * 5},
        {"K": 8, "d": 4, "dropout": 0.0},
        {"spectral_k": (8, 8, 6, 5, 3), "spectral_mode": "resize"},
    ],
)
def test_every_flag_variant_builds_trains_and_runs(variant: dict) -> None:
    torch.manual_seed(0)
    config = ModelConfig(options={**SMALL, **variant}, num_classes=2)
    model = build_model(config)
    # Hard routing sends no pixel through the refine stream while beta <= 0.5 everywhere
    # (its straight-through gradient still trains the boundary head).
    skip = "refine" if variant.get("bfd_routing") == "hard" else "\0"
    _assert_all_parameters_get_gradients(model, torch.rand(2, 3, 64, 48), skip)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 21, 70)).shape == (1, 2, 21, 70)


# --------------------------------------------------------------------------------------------
# Registry and config
# --------------------------------------------------------------------------------------------


def test_registry_lists_networks() -> None:
    names = available_models()
    assert {"s2mnet", "unet"} <= set(names)
    assert "4.7M" in names["s2mnet"]


def test_model_config_roundtrip_through_json() -> None:
    opts = {"sstm_use_spatial": (True, False, True, False, True), "bfd_routing": "learned", "K": 16}
    config = ModelConfig("s2mnet", in_channels=2, num_classes=3, options=opts)
    back = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back.to_dict() == config.to_dict()
    resolved = resolve_options(back)
    assert resolved == dataclasses.replace(S2MNetOptions(), **opts)
    a, b = build_model(config), build_model(back)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    b.load_state_dict(a.state_dict())  # strict: same architecture
    assert isinstance(build_model(ModelConfig("unet", options={"base": 8})), UNet)
