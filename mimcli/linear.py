"""Linear probe on cached frozen features (METHOD §1.5): BatchNorm1d(affine=False) → Linear.

A grid of learning rates × feature sets ({CLS, CLS+mean-patch} × {last block, last 4 blocks}) is
trained in one pass over the cached features; the cell is chosen on a class-stratified 10% of the
train rows held out from fitting, and its val accuracy is reported beside the whole grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimcli.errors import MimcliError
from mimcli.runtime import select_device

Progress = Callable[[str, int, int], None]
LAST_BLOCKS = 4
EVAL_ROWS = 4096


@dataclass
class LinearConfig:
    """Options of the linear probe.

    The optimiser is SGD with momentum 0.9 per cell (weight decay on weights only), from zero
    weights, with a per-step cosine decay of each cell's learning rate from ``lr`` to 0 over
    ``epochs``. BatchNorm puts every input dimension at unit scale, so one absolute lr grid suits
    any feature width; the default grid spans 1e-3 to 1 in half-decades.
    """

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    epochs: int = 20
    batch_size: int = 1024
    weight_decay: float = 0.0
    holdout: float = 0.1
    seed: int = 0
    device: str = "cpu"


def feature_sets(num_blocks: int) -> list[str]:
    """Names of the feature sets for ``num_blocks`` (K) cached blocks, simplest first.

    ``cls`` is the CLS token, ``cls+patch`` CLS concatenated with the mean patch token; ``@last``
    uses the last block, ``@last4`` concatenates the last min(4, K) blocks. With K = 1 the
    ``@last4`` sets would repeat the ``@last`` ones and are left out.
    """
    if num_blocks < 1:
        raise MimcliError("the linear probe needs features of at least one block")
    names = ["cls@last", "cls+patch@last"]
    if num_blocks > 1:
        names += ["cls@last4", "cls+patch@last4"]
    return names


def feature_dim(name: str, num_blocks: int, dim: int) -> int:
    """Input width of feature set ``name`` for K blocks of width D."""
    tokens, blocks = name.split("@")
    per_block = dim * (2 if tokens == "cls+patch" else 1)
    return per_block * (min(LAST_BLOCKS, num_blocks) if blocks == "last4" else 1)


def build_inputs(
    cls: torch.Tensor, patch: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Inputs of each feature set for one minibatch.

    Args:
        cls: (k, B, D) CLS features of the last k blocks, ascending (the last is the last block).
        patch: (k, B, D) mean patch features of the same blocks.
        names: feature set names from :func:`feature_sets`.

    Returns:
        {name: (B, d_set)}; ``@last4`` sets concatenate [cls, patch] block after block.
    """
    inputs = {}
    for name in names:
        tokens, blocks = name.split("@")
        chosen = (
            range(max(0, cls.shape[0] - LAST_BLOCKS), cls.shape[0]) if blocks == "last4" else [-1]
        )
        parts = []
        for b in chosen:
            parts.append(cls[b])
            if tokens == "cls+patch":
                parts.append(patch[b])
        inputs[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return inputs


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified split of row indices into (fit, holdout), both sorted.

    Each class with n ≥ 2 rows gives round(fraction · n) rows to the holdout, at least 1 and at
    most n − 1; a class with a single row stays in fit. Classes are visited in ascending order,
    each drawing a permutation from one ``np.random.default_rng(seed)``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.append(rng.permutation(rows)[:count])
    holdout = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    fit = np.setdiff1d(np.arange(len(labels)), holdout)
    return fit, holdout


def epoch_batches(rows: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Minibatches of one epoch: a seeded shuffle of ``rows`` in max(1, n // batch_size) nearly
    equal chunks (no row dropped, no tiny last batch for BatchNorm), each sorted so that reads
    from a memory map go forward."""
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    return [np.sort(b) for b in np.array_split(order, max(1, len(rows) // batch_size))]


def cosine_lr(base: float, step: int, total: int) -> float:
    """Learning rate at ``step`` of ``total``: cosine decay from ``base`` to 0."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _read_rows(
    cls: np.ndarray, patch: np.ndarray, rows: np.ndarray | slice, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, B, D) float32 tensors of the last k ≤ 4 blocks for ``rows``; only these are copied."""
    first = max(0, cls.shape[0] - LAST_BLOCKS)
    out = []
    for array in (cls, patch):
        part = torch.from_numpy(np.ascontiguousarray(array[first:, rows])).to(device)
        part = part.float()
        if not torch.isfinite(part).all():
            raise MimcliError(
                "the cached features hold NaN or inf values (float16 overflow?); re-extract them "
                "with float32 features"
            )
        out.append(part)
    return out[0], out[1]


def _check_split(name: str, cls: Any, patch: Any, labels: Any, num_classes: int) -> np.ndarray:
    if cls.ndim != 3 or patch.ndim != 3:
        raise MimcliError(
            f"{name} features must be (K, N, D) arrays, got {cls.shape}, {patch.shape}"
        )
    if cls.shape != patch.shape:
        raise MimcliError(
            f"{name} CLS features {cls.shape} and patch features {patch.shape} differ"
        )
    labels = np.asarray(labels)
    if labels.shape != (cls.shape[1],):
        raise MimcliError(
            f"{name} has {cls.shape[1]} feature rows but labels of shape {labels.shape}"
        )
    if len(labels) == 0:
        raise MimcliError(f"{name} set is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise MimcliError(
            f"{name} labels must lie in [0, {num_classes}); found {labels.min()}..{labels.max()} "
            "(unlabelled images cannot be probed)"
        )
    return labels.astype(np.int64)


def _accuracy(
    norms: dict[str, nn.BatchNorm1d],
    heads: dict[str, list[nn.Linear]],
    cls: np.ndarray,
    patch: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
) -> dict[str, list[int]]:
    """Correct predictions per cell, {set: [count per lr]}, on ``rows`` read in chunks."""
    correct = {name: [0] * len(cells) for name, cells in heads.items()}
    target_all = torch.from_numpy(labels)
    for start in range(0, len(rows), EVAL_ROWS):
        chunk = rows[start : start + EVAL_ROWS]
        inputs = build_inputs(*_read_rows(cls, patch, chunk, device), list(heads))
        target = target_all[chunk].to(device)
        for name, cells in heads.items():
            z = norms[name](inputs[name])
            for i, head in enumerate(cells):
                correct[name][i] += int((head(z).argmax(dim=1) == target).sum())
    return correct


def linear_probe(
    train_cls: np.ndarray,
    train_patch: np.ndarray,
    train_labels: np.ndarray,
    val_cls: np.ndarray,
    val_patch: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    cfg: LinearConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the grid of linear probes together and report the cell chosen on the holdout.

    Args:
        train_cls, train_patch: (K, N, D) CLS / mean-patch features of the last K blocks,
            ascending; float16 memory maps are fine (only minibatches are read, as float32).
        train_labels: (N,) int64 labels in [0, num_classes).
        val_cls, val_patch, val_labels: the same for the M val rows; never used for the choice.
        num_classes: C.
        cfg: options; defaults to ``LinearConfig()``.
        progress: called as ``progress("train", epoch, epochs)`` after each epoch.

    Returns:
        {"best": {"features", "lr", "holdout_acc", "val_acc"}, "grid": [same keys per cell],
        "epochs", "notes": [str]}; accuracies in percent. The best cell has the highest holdout
        accuracy; ties go to the smaller lr, then to the earlier set of :func:`feature_sets`.
    """
    cfg = cfg or LinearConfig()
    if num_classes < 2:
        raise MimcliError("the linear probe needs at least 2 classes")
    if not cfg.lrs or min(cfg.lrs) <= 0 or cfg.epochs < 1 or cfg.batch_size < 2:
        raise MimcliError("linear probe: lrs must be positive, epochs ≥ 1 and batch size ≥ 2")
    if not 0.0 < cfg.holdout < 1.0:
        raise MimcliError(f"linear probe: holdout must lie in (0, 1), got {cfg.holdout}")
    train_labels = _check_split("train", train_cls, train_patch, train_labels, num_classes)
    val_labels = _check_split("val", val_cls, val_patch, val_labels, num_classes)
    if train_cls.shape[0] != val_cls.shape[0] or train_cls.shape[2] != val_cls.shape[2]:
        raise MimcliError(f"train features {train_cls.shape} and val {val_cls.shape} do not match")
    device = select_device(cfg.device)
    num_blocks, _, dim = train_cls.shape
    lrs = sorted(cfg.lrs)
    fit, holdout = holdout_split(train_labels, cfg.holdout, cfg.seed)
    if len(holdout) == 0 or len(fit) < 2:
        raise MimcliError("linear probe: too few train rows per class for a holdout split")

    # One cell per (set, lr). BatchNorm(affine=False) has no parameters and its statistics depend
    # only on the inputs, so the cells of one set share it exactly; each lr gets its own Linear.
    names = feature_sets(num_blocks)
    norms = {n: nn.BatchNorm1d(feature_dim(n, num_blocks, dim), affine=False) for n in names}
    heads = {n: [nn.Linear(norms[n].num_features, num_classes) for _ in lrs] for n in names}
    groups = []
    for cells in heads.values():
        for lr, head in zip(lrs, cells, strict=True):
            nn.init.zeros_(head.weight)  # the problem is convex; zeros need no random draw
            nn.init.zeros_(head.bias)
            groups.append(
                {"params": [head.weight], "base_lr": lr, "weight_decay": cfg.weight_decay}
            )
            groups.append({"params": [head.bias], "base_lr": lr, "weight_decay": 0.0})
    for module in [*norms.values(), *(h for cells in heads.values() for h in cells)]:
        module.to(device)
    optimizer = torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)
    diverged: set[tuple[str, int]] = set()
    labels_t = torch.from_numpy(train_labels)

    steps_per_epoch = len(epoch_batches(fit, cfg.batch_size, cfg.seed, 0))
    total = steps_per_epoch * cfg.epochs
    step = 0
    for epoch in range(cfg.epochs):
        for norm in norms.values():
            norm.train()
        for rows in epoch_batches(fit, cfg.batch_size, cfg.seed, epoch):
            # schedule: every cell's lr on the same cosine curve
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(group["base_lr"], step, total)
            # forward: each set's input built once, normalised once, fed to every lr's Linear
            inputs = build_inputs(*_read_rows(train_cls, train_patch, rows, device), names)
            target = labels_t[rows].to(device)
            loss = torch.zeros((), device=device)
            for name in names:
                z = norms[name](inputs[name])
                for i, head in enumerate(heads[name]):
                    if (name, i) in diverged:
                        continue
                    cell_loss = F.cross_entropy(head(z), target)
                    if not torch.isfinite(cell_loss):
                        diverged.add((name, i))  # stop stepping it; it cannot be chosen
                        head.weight.requires_grad_(False)
                        head.bias.requires_grad_(False)
                        continue
                    loss = loss + cell_loss  # each cell's gradient is its own loss's
            # backward / step
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                optimizer.step()
            step += 1
        if progress is not None:
            progress("train", epoch + 1, cfg.epochs)

    for norm in norms.values():
        norm.eval()
    with torch.no_grad():
        held = _accuracy(norms, heads, train_cls, train_patch, train_labels, holdout, device)
        seen = _accuracy(
            norms, heads, val_cls, val_patch, val_labels, np.arange(len(val_labels)), device
        )

    grid, best, best_key = [], None, None
    for rank, name in enumerate(names):
        for i, lr in enumerate(lrs):
            cell = {
                "features": name,
                "lr": lr,
                "holdout_acc": 100.0 * held[name][i] / len(holdout),
                "val_acc": 100.0 * seen[name][i] / len(val_labels),
            }
            grid.append(cell)
            key = (-held[name][i], i, rank)  # most correct, then smaller lr, then simpler set
            if (name, i) not in diverged and (best_key is None or key < best_key):
                best, best_key = cell, key
    if best is None:
        raise MimcliError("linear probe: every cell diverged (non-finite loss); lower the lrs")

    notes = [
        f"SGD momentum 0.9, cosine lr to 0 over {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"weight decay {cfg.weight_decay}; chosen on {len(holdout)} held-out train rows "
        f"({cfg.holdout:.0%}, class-stratified, seed {cfg.seed}), trained on {len(fit)}"
    ]
    if 1 < num_blocks < LAST_BLOCKS:
        notes.append(f"only {num_blocks} blocks cached: the @last4 sets use the last {num_blocks}")
    elif num_blocks == 1:
        notes.append("only 1 block cached: the @last4 sets are left out")
    for name, i in sorted(diverged):
        notes.append(f"{name} at lr {lrs[i]:g} diverged (non-finite loss) and was not chosen")
    return {"best": best, "grid": grid, "epochs": cfg.epochs, "notes": notes}
