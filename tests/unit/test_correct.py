"""Learning from corrections, fine-tune scope and object diameter (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_s2mnet.training import FinetuneConfig


@pytest.fixture(scope="module")
def tiny():
    import torch

    from napari_s2mnet.checkpoint import new_model
    from napari_s2mnet.model import ModelConfig

    torch.manual_seed(0)
    bundle = new_model(
        ModelConfig(arch="unet", in_channels=1, num_classes=1, options={"base": 4, "depth": 3}),
        name="tiny",
    )
    bundle.model.eval()
    return bundle


def _discs(n: int = 6, size: int = 96, r: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.integers(r + 2, size - r - 2, 2)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    img = (lab > 0).astype(np.float32) + 0.05 * rng.standard_normal((size, size)).astype(np.float32)
    return img, lab


def _masks(lab: np.ndarray, ids: list[int]) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(np.isin(lab, ids), iterations=2)


def test_grow_corrected_takes_the_touched_objects_and_a_margin() -> None:
    from napari_s2mnet.training.region import grow_corrected

    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6] = 1
    lab[10:15, 10:15] = 2
    painted = np.zeros_like(lab, bool)
    painted[3, 3] = True  # one pixel of object 1
    out = grow_corrected(lab, painted, margin=1)
    assert out[2:6, 2:6].all() and out[1, 2] and not out[12, 12]
    with pytest.raises(ValueError, match="shape"):
        grow_corrected(lab, painted[:5])


def test_regions_hold_out_validation_only_with_enough_corrections(tiny) -> None:
    from napari_s2mnet.training.data import _prepare_data
    from napari_s2mnet.training.region import MIN_VAL_REGIONS

    # Discs on a grid (never touching), one more than validation needs.
    n = MIN_VAL_REGIONS + 1
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.mgrid[: 24 * side, : 24 * side]
    lab = np.zeros(yy.shape, np.int32)
    for k in range(n):
        cy, cx = 12 + 24 * (k // side), 12 + 24 * (k % side)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k + 1
    img = (lab > 0).astype(np.float32)
    cfg = FinetuneConfig(val_fraction=0.25, uncorrected_weight=0.0)
    few_ids = list(range(1, MIN_VAL_REGIONS))  # one region short
    few = _prepare_data([(img, lab)], tiny, cfg, None, None, [_masks(lab, few_ids)])
    assert few.corrected and few.val == [] and "no validation" in few.split
    w = few.train[0].regions.weight
    assert set(np.unique(w)) == {0.5, 1.0}  # codes: corrected / uncorrected (none ignored)
    many_ids = list(range(1, n + 1))
    many = _prepare_data([(img, lab)], tiny, cfg, None, None, [_masks(lab, many_ids)])
    regions = many.train[0].regions
    assert len(many.val) == 1 and regions.n_regions == n and regions.n_val >= 2
    held = regions.val
    assert not (regions.weight[held] > 0).any()  # held-out pixels never train
    assert "corrected regions" in many.split
    with pytest.raises(ValueError, match="give one per pair"):
        _prepare_data([(img, lab)], tiny, cfg, None, None, [None, None])
    with pytest.raises(ValueError, match="No corrected pixels"):
        _prepare_data([(img, lab)], tiny, cfg, None, None, [np.zeros_like(lab, bool)])


def test_weighted_crops_stay_aligned_with_their_targets(tiny) -> None:
    from napari_s2mnet.training.data import _prepare_data
    from napari_s2mnet.training.sampler import _Sampler

    img, lab = _discs(n=6)
    mask = _masks(lab, [1, 2])
    cfg = FinetuneConfig(
        crop_size=32, scale_jitter=0.0, intensity_jitter=0.0, val_fraction=0, uncorrected_weight=0.0
    )  # every crop centred on a correction
    data = _prepare_data([(img, lab)], tiny, cfg, None, None, [mask])
    sampler = _Sampler(data, cfg)
    for step in range(10):
        _x, y, w = sampler.crop(step, 0)
        assert w.shape == y.shape and w.max() == 1.0  # centred on a corrected pixel
        # corrected pixels carry the labels of the corrected objects (rotations and flips
        # applied alike)
        assert set(np.unique(y[w > 0])) <= {0, 1}


def test_finetune_from_corrections_reports_before_and_after(tiny) -> None:
    from napari_s2mnet.training import train
    from napari_s2mnet.training.data import _prepare_data

    img, lab = _discs(n=3)
    cfg = FinetuneConfig(
        epochs=1, steps_per_epoch=2, batch_size=2, crop_size=32, device="cpu", lr=1e-3
    )
    res = train([(img, lab)], tiny, cfg, corrected=[_masks(lab, [1])])
    assert res.steps == 2 and res.best_val_dice is None  # one region: no validation
    assert res.corrected_before is not None and res.corrected_after is not None
    assert "corrected regions" in res.message
    # one correction: the summary says the rest of the image may have got worse
    assert "elsewhere can get worse" in res.message and "Revert" in res.message
    many = _prepare_data([(img, lab)], tiny, cfg, None, None, [_masks(lab, [1, 2, 3])])
    assert "elsewhere" not in many.split


@pytest.mark.parametrize(
    "scores",
    [(0.9, 0.9, 0.5, 0.9), (0.5, 0.9, 0.95, 0.3)],
    ids=["worse-on-corrections", "broke-the-rest"],
)
def test_a_worse_model_on_the_corrections_is_not_returned(tiny, monkeypatch, scores) -> None:
    import torch

    from napari_s2mnet.training import loop, train

    pairs = iter([scores[:2], scores[2:]])  # before (corrected, context), after (the same)
    monkeypatch.setattr(loop._Run, "corrected_scores", lambda self: next(pairs))
    img, lab = _discs(n=3)
    cfg = FinetuneConfig(
        epochs=1, steps_per_epoch=2, batch_size=2, crop_size=32, device="cpu", lr=1e-2
    )
    res = train([(img, lab)], tiny, cfg, corrected=[_masks(lab, [1])])
    assert res.kept_previous and res.best_step == 0
    assert "starting model is kept" in res.message
    for k, v in res.bundle.model.state_dict().items():
        assert torch.equal(v, tiny.model.state_dict()[k])


def _covered(tiles: list[tuple[int, ...]], shape: tuple[int, ...]) -> np.ndarray:
    count = np.zeros(shape, np.int32)
    for s, y0, x0, h, w in tiles:
        count[s, y0 : y0 + h, x0 : x0 + w] += 1
    return count


def test_scoring_tiles_score_every_corrected_pixel_once() -> None:
    from napari_s2mnet.training.region import _box, _components, scoring_tiles

    # Sparse: three corrections, two of them close enough for their boxes to overlap.
    mask = np.zeros((2, 400, 400), bool)
    mask[0, 50:60, 50:60] = mask[0, 70:80, 90:100] = mask[1, 300:320, 200:210] = True
    boxes = [_box(c, s) for s, c in _components(mask)]
    tiles = scoring_tiles(boxes, mask)
    count = _covered(tiles, mask.shape)
    assert (count[mask] == 1).all() and count.max() == 1  # each pixel once, tiles disjoint
    assert len(tiles) == 2  # the two overlapping boxes merged
    # Dense: hundreds of corrections on a plane (a user who corrected everything) are scored
    # by grid tiles: at most the plane's pixels, not one context box per region.
    dense = np.zeros((1, 450, 450), bool)
    dense[0, 5::15, 5::15] = True
    boxes = [_box(c, s) for s, c in _components(dense)]
    assert len(boxes) == 900 and sum(b[3] * b[4] for b in boxes) > 8 * 450 * 450
    tiles = scoring_tiles(boxes, dense)
    count = _covered(tiles, dense.shape)
    assert (count[dense] == 1).all() and count.max() == 1
    # One huge correction is split into tiles small enough for one forward pass each.
    big = np.zeros((1, 2000, 2000), bool)
    big[0, 100:1500, 100:1500] = True
    tiles = scoring_tiles([_box(c, s) for s, c in _components(big)], big)
    assert max(h * w for _, _, _, h, w in tiles) <= 4 * 256 * 256
    assert (_covered(tiles, big.shape)[big] == 1).all()


def test_scoring_many_corrections_stays_within_the_pixel_cap(tiny) -> None:
    from napari_s2mnet.training.data import _prepare_data
    from napari_s2mnet.training.metrics import REGION_MAX_PIXELS, region_tiles

    img, lab = _discs(n=400, size=1024, r=5)
    cfg = FinetuneConfig(val_fraction=0.0)
    data = _prepare_data([(img, lab)], tiny, cfg, None, None, [lab > 0])
    tiles = region_tiles(data.train, held_out=False)
    assert tiles and sum(t[4] * t[5] for t in tiles) <= REGION_MAX_PIXELS


def test_scopes_freeze_what_they_say(tiny) -> None:
    import copy

    from napari_s2mnet.training.region import apply_scope, unfreeze

    net = copy.deepcopy(tiny.model)
    n_all = apply_scope(net, "all")
    n_dec = apply_scope(net, "decoder+head")
    n_norm = apply_scope(net, "head+norm")
    assert n_all > n_dec > n_norm > 0
    assert not any(p.requires_grad for p in net.down.parameters() if p.ndim > 1)
    unfreeze(net)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="scope"):
        FinetuneConfig(scope="encoder").validate()


def test_interactive_preset_is_a_time_budget() -> None:
    cfg = FinetuneConfig.interactive("cpu")
    cfg.validate()
    assert cfg.seconds is not None and cfg.epochs is None and cfg.total_steps is None
    assert cfg.val_fraction == 0.0  # every correction trains (docs/benchmarks.md)
    assert cfg.recalibrate_batchnorm and not FinetuneConfig().recalibrate_batchnorm
    assert FinetuneConfig.interactive("cpu", scope="head+norm").scope == "head+norm"
    assert FinetuneConfig.interactive("cpu", val_fraction=0.2).val_fraction == 0.2


def test_gpu_preset_is_the_cpu_run_capped_at_its_measured_steps() -> None:
    """On a GPU the measured CPU optimisation runs to its ~210 steps, not for 60 s of steps:
    more steps did not lift more, and all weights at ~400 steps fell below zero-shot."""
    cpu, gpu = FinetuneConfig.interactive("cpu"), FinetuneConfig.interactive("cuda")
    gpu.validate()
    assert gpu.total_steps == 210 and gpu.seconds == cpu.seconds == 60.0
    names = ("scope", "lr", "crop_size", "batch_size", "uncorrected_weight", "val_fraction")
    for name in (*names, "recalibrate_batchnorm"):
        assert getattr(gpu, name) == getattr(cpu, name), name


def _still(**overrides) -> FinetuneConfig:
    """A short CPU run whose weights stay (almost) where they are (lr 1e-9), so only the
    batch-norm statistics move; recomputed from the images unless overridden."""
    base = {
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "crop_size": 32,
        "device": "cpu",
        "lr": 1e-9,
        "min_lr": 0.0,
        "val_fraction": 0.0,
        "recalibrate_batchnorm": True,
    }
    return FinetuneConfig(**(base | overrides))


def _bn_stats(bundle) -> list:
    from torch import nn

    return [
        t.clone()
        for m in bundle.model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
    ]


def test_batchnorm_statistics_come_from_the_whole_images(tiny) -> None:
    """With recalibration the returned statistics depend on the images, not on which crops
    (seed) the run happened to end with; without it they are the last crops' average."""
    import torch

    from napari_s2mnet.training import train

    img, lab = _discs(n=4, size=96)

    def stats(seed: int, recalibrate: bool) -> list:
        cfg = _still(steps_per_epoch=4, seed=seed, recalibrate_batchnorm=recalibrate)
        res = train([(img, lab)], tiny, cfg)
        assert res.steps == 4 and not res.kept_previous
        return _bn_stats(res.bundle)

    start = _bn_stats(tiny)
    a, b = stats(0, True), stats(1, True)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b, strict=True))
    assert not all(torch.allclose(x, y) for x, y in zip(a, start, strict=True))
    c, d = stats(0, False), stats(1, False)
    assert not all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(c, d, strict=True))


