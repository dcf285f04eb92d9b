"""Every registered architecture works everywhere a model works: checkpoint, inference, fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_s2mnet.checkpoint import load_model, new_model, save_model
from napari_s2mnet.inference import InferenceConfig, segment
from napari_s2mnet.model import ModelConfig, available_models
from napari_s2mnet.training import FinetuneConfig, train

SMALL = {
    "s2mnet": {"widths": [8, 8, 16, 16, 16], "stem": 8, "expansion": 2},
    "unet": {"base": 4, "depth": 3},
    "dssau": {
        "widths": [16, 16, 32, 32],
        "depths": [1, 1, 1, 1],
        "decoder_channels": 16,
        "decoder_depths": [1, 1, 1, 1],
        "head_dim": 16,
    },
}


def test_all_architectures_are_registered():
    assert {"s2mnet", "unet", "dssau"} <= set(available_models())


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_checkpoint_inference_and_finetune(arch, tmp_path, dsb2018_quadrants):
    torch.manual_seed(0)
    bundle = new_model(ModelConfig(arch=arch, in_channels=1, options=SMALL[arch]))
    path = save_model(bundle, tmp_path / f"{arch}.safetensors")
    loaded = load_model(path)
    assert loaded.config.arch == arch
    img, gt = dsb2018_quadrants[0]
    crop, gt_crop = img[:96, :128], gt[:96, :128]
    labels, features = segment(crop, loaded, InferenceConfig(tile_size=64, device="cpu"))
    assert labels.shape == crop.shape and len(features) == len(np.unique(labels)) - 1
    result = train(
        [(crop, gt_crop)],
        loaded,
        FinetuneConfig(
            epochs=1,
            steps_per_epoch=2,
            batch_size=2,
            crop_size=64,
            val_fraction=0.0,
            device="cpu",
            loss="dicebce",
        ),
    )
    assert result.steps == 2
    assert result.bundle.config.arch == arch
    assert result.bundle.metadata["history"]
