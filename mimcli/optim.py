"""Optimiser parameter groups and schedules for refinement (METHOD §1.4).

AdamW(0.9, 0.95), fused where the device has the kernel (CUDA, CPU, MPS...): one kernel per step,
its step counters kept on the device (the foreach and single-tensor paths read every counter back
to the host: a GPU sync per parameter). Encoder layer-wise lr decay follows the MIM-Refiner
reference (BEiT-style): with L blocks counted from 0, block i gets decay^(L-i) (so the last block
gets ×decay), the stem (patch embedding, tokens, positions, embedding norm) decay^(L+1), the final
norm ×1. timm's ``param_groups_layer_decay`` (checked on timm 1.0.31) gives the last block ×1 and
the stem decay^L, one power less, so we assign layer ids ourselves. No weight decay on biases,
norms and tokens. Heads get their own weight decay. Schedules are pure functions of the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

STEM_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "norm_pre.", "reg_token", "mask_token")


def layer_id(name: str, depth: int) -> int:
    """0 for the stem, i + 1 for ``blocks.i``, depth + 1 for everything after the blocks."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(STEM_PREFIXES):
        return 0
    return depth + 1


def encoder_param_groups(
    encoder: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.65
) -> list[dict]:
    """Trainable encoder parameters grouped by (layer, decay/no decay), each group with
    ``lr_scale`` = layer_decay^(depth + 1 - layer id) and its ``weight_decay``."""
    depth = len(encoder.blocks)  # type: ignore[arg-type]
    no_wd = set(getattr(encoder, "no_weight_decay", lambda: set())())
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decays = param.ndim > 1 and name not in no_wd and not name.endswith(".bias")
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def head_param_groups(heads: nn.Module, weight_decay: float = 1e-5) -> list[dict]:
    """Objective parameters (heads, projectors, decoders): weight decay on matrices only, not on
    norm weights, biases, mask tokens or position tables."""
    decay, no_decay = [], []
    for name, param in heads.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        exempt = param.ndim <= 1 or "token" in leaf or "pos_embed" in leaf
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [g for g in groups if g["params"]]


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters (floating point, on devices with the
    fused kernel)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = list(params)
    return bool(params) and all(
        p.device.type in devices and torch.is_floating_point(p) for p in params
    )


def make_optimizer(groups: Iterable[dict]) -> torch.optim.AdamW:
    """AdamW(0.9, 0.95) over ``groups`` (lr set per step by :func:`apply_lr`), fused where
    supported (:func:`fused_supported`).

    ``load_state_dict`` takes the implementation the state was written with from its param
    groups, as torch does: a checkpoint of a fused optimiser resumes fused, one written before
    AdamW was fused (``fused`` unset) resumes unfused until its stage ends, so its steps repeat
    the arithmetic of the run that wrote it exactly; the next stage's optimiser is fused. A
    fused state loaded where the fused kernel is missing falls back to the unfused path.
    """
    groups = list(groups)
    fused = fused_supported(p for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=fused or None)
    optimizer.register_load_state_dict_post_hook(_fused_only_where_supported)
    return optimizer


def _fused_only_where_supported(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if group.get("fused") and not fused_supported(group["params"]):
            group["fused"] = None
            for p in group["params"]:  # the unfused path counts on the host
                state = optimizer.state.get(p, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to("cpu")


def lr_at(step: int, total: int, peak: float, warmup: int, final: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine to ``final``.

    ``step`` counts from 0; the value is the learning rate used for that step.
    """
    if total <= 0:
        return peak
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lr(base: float, batch_size: int) -> float:
    """The linear scaling rule: base × batch / 256."""
    return base * batch_size / 256