def test_recalibrated_statistics_pool_every_pixel_of_every_image(tiny) -> None:
    """The first batch-norm layer's statistics are the mean and variance of its input over all
    pixels of both images (tiles cover them exactly), including the difference between the
    images, which an average of per-tile variances would miss."""
    import torch
    from torch import nn

    from napari_s2mnet.training import train
    from napari_s2mnet.training.data import _prepare_data

    dense, dense_lab = _discs(n=12, size=64, r=7, seed=1)
    sparse, sparse_lab = _discs(n=1, size=64, r=4, seed=2)
    pairs = [(dense, dense_lab), (sparse, sparse_lab)]
    cfg = _still(crop_size=32)  # 64-px images: four whole tiles each
    net = train(pairs, tiny, cfg).bundle.model
    first = next(m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].double()))
    net.eval()
    with torch.no_grad():
        for item in _prepare_data(pairs, tiny, cfg, None, None).train:
            for y0 in (0, 32):  # the tiles the recalibration forwards
                for x0 in (0, 32):
                    tile = item.image[0][None, :, y0 : y0 + 32, x0 : x0 + 32]
                    net(torch.from_numpy(np.ascontiguousarray(tile)))
    hook.remove()
    x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen], dim=1)
    torch.testing.assert_close(first.running_mean.double(), x.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var.double(), x.var(1), rtol=1e-3, atol=1e-5)
    # what averaging per-tile variances would give is measurably different here
    per_tile = torch.stack([t.transpose(0, 1).reshape(t.shape[1], -1).var(1) for t in seen])
    assert not torch.allclose(per_tile.mean(0), x.var(1), rtol=1e-2)


