"""Data-parallel training: 2 CPU processes (gloo) match one process on the full batch.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node=2``; each
rank computes the gradients of one step on half of the batch and then trains a few steps. One
process with the full batch (``2 x`` the per-rank batch) must give the same averaged gradients
and the same model. Batch norm is kept in eval mode (``freeze_batchnorm``) and the loss is a
per-sample mean (Dice + BCE), so splitting the batch changes nothing mathematically; with
batch-norm statistics in training mode each rank would normalise with its own half batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STEPS = 4
PER_RANK_BATCH = 2
WORLD = 2


def _experiment(out: Path, batch_size: int, tag: str) -> None:
    """One gradient step, then a short run; rank 0 writes gradients and the model to ``out``."""
    import copy

    import torch

    from napari_s2mnet import _ddp, training
    from napari_s2mnet.checkpoint import new_model, save_model
    from napari_s2mnet.model.registry import ModelConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    bundle = new_model(ModelConfig(arch="unet", in_channels=1, options={"base": 4, "depth": 3}))
    rng = np.random.default_rng(0)
    pairs = []
    yy, xx = np.mgrid[:64, :64]
    for _ in range(2):
        lab = np.zeros((64, 64), np.uint16)
        for k in range(1, 6):
            cy, cx, r = rng.integers(8, 56), rng.integers(8, 56), rng.integers(4, 8)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        pairs.append(((lab > 0) * 150.0 + rng.normal(20, 5, lab.shape), lab))
    cfg = training.FinetuneConfig(
        epochs=1, steps_per_epoch=STEPS, batch_size=batch_size, crop_size=32, lr=1e-3,
        loss="dicebce", device="cpu", val_fraction=0.0, freeze_batchnorm=True, seed=3,
    )
    ctx = _ddp.init_from_env("cpu")
    # 1. gradients of step 0 (DDP averages them over the ranks)
    data = training._prepare_data(pairs, bundle, cfg, None, None)
    work = copy.deepcopy(bundle)
    run = training._Run(work, data, cfg, torch.device("cpu"), ctx)
    x, y = run.batch(0)
    loss, _ = run.forward_loss(x, y)
    run.backward(loss)
    grads = {n: p.grad.detach().numpy().copy() for n, p in run.net.named_parameters()}
    # 2. a short training run
    result = training.train(pairs, bundle, cfg)
    if ctx.is_main:
        np.savez(out / f"grads_{tag}.npz", **grads)
        save_model(result.bundle, out / f"model_{tag}.safetensors")
        (out / f"losses_{tag}.txt").write_text(
            "\n".join(repr(r.loss) for r in result.history if 0 < r.step and r.loss == r.loss))
    ctx.barrier()
    _ddp.cleanup(ctx)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    import torch

    from napari_s2mnet.checkpoint import load_model, new_model
    from napari_s2mnet.model.registry import ModelConfig

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    _experiment(tmp_path, PER_RANK_BATCH * WORLD, "single")

    ddp_grads = np.load(tmp_path / "grads_ddp.npz")
    single_grads = np.load(tmp_path / "grads_single.npz")
    assert set(ddp_grads.files) == set(single_grads.files)
    scale = max(float(np.abs(single_grads[k]).max()) for k in single_grads.files)
    assert scale > 0
    for k in single_grads.files:
        np.testing.assert_allclose(ddp_grads[k], single_grads[k], rtol=1e-4, atol=1e-6 * scale,
                                   err_msg=k)

    ddp_losses = (tmp_path / "losses_ddp.txt").read_text().split()
    single_losses = (tmp_path / "losses_single.txt").read_text().split()
    assert len(ddp_losses) == len(single_losses) == STEPS
    np.testing.assert_allclose(np.array(ddp_losses, float), np.array(single_losses, float),
                               rtol=1e-4)

    a = load_model(tmp_path / "model_ddp.safetensors")
    b = load_model(tmp_path / "model_single.safetensors")
    assert a.metadata["history"][0]["world_size"] == WORLD
    assert b.metadata["history"][0]["steps"] == STEPS
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                           strict=True):
        if va.is_floating_point():
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    # the runs really trained: the weights moved far beyond the tolerance
    torch.manual_seed(0)
    init = new_model(ModelConfig(arch="unet", in_channels=1, options={"base": 4, "depth": 3}))
    moved = max(float((p0 - p1).detach().abs().max())
                for p0, p1 in zip(init.model.parameters(), b.model.parameters(), strict=True))
    assert moved > 1e-3


if __name__ == "__main__":  # a rank of the torchrun launch above
    _experiment(Path(sys.argv[1]), PER_RANK_BATCH, "ddp")
