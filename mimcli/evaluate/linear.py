"""Linear probe on cached frozen features (METHOD §1.5): BatchNorm1d(affine=False) → Linear.

A grid of learning rates × feature sets ({CLS, CLS+mean-patch} × {last block, last 4 blocks}) is
trained in one pass over the cached features; the cell is chosen on a class-stratified 10% of the
train rows held out from fitting, and its val accuracy is reported beside the whole grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mimcli.errors import MimcliError
from mimcli.evaluate.stats import pack
from mimcli.runtime import Progress, select_device

LAST_BLOCKS = 4


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


def stack_tokens(cls: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """(k, B, D) CLS and mean-patch features of k blocks → (B, k', 2, D) of the last k' = min(4, k)
    blocks, CLS before patch in each block: every dimension any feature set uses, once."""
    first = max(0, cls.shape[0] - LAST_BLOCKS)
    return torch.stack([cls[first:], patch[first:]], dim=2).transpose(0, 1)


def select_sets(tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each feature set's (B, d_set) input from (B, k, 2, D) tokens (see :func:`stack_tokens`).

    ``cls`` takes index 0 of the pair, ``cls+patch`` both; ``@last`` takes the last block,
    ``@last4`` concatenates all k blocks in ascending order, [cls, patch] block after block.
    """
    batch = tokens.shape[0]
    inputs = {}
    for name in names:
        kind, blocks = name.split("@")
        chosen = tokens if blocks == "last4" else tokens[:, -1:]
        inputs[name] = (chosen if kind == "cls+patch" else chosen[:, :, :1]).reshape(batch, -1)
    return inputs


def build_inputs(
    cls: torch.Tensor, patch: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Inputs of each feature set for one minibatch.

    Args:
        cls: (k, B, D) CLS features of the last k blocks, ascending (the last is the last block).
        patch: (k, B, D) mean patch features of the same blocks.
        names: feature set names from :func:`feature_sets`.

    Returns:
        {name: (B, d_set)}, e.g. ``cls+patch@last4`` is [cls_1, patch_1, ..., cls_4, patch_4] of
        the last 4 blocks concatenated, ``cls@last`` the last block's CLS.
    """
    return select_sets(stack_tokens(cls, patch), names)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified split of row indices into (fit, holdout), both sorted.

    Each class with n ≥ 2 rows gives round(fraction · n) rows (half to even) to the holdout, at
    least 1 and at most n − 1; a class with a single row stays in fit. Classes are visited in
    ascending order, each drawing a permutation from one ``np.random.default_rng(seed)``.
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


def _read_tokens(
    cls: np.ndarray, patch: np.ndarray, rows: np.ndarray, device: torch.device
) -> torch.Tensor:
    """(B, k, 2, D) float32 tokens of ``rows`` (as :func:`stack_tokens`); only they are copied."""
    first = max(0, cls.shape[0] - LAST_BLOCKS)
    tokens = np.empty((len(rows), cls.shape[0] - first, 2, cls.shape[2]), dtype=np.float32)
    tokens[:, :, 0] = np.asarray(cls[first:, rows]).transpose(1, 0, 2)
    tokens[:, :, 1] = np.asarray(patch[first:, rows]).transpose(1, 0, 2)
    if not np.isfinite(tokens).all():
        raise MimcliError(
            "the cached features hold NaN or inf values (float16 overflow?); re-extract them "
            "as float32"
        )
    return torch.from_numpy(tokens).to(device)


def _normalized_inputs(
    norm: nn.BatchNorm1d, tokens: torch.Tensor, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """BatchNorm every dimension once, then select each set's (B, d_set) input from the result.

    BatchNorm1d(affine=False) acts on each dimension alone and has no parameters, so normalising
    the union of all sets and then selecting is exactly a separate BatchNorm per cell.
    """
    z = norm(tokens.reshape(tokens.shape[0], -1)).view(tokens.shape)
    return select_sets(z, names)


class _SetCells:
    """The Linear layers of one feature set, one per lr, side by side, with SGD momentum per cell.

    Attributes:
        weight: (d, L, C), zeros at the start (the problem is convex; no random draw needed).
        bias: (L, C).
        active: (L,) False once a cell's loss was non-finite; it is then no longer updated.
    """

    def __init__(self, dim: int, num_classes: int, num_lrs: int, device: torch.device) -> None:
        self.weight = torch.zeros(dim, num_lrs, num_classes, device=device, requires_grad=True)
        self.bias = torch.zeros(num_lrs, num_classes, device=device, requires_grad=True)
        self.weight_momentum = torch.zeros_like(self.weight)
        self.bias_momentum = torch.zeros_like(self.bias)
        self.active = torch.ones(num_lrs, dtype=torch.bool, device=device)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) normalised inputs → (B, L, C) logits of every cell, in one matmul."""
        dim, num_lrs, num_classes = self.weight.shape
        flat = z @ self.weight.view(dim, num_lrs * num_classes)
        return flat.view(-1, num_lrs, num_classes) + self.bias

    def losses(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(L,) mean cross-entropy of each cell on the minibatch; marks non-finite cells."""
        log_probs = self.logits(z).log_softmax(dim=2)  # (B, L, C)
        picked = log_probs.gather(2, target.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1))
        losses = -picked.squeeze(2).mean(dim=0)
        self.active &= torch.isfinite(losses)
        return torch.where(self.active, losses, torch.zeros_like(losses))

    @torch.no_grad()
    def step(self, lrs: torch.Tensor, weight_decay: float, momentum: float = 0.9) -> None:
        """SGD with momentum as torch.optim.SGD does it (buf = m·buf + g; p -= lr·buf), each cell
        at its own lr (L,); weight decay on the weights only."""
        for param, buf, decay, shape in (
            (self.weight, self.weight_momentum, weight_decay, (1, -1, 1)),
            (self.bias, self.bias_momentum, 0.0, (-1, 1)),
        ):
            active = self.active.view(shape)
            grad = torch.where(active, param.grad + decay * param, torch.zeros_like(param))
            buf.mul_(momentum).add_(grad)
            param.sub_(torch.where(active, lrs.view(shape) * buf, torch.zeros_like(param)))
            param.grad = None


def _check_split(name: str, cls: Any, patch: Any, labels: Any, num_classes: int) -> np.ndarray:
    if cls.ndim != 3 or patch.ndim != 3:
        raise MimcliError(
            f"{name} features must be (K, N, D) arrays, got {cls.shape} and {patch.shape}"
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
        raise MimcliError(f"the {name} set is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise MimcliError(
            f"{name} labels must lie in [0, {num_classes}); found {labels.min()}..{labels.max()} "
            "(unlabelled images cannot be probed)"
        )
    return labels.astype(np.int64)


@torch.no_grad()
def _count_correct(
    norm: nn.BatchNorm1d,
    cells: dict[str, _SetCells],
    cls: np.ndarray,
    patch: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    chunk_rows: int,
    device: torch.device,
) -> dict[str, list[int]]:
    """Correct predictions of every cell on ``rows``, {set: [count per lr]}, read in chunks."""
    correct = {name: 0 for name in cells}
    labels_t = torch.from_numpy(labels)
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start : start + chunk_rows]
        inputs = _normalized_inputs(norm, _read_tokens(cls, patch, chunk, device), list(cells))
        target = labels_t[chunk].to(device)
        for name, group in cells.items():
            hits = group.logits(inputs[name]).argmax(dim=2) == target[:, None]  # (B, L)
            correct[name] = correct[name] + hits.sum(dim=0)
    return {name: [int(c) for c in count.cpu()] for name, count in correct.items()}


def _cell_hits(
    norm: nn.BatchNorm1d,
    cells: dict[str, _SetCells],
    name: str,
    index: int,
    cls: np.ndarray,
    patch: np.ndarray,
    labels: np.ndarray,
    chunk_rows: int,
    device: torch.device,
) -> np.ndarray:
    """Per-row correctness (bool) of one cell on every row of ``labels``, in chunks."""
    labels_t = torch.from_numpy(labels)
    out = []
    for start in range(0, len(labels), chunk_rows):
        chunk = np.arange(start, min(len(labels), start + chunk_rows))
        inputs = _normalized_inputs(norm, _read_tokens(cls, patch, chunk, device), [name])
        pred = cells[name].logits(inputs[name]).argmax(dim=2)[:, index]
        out.append((pred.cpu() == labels_t[chunk]).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


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
    keep_best: bool = False,
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
        keep_best: also return the best cell's tensors under "head" (see :func:`best_head`).

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
    fit, holdout = holdout_split(train_labels, cfg.holdout, cfg.seed)
    if len(holdout) == 0 or len(fit) < 2:
        raise MimcliError("linear probe: too few train rows per class for a holdout split")

    # One cell per (set, lr): a shared BatchNorm (exact, see _normalized_inputs) and a Linear
    # per lr, stacked per set so that a minibatch costs one matmul per set.
    names = feature_sets(num_blocks)
    lrs = sorted(set(cfg.lrs))
    base_lrs = torch.tensor(lrs, device=device)
    norm = nn.BatchNorm1d(min(num_blocks, LAST_BLOCKS) * 2 * dim, affine=False).to(device)
    cells = {
        n: _SetCells(feature_dim(n, num_blocks, dim), num_classes, len(lrs), device) for n in names
    }
    labels_t = torch.from_numpy(train_labels)
    total = len(epoch_batches(fit, cfg.batch_size, cfg.seed, 0)) * cfg.epochs
    step = 0
    for epoch in range(cfg.epochs):
        norm.train()
        for rows in epoch_batches(fit, cfg.batch_size, cfg.seed, epoch):
            # schedule: every cell on the same cosine curve, scaled by its own lr
            step_lrs = base_lrs * cosine_lr(1.0, step, total)
            # forward: each set's input built once per minibatch and fed to all its cells
            inputs = _normalized_inputs(
                norm, _read_tokens(train_cls, train_patch, rows, device), names
            )
            target = labels_t[rows].to(device)
            # a sum of the cells' losses gives each cell exactly its own gradient
            loss = sum(cells[n].losses(inputs[n], target).sum() for n in names)
            # backward / step
            loss.backward()
            for group in cells.values():
                group.step(step_lrs, cfg.weight_decay)
            step += 1
        if progress is not None:
            progress("train", epoch + 1, cfg.epochs)

    norm.eval()
    held = _count_correct(
        norm, cells, train_cls, train_patch, train_labels, holdout, cfg.batch_size, device
    )
    val_rows = np.arange(len(val_labels))
    seen = _count_correct(
        norm, cells, val_cls, val_patch, val_labels, val_rows, cfg.batch_size, device
    )

    grid, best, best_key, diverged = [], None, None, []
    for rank, name in enumerate(names):
        active = cells[name].active.tolist()
        for i, lr in enumerate(lrs):
            cell = {
                "features": name,
                "lr": lr,
                "holdout_acc": 100.0 * held[name][i] / len(holdout),
                "val_acc": 100.0 * seen[name][i] / len(val_labels),
            }
            grid.append(cell)
            key = (-held[name][i], i, rank)  # most correct, then smaller lr, then simpler set
            if not active[i]:
                diverged.append(f"{name} at lr {lr:g} diverged (non-finite loss); not chosen")
            elif best_key is None or key < best_key:
                best, best_key = cell, key
    if best is None:
        raise MimcliError("linear probe: every cell diverged (non-finite loss); lower the lrs")

    notes = [
        f"SGD momentum 0.9 from zero weights, cosine lr to 0 over {cfg.epochs} epochs, "
        f"batch {cfg.batch_size}, weight decay {cfg.weight_decay}; trained on {len(fit)} train "
        f"rows, chosen on {len(holdout)} held out ({cfg.holdout:.0%}, class-stratified, "
        f"seed {cfg.seed})"
    ]
    if 1 < num_blocks < LAST_BLOCKS:
        notes.append(f"only {num_blocks} blocks cached: the @last4 sets use the last {num_blocks}")
    elif num_blocks == 1:
        notes.append("only 1 block cached: the @last4 sets are left out")
    i = lrs.index(best["lr"])
    best_hits = _cell_hits(
        norm, cells, best["features"], i, val_cls, val_patch, val_labels, cfg.batch_size, device
    )
    best = {**best, "correct": pack(best_hits)}  # per val image, for paired tests
    out = {"best": best, "grid": grid, "epochs": cfg.epochs, "notes": notes + diverged}
    if keep_best:
        out["head"] = best_head(norm, cells[best["features"]], i, best["features"], num_blocks, dim)
    return out


@torch.no_grad()
def best_head(
    norm: nn.BatchNorm1d, cells: _SetCells, index: int, name: str, num_blocks: int, dim: int
) -> dict[str, Any]:
    """One cell of the grid as plain CPU tensors: its Linear and the BatchNorm running
    statistics of the dimensions its feature set reads.

    Returns:
        {"tensors": {"weight": (C, d), "bias": (C,), "mean": (d,), "var": (d,)}, "eps": float};
        the cell's logits for a (B, d) input x laid out as :func:`select_sets` gives it are
        ``((x - mean) / sqrt(var + eps)) @ weight.T + bias``.
    """
    assert norm.running_mean is not None and norm.running_var is not None
    k = min(num_blocks, LAST_BLOCKS)
    dims = select_sets(torch.arange(k * 2 * dim).view(1, k, 2, dim), [name])[name][0]
    dims = dims.to(norm.running_mean.device)
    tensors = {
        "weight": cells.weight[:, index, :].T,
        "bias": cells.bias[index],
        "mean": norm.running_mean[dims],
        "var": norm.running_var[dims],
    }
    return {
        "tensors": {key: t.detach().float().cpu().contiguous() for key, t in tensors.items()},
        "eps": float(norm.eps),
    }