def test_batchnorm_recalibration_takes_images_smaller_than_the_network_stride(tiny) -> None:
    """Edge tiles of a few pixels would leave one pixel per channel at the deepest level, which
    batch norm cannot normalise in train mode: every tile is taken at the training tile size,
    with image or mirrored context."""
    from napari_s2mnet.training import train

    img, lab = _discs(n=2, size=34, r=4)  # 34 = two 16-px tiles + a 2-px edge
    res = train([(img, lab)], tiny, _still(steps_per_epoch=1, batch_size=1, crop_size=16))
    assert res.steps == 1 and res.stopped_reason == "completed"


def test_equivalent_diameter_and_scale_factor() -> None:
    from napari_s2mnet.diameter import equivalent_diameter, scale_factor

    yy, xx = np.mgrid[:100, :100]
    lab = np.zeros((100, 100), np.int32)
    for k, (cy, cx) in enumerate([(20, 20), (20, 70), (70, 45)], start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10**2] = k
    assert equivalent_diameter(lab) == pytest.approx(20, rel=0.05)
    assert equivalent_diameter(np.zeros((5, 5), int)) is None
    assert scale_factor(18.0, None) == 1.0 and scale_factor(None, 30.0) == 1.0
    assert scale_factor(18.0, 36.0) == pytest.approx(0.5)
    assert scale_factor(18.0, 18.5) == 1.0  # within 5 %: not worth interpolating
    with pytest.raises(ValueError, match="diameter"):
        scale_factor(18.0, 1000.0)


