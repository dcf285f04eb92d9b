"""What a finished run says about itself: the plain-words summary and the model file's metadata
(provenance: parent model, data, settings, scores)."""

from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from napari_s2mnet.training.config import (
    FinetuneConfig,
)
from napari_s2mnet.training.data import _Data

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_s2mnet._ddp import DistContext


def _summary(
    reason: str,
    steps: int,
    best: float | None,
    init: float | None,
    best_step: int,
    elapsed: float,
    data: _Data,
) -> str:
    text = f"{reason}: {steps} steps in {elapsed:.0f} s"
    if best is None:
        return text + f"; {data.split}"
    text += f"; validation Dice {init:.3f} -> {best:.3f} (best at step {best_step})"
    if best_step == 0 and steps > 0:
        text += "; fine-tuning did not improve on the starting model, which is kept"
    return text


def _result_metadata(
    parent_meta: dict[str, Any],
    parent: str,
    config: FinetuneConfig,
    data: _Data,
    steps: int,
    best_step: int,
    best_val: float | None,
    init_val: float | None,
    reason: str,
    elapsed: float,
    device: torch.device,
    ctx: DistContext,
) -> dict[str, Any]:
    meta = copy.deepcopy(parent_meta)
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    base = str(meta.get("name", "model")).removesuffix(" (untrained)")
    meta["name"] = base if base.endswith("(fine-tuned)") else f"{base} (fine-tuned)"
    meta["created"] = now
    meta["parent"] = parent
    entry = {
        "date": now,
        "steps": steps,
        "best_step": best_step,
        "loss": config.loss,
        "n_images": len(data.info),
        "n_objects": data.n_objects,
        "best_val_dice": best_val,
        "initial_val_dice": init_val,
        "validation": data.split,
        "stopped_reason": reason,
        "seconds": round(elapsed, 2),
        "device": str(device),
        "world_size": ctx.world_size,
        "parent": parent,
        "config": {k: v for k, v in asdict(config).items() if k not in ("device",)},
        "data": data.info,
    }
    meta["history"] = [*list(meta.get("history", []) or []), entry]
    meta["trained_on"] = int(sum(int(h.get("n_images", 0)) for h in meta["history"]))
    metrics = dict(meta.get("metrics", {}) or {})
    if best_val is not None:
        metrics["val_dice"] = best_val
    meta["metrics"] = metrics
    meta["data"] = data.info
    return meta
