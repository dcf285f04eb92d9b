"""Data-parallel training: 2 CPU processes (gloo) match one process on the full batch.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node=2``; each
rank computes the gradients of one step on half of the batch and then trains a few steps. One
process with the full batch (``2 x`` the per-rank batch) must give the same averaged gradients
and the same model. Batch norm is kept in eval mode (``freeze_batchnorm``) and the loss is a
per-sample mean, so splitting the batch changes nothing mathematically; with batch-norm
statistics in training mode each rank would normalise with its own half batch.

Two cases: a U-Net with Dice + BCE, and a small S2M-Net with MASL, whose learnable weights are
not owned by DDP and are averaged separately (:func:`napari_s2mnet._ddp.average_gradients`).
For S2M-Net the equivalence needs two more settings, both explained in :data:`CASES`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

STEPS = 4
PER_RANK_BATCH = 2
WORLD = 2

#: Per case: the model (arch, options), the loss, the crop size and the image side.
CASES: dict[str, dict[str, Any]] = {
    "unet": {
        "arch": "unet",
        "options": {"base": 4, "depth": 3},
        "loss": "dicebce",
        "loss_options": {},
        "crop": 32,
        "image": 64,
    },
    "s2mnet_masl": {
        "arch": "s2mnet",
        # dropout=0: training seeds every rank differently on purpose (different dropout masks
        # per rank), so with dropout no split of the batch could reproduce one process's masks.
        "options": {
            "widths": [8, 16, 24, 32, 48],
            "stem": 8,
            "expansion": 2,
            "bn_momentum": 0.1,
            "dropout": 0.0,
        },
        "loss": "masl",
        # MASL's default modulation a_i uses the *batch mean* of the ground-truth descriptors,
        # so each rank would modulate with its half batch's mean; per-sample modulation makes
        # the loss a per-sample mean, which any split of the batch reproduces exactly.
        "loss_options": {"per_sample": True},
        "crop": 64,  # S2M-Net's stride is 32: 64 px keeps every stage larger than 1 x 1
        "image": 96,
    },
}


def _bundle(case: str) -> Any:
    import torch

    from napari_s2mnet.checkpoint import new_model
    from napari_s2mnet.model.registry import ModelConfig

    spec = CASES[case]
    torch.manual_seed(0)
    return new_model(ModelConfig(arch=spec["arch"], in_channels=1, options=spec["options"]))


def _experiment(out: Path, batch_size: int, tag: str, case: str) -> None:
    """One gradient step, then a short run; rank 0 writes gradients and the model to ``out``."""
    import copy

    import torch

    from napari_s2mnet import _ddp, training
    from napari_s2mnet.checkpoint import save_model

    torch.set_num_threads(1)
    spec = CASES[case]
    bundle = _bundle(case)
    rng = np.random.default_rng(0)
    pairs = []
    side = spec["image"]
    yy, xx = np.mgrid[:side, :side]
    for _ in range(2):
        lab = np.zeros((side, side), np.uint16)
        for k in range(1, 6):
            cy, cx, r = rng.integers(8, side - 8), rng.integers(8, side - 8), rng.integers(4, 8)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        pairs.append(((lab > 0) * 150.0 + rng.normal(20, 5, lab.shape), lab))
    cfg = training.FinetuneConfig(
        epochs=1,
        steps_per_epoch=STEPS,
        batch_size=batch_size,
        crop_size=spec["crop"],
        lr=1e-3,
        loss=spec["loss"],
        loss_options=dict(spec["loss_options"]),
        device="cpu",
        val_fraction=0.0,
        freeze_batchnorm=True,
        seed=3,
    )
    ctx = _ddp.init_from_env("cpu")
    # 1. gradients of step 0 (DDP averages the network's, _ddp.average_gradients the loss's)
    data = training._prepare_data(pairs, bundle, cfg, None, None)
    work = copy.deepcopy(bundle)
    run = training._Run(work, data, cfg, torch.device("cpu"), ctx)
    x, y = run.batch(0)
    loss, _ = run.forward_loss(x, y)
    run.backward(loss)
    grads = {n: p.grad.detach().numpy().copy() for n, p in run.net.named_parameters()}
    for n, p in run.loss_fn.named_parameters():
        grads[f"loss.{n}"] = p.grad.detach().numpy().copy()
    # 2. a short training run
    result = training.train(pairs, bundle, cfg)
    if ctx.is_main:
        np.savez(out / f"grads_{case}_{tag}.npz", **grads)
        save_model(result.bundle, out / f"model_{case}_{tag}.safetensors")
        steps = [r for r in result.history if 0 < r.step and r.loss == r.loss]
        (out / f"losses_{case}_{tag}.txt").write_text("\n".join(repr(r.loss) for r in steps))
        # The loss's learnable weights after the run (MASL logs them with every step).
        weights = {k: v for k, v in steps[-1].components.items() if k.startswith("w_")}
        np.savez(out / f"lossweights_{case}_{tag}.npz", **weights)
    ctx.barrier()
    _ddp.cleanup(ctx)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_process_ddp_matches_single_process(tmp_path: Path, case: str) -> None:

    from napari_s2mnet.checkpoint import load_model

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        __file__,
        str(tmp_path),
        case,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    _experiment(tmp_path, PER_RANK_BATCH * WORLD, "single", case)

    ddp_grads = np.load(tmp_path / f"grads_{case}_ddp.npz")
    single_grads = np.load(tmp_path / f"grads_{case}_single.npz")
    assert set(ddp_grads.files) == set(single_grads.files)
    scale = max(float(np.abs(single_grads[k]).max()) for k in single_grads.files)
    assert scale > 0
    for k in single_grads.files:
        np.testing.assert_allclose(
            ddp_grads[k], single_grads[k], rtol=1e-4, atol=1e-6 * scale, err_msg=k
        )

    ddp_losses = (tmp_path / f"losses_{case}_ddp.txt").read_text().split()
    single_losses = (tmp_path / f"losses_{case}_single.txt").read_text().split()
    assert len(ddp_losses) == len(single_losses) == STEPS
    np.testing.assert_allclose(
        np.array(ddp_losses, float), np.array(single_losses, float), rtol=1e-4
    )

    a = load_model(tmp_path / f"model_{case}_ddp.safetensors")
    b = load_model(tmp_path / f"model_{case}_single.safetensors")
    assert a.metadata["history"][0]["world_size"] == WORLD
    assert b.metadata["history"][0]["steps"] == STEPS
    # Gradients and losses above match to rtol 1e-4. After 4 Adam steps (lr 1e-3) the float
    # rounding of the batch-size-dependent DFT matmuls shows as <= 3e-5 on almost every weight,
    # far below the >= 1e-3 the weights move. Adam divides by sqrt(v), so an element whose
    # gradient nearly cancels turns rounding noise into a step of up to lr: measured, 2 of
    # 235,936 S2M-Net weights differ by 1.2e-4. So: every element within the 4 * lr Adam can
    # move it, and all but a 1e-4 fraction within 1e-4.
    lr, n_off, n_all = 1e-3, 0, 0
    for (k, va), vb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        if va.is_floating_point():
            diff = (va - vb).abs()
            assert float(diff.max()) <= STEPS * lr, (k, float(diff.max()))
            n_off += int((diff > 1e-4 + 1e-4 * vb.abs()).sum())
            n_all += diff.numel()
    assert n_off <= 1e-4 * n_all, (n_off, n_all)
    # the runs really trained: the weights moved far beyond the tolerance
    init = _bundle(case)
    moved = max(
        float((p0 - p1).detach().abs().max())
        for p0, p1 in zip(init.model.parameters(), b.model.parameters(), strict=True)
    )
    assert moved > 1e-3

    ddp_w = np.load(tmp_path / f"lossweights_{case}_ddp.npz")
    single_w = np.load(tmp_path / f"lossweights_{case}_single.npz")
    assert set(ddp_w.files) == set(single_w.files)
    if CASES[case]["loss"] == "masl":
        assert len(single_w.files) == 5 and any(k.startswith("loss.") for k in single_grads.files)
        w = np.array([float(single_w[k]) for k in sorted(single_w.files)])
        w_ddp = np.array([float(ddp_w[k]) for k in sorted(single_w.files)])
        np.testing.assert_allclose(w_ddp, w, rtol=1e-5)
        # the learnable weights were trained (initial weights 1, 1, 1, 0.5, 0.5)
        assert np.abs(w - [1.0, 1.0, 0.5, 1.0, 0.5]).max() > 1e-4


if __name__ == "__main__":  # a rank of the torchrun launch above
    _experiment(Path(sys.argv[1]), PER_RANK_BATCH, "ddp", sys.argv[2])