def test_segment_with_a_diameter_keeps_the_image_grid(tiny) -> None:
    import copy

    from napari_s2mnet.inference import InferenceConfig, segment_iter
    from napari_s2mnet.inference.run import run_to_end

    bundle = copy.copy(tiny)
    bundle.metadata = {**tiny.metadata, "diameter": 12.0}
    img, _ = _discs(n=4, size=90)
    cfg = InferenceConfig(
        device="cpu", diameter=24.0, compute_features=False, return_probability=True
    )
    res = run_to_end(segment_iter(img, bundle, cfg))
    assert res.labels.shape == img.shape and res.probability.shape == img.shape
    assert any("Rescaled by 0.50" in m for m in res.messages)
    with pytest.raises(ValueError, match="diameter"):
        InferenceConfig(diameter=0.5).validate()


def test_a_small_correction_weighs_as_much_as_the_rest_of_the_crop() -> None:
    import torch

    from napari_s2mnet.training.region import CORRECTED, UNCORRECTED, region_loss

    logits = torch.full((1, 1, 32, 32), 4.0)  # confident foreground everywhere
    target = torch.ones(1, 1, 32, 32)
    target[..., :2, :2] = 0  # 4 corrected pixels say "background"
    weight = torch.full((1, 32, 32), UNCORRECTED)
    weight[:, :2, :2] = CORRECTED
    only = region_loss(logits, target, weight, 1, uncorrected_weight=0.0)
    both = region_loss(logits, target, weight, 1, uncorrected_weight=1.0)
    assert only > 4.0  # BCE of a confident mistake (~4) + Dice 1 on the 4 pixels alone
    assert 0 < both - only < 0.1  # the rest, right already, adds little
