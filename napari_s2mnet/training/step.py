"""One run's mechanics: :class:`_Run` holds the network, loss, optimiser and sampler and does a
step (batch, forward + loss, backward, clip + step), validation, and the snapshot / restore that
the divergence guard and resume share. :mod:`napari_s2mnet.training.loop` drives it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_s2mnet.checkpoint import ModelBundle
from napari_s2mnet.training.config import (
    FinetuneConfig,
)
from napari_s2mnet.training.data import _Data
from napari_s2mnet.training.metrics import (
    _evaluate,
    _evaluate_sets,
    _spread_subset,
    _val_tiles,
    region_masks,
    region_tiles,
)
from napari_s2mnet.training.region import apply_scope, region_loss
from napari_s2mnet.training.sampler import _Sampler, _window

# Batch-norm recalibration forwards at most this many pixels (~10 tiles of 224^2, ~2-3 s on
# one CPU thread): enough pixels for per-channel statistics, a small share of a 60-s budget.
BN_MAX_PIXELS = 524_288

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from napari_s2mnet._ddp import DistContext


def _make_loss(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    """The criterion (a separate function so tests can substitute one)."""
    from napari_s2mnet.losses import build_loss

    return build_loss(name, num_classes, **options)


def _set_bn_eval(net: nn.Module) -> None:
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Run:
    """State of one run; :func:`finetune` drives it. Also used by the data-parallel tests."""

    def __init__(
        self,
        bundle: ModelBundle,
        data: _Data,
        config: FinetuneConfig,
        device: torch.device,
        ctx: DistContext,
    ) -> None:
        import torch

        from napari_s2mnet import _ddp
        from napari_s2mnet.devices import supports_amp

        self.cfg = config
        self.device = device
        self.ctx = ctx
        self.data = data
        self.num_classes = bundle.config.num_classes
        self.threshold = bundle.threshold
        self.amp = bool(config.amp and supports_amp(device))
        torch.manual_seed(config.seed + 1000 * ctx.rank)  # dropout differs per rank on purpose
        self.net = bundle.model
        if config.sync_batchnorm and ctx.enabled and device.type == "cuda":
            self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(self.net))
        self.net.to(device)
        self.set_train_mode()
        self.n_trainable = apply_scope(self.net, config.scope)  # before DDP sees the weights
        self.ddp = _ddp.wrap_model(self.net, ctx, device, bundle.config.in_channels)
        self.loss_fn = _make_loss(config.loss, self.num_classes, dict(config.loss_options))
        self.instance_head = bool(getattr(bundle.config, "instance_head", False))
        if self.instance_head:  # the foreground keeps its loss; boundary + distance are added
            from napari_s2mnet.losses.instance import InstanceHeadLoss

            self.loss_fn = InstanceHeadLoss(self.loss_fn)
        self.loss_fn.to(device)
        self.loss_fn.train()
        decay, no_decay = [], []
        for p in self.net.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if self.loss_params:  # MASL's learnable weights: optimised, never decayed
            groups.append({"params": self.loss_params, "weight_decay": 0.0})
        self.opt = torch.optim.Adam(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.sampler = _Sampler(data, config)
        # Validate on tiles of the size the model will segment with (its first training crop).
        tile = bundle.trained_tile_size or config.crop_size
        self.tile = tile
        self.val_tiles = _val_tiles(data.val, tile) if data.val else []
        self.val_masks: list[np.ndarray] | None = None
        self.region_tiles: list[tuple[int, int, int, int, int, int]] = []
        if data.corrected:  # corrected regions only: the rest is the model's own output
            self.val_tiles = region_tiles(data.val, held_out=True)
            self.val_masks = region_masks(data.val, held_out=True)
            self.region_tiles = region_tiles(data.train, held_out=False)
            self.region_masks = region_masks(data.train, held_out=False)

    def set_train_mode(self) -> None:
        self.net.train()
        if self.cfg.freeze_batchnorm:
            _set_bn_eval(self.net)

    def recalibrate_batchnorm(self) -> int:
        """Recompute every batch-norm layer's running statistics from the training images.

        Training updates them from its own crops (centred on the corrections, augmented, two
        per step), so the returned model would keep the average of the last few crops. Here an
        evenly spread subset of the whole images' grid tiles (every tile taken at the training
        tile size, with image or mirrored context where a tile is smaller: that is what the
        network normalised during training) goes through the network once, without
        augmentation, and each layer's mean and variance are pooled over every pixel of every
        tile (averaging per-tile variances instead would drop the variance between tiles).
        Returns the number of tiles used (0 without batch-norm layers).
        """
        import torch
        from torch import nn

        bns = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return 0
        t = self.tile
        tiles = [(i, s, y0, x0, t, t) for i, s, y0, x0, _, _ in _val_tiles(self.data.train, t)]
        tiles = _spread_subset(tiles, BN_MAX_PIXELS)
        sums: dict[nn.Module, list[Any]] = {m: [0.0, 0.0, 0] for m in bns}

        def pool(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            acc = sums[module]
            acc[0] = acc[0] + x.sum(dim=(0, 2, 3))
            acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3))
            acc[2] += x.numel() // x.shape[1]

        hooks = [m.register_forward_pre_hook(pool) for m in bns]
        self.net.train()  # downstream layers see batch-normalised features, as in training
        try:
            with torch.no_grad():
                for i, s, y0, x0, h, w in tiles:
                    img = _window(self.data.train[i].image[s], y0, x0, h, w)
                    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
                    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                        self.net(x.to(self.device))
        finally:
            for h in hooks:
                h.remove()
            self.set_train_mode()
        for m, (total, squares, n) in sums.items():
            mean = total / n
            var = (squares / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
        return len(tiles)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the batch of ``step`` as tensors on the device."""
        return self.batch_weighted(step)[:2]

    def batch_weighted(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`batch` plus the loss weights of corrected regions (``None`` without)."""
        import torch

        b = self.cfg.batch_size
        arrays = self.sampler.batch(step, self.ctx.rank * b, b)
        x, y = arrays[0], arrays[1]
        wt = torch.from_numpy(arrays[2]).to(self.device) if len(arrays) > 2 else None
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        if self.instance_head:
            from napari_s2mnet.instances import instance_target_batch

            yt = torch.from_numpy(instance_target_batch(y)).to(self.device)
        elif self.num_classes == 1:
            yt = torch.from_numpy(y.astype(np.float32))[:, None].to(self.device)
        else:
            yt = torch.from_numpy(y.astype(np.int64)).to(self.device)
        return xt, yt, wt

    def forward_loss(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.ddp(x)
        if weight is not None:  # corrections: the loss counts where the user looked
            return (
                region_loss(
                    logits.float(), y, weight, self.num_classes, self.cfg.uncorrected_weight
                ),
                logits.detach(),
            )
        # Losses run in float32 on the logits (MASL's learnable weights never see fp16).
        return self.loss_fn(logits.float(), y), logits.detach()

    def backward(self, loss: torch.Tensor) -> None:
        from napari_s2mnet import _ddp

        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        _ddp.average_gradients(self.loss_params, self.ctx)

    def clip_and_step(self) -> float:
        """Unscale, clip, step, clamp MASL weights; returns the gradient norm before clipping."""
        import torch

        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups[:2] for p in g["params"]]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.scaler.step(self.opt)
        self.scaler.update()
        clamp = getattr(self.loss_fn, "clamp_weights_", None)
        if callable(clamp):
            clamp()
        return norm

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def components(self) -> dict[str, float]:
        """The loss's last components (MASL: components, ``w_*`` weights, ``alpha_*``)."""
        out: dict[str, float] = {}
        for k, v in dict(getattr(self.loss_fn, "last_components", {}) or {}).items():
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        weights = getattr(self.loss_fn, "weight_dict", None)
        if isinstance(weights, dict):
            for k, v in weights.items():
                out.setdefault(f"w_{k}", float(v))
        return out

    def validate(self) -> float | None:
        if not self.val_tiles:
            return None
        dice = _evaluate(
            self.net,
            self.data.val,
            self.val_tiles,
            self.num_classes,
            self.threshold,
            self.device,
            self.ctx,
            self.amp,
            masks=self.val_masks,
        )
        self.set_train_mode()
        return dice

    def corrected_scores(self) -> tuple[float | None, float | None]:
        """Dice on every corrected region (trained on or held out) and on the uncorrected
        pixels around them (the model's own output the user left as it was), from one pass;
        ``(None, None)`` without corrections."""
        if not self.region_tiles:
            return None, None
        corrected, context = _evaluate_sets(
            self.net,
            self.data.train,
            self.region_tiles,
            self.num_classes,
            self.threshold,
            self.device,
            self.ctx,
            self.amp,
            mask_sets=[self.region_masks, [~m for m in self.region_masks]],
        )
        self.set_train_mode()
        return corrected, context

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "opt": copy.deepcopy(self.opt.state_dict()),
            "loss": {k: v.detach().clone() for k, v in self.loss_fn.state_dict().items()},
            "scaler": copy.deepcopy(self.scaler.state_dict()),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self.net.load_state_dict(snap["model"])
        self.opt.load_state_dict(copy.deepcopy(snap["opt"]))
        self.loss_fn.load_state_dict(snap["loss"])
        if snap["scaler"]:
            self.scaler.load_state_dict(snap["scaler"])
