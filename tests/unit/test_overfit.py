"""Learning works: S2M-Net + MASL overfits one real annotated image (DSB2018 quadrant) on CPU.

BatchNorm uses Keras' momentum (PyTorch 0.01), so after a few dozen steps the running statistics
are still far from the batch statistics (eval-mode Dice ~0.5 although train-mode Dice is ~0.97).
Before measuring in eval mode the statistics are therefore re-estimated on the training image
("precise BN": reset, cumulative average, one forward pass without gradients).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_s2mnet.losses import MASL
from napari_s2mnet.model import ModelConfig, build_model
from napari_s2mnet.preprocess import NormalizationConfig, normalize


def _dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = (logits > 0).float()
    return float(2 * (pred * target).sum() / (pred.sum() + target.sum()).clamp_min(1))


def _recalibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass = the exact batch statistics
    model.train()
    with torch.no_grad():
        model(x)


@pytest.mark.slow
def test_s2mnet_masl_overfits_one_real_image(dsb2018_quadrants) -> None:
    img, mask = dsb2018_quadrants[0]
    torch.manual_seed(0)
    x = torch.from_numpy(normalize(img, NormalizationConfig(), channel_axis=None))[None, None]
    y = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    assert x.shape == (1, 1, 256, 256)

    model = build_model(ModelConfig(arch="s2mnet", in_channels=1, num_classes=1))
    crit = MASL(1)
    opt = torch.optim.Adam([*model.parameters(), *crit.parameters()], lr=2e-3)
    w0 = crit.weights.detach().clone()
    model.train()
    losses = []
    for step in range(40):
        logits = model(x)
        loss = crit(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        crit.clamp_weights_()
        losses.append(loss.item())
        if step >= 20 and _dice(logits.detach(), y) >= 0.97:
            break

    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(crit.weights.detach(), w0)  # MASL's weights trained too

    _recalibrate_batchnorm(model, x)
    model.eval()
    with torch.no_grad():
        dice = _dice(model(x), y)
    assert dice >= 0.95, f"eval-mode Dice {dice:.3f} after {len(losses)} steps"
