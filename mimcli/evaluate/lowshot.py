"""Low-shot evaluation (METHOD §1.5): class-balanced few-shot splits of the train features and an
L2-regularised multinomial logistic regression on centred + L2-normalised features, trained to
convergence with LBFGS; mean and spread of val accuracy over seeded splits.

Regularisation: an explicit ``l2`` is used as given. Otherwise it is chosen per split by
cross-validation on that split's own images (class-stratified folds, at most ``CV_FOLDS``), over
``L2_GRID``. A 1-shot split leaves nothing to validate on, so it uses the fixed ``ONE_SHOT_L2``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimcli.errors import MimcliError
from mimcli.evaluate.splits import NamedSplit, check_split_names, shot_name, split_for
from mimcli.evaluate.stats import pack
from mimcli.runtime import Progress, torch_threads

Array = torch.Tensor | np.ndarray

SHOTS: tuple[float, ...] = (1, 2, 5, 0.01)
SEEDS: tuple[int, ...] = (0, 1, 2)
# Strength of the penalty l2/2·||W||² next to the *mean* cross-entropy; log-spaced 1e-4 … 1e1.
L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# 1-shot: no image is left to validate on. 1e-2 sits mid-grid; 1-shot accuracy barely depends on
# it (tiny MAE on Fashion-MNIST, 5 splits: within 0.6 points over 1e-5 … 1e1, best at 1e-2).
ONE_SHOT_L2 = 1e-2
CV_FOLDS = 5
VAL_CHUNK = 16_384
# Below this many multiply-adds per logits product, fit on one thread: OpenMP fork/join costs more
# than it saves on such small matrices (4x slower with 2 threads on 2 busy cores, 60k x 128 set).
SINGLE_THREAD_WORK = 1 << 24


def _as_tensor(x: Array) -> torch.Tensor:
    """A CPU tensor view of ``x`` (read-only arrays, e.g. memmaps, are copied first)."""
    if torch.is_tensor(x):
        return x.detach().cpu()
    array = np.asarray(x)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def prepare(train_x: Array, *others: Array) -> list[torch.Tensor]:
    """Centre with the mean of ``train_x``, then L2-normalise every row.

    Args:
        train_x: (M, D) few-shot train features; their mean is the centre.
        others: further (Q, D) arrays centred with the same mean.

    Returns:
        [train, *others] as float64 CPU tensors.
    """
    train = _as_tensor(train_x).to(torch.float64)
    mean = train.mean(dim=0)
    return [_centre_normalise(x, mean) for x in (train, *others)]


def _centre_normalise(x: Array, mean: torch.Tensor) -> torch.Tensor:
    return F.normalize(_as_tensor(x).to(torch.float64) - mean, dim=1)


def _loss_and_grad(
    theta: torch.Tensor, x1: torch.Tensor, y: torch.Tensor, onehot: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective and its analytic gradient; ``theta`` is (C, D+1) = [W | b], ``x1`` is [x | 1]."""
    logits = x1 @ theta.T
    log_norm = torch.logsumexp(logits, dim=1)
    weight = theta[:, :-1]
    loss = (log_norm - logits.gather(1, y[:, None])[:, 0]).mean() + 0.5 * l2 * weight.pow(2).sum()
    residual = (torch.exp(logits - log_norm[:, None]) - onehot) / x1.shape[0]
    grad = residual.T @ x1
    grad[:, :-1] += l2 * weight
    return loss, grad


def logistic_regression(
    train_x: Array,
    train_y: Array,
    num_classes: int,
    l2: float,
    max_iter: int = 1000,
    tolerance: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised multinomial logistic regression, full-batch LBFGS in float64 on CPU.

    Minimises ``mean_i CE(x_i W^T + b, y_i) + l2/2 · ||W||²`` (the bias is not penalised) from
    zero with a strong-Wolfe line search until the largest gradient entry is below ``tolerance``
    (or ``max_iter`` iterations; 1e-7 is well past the point where predictions change, and 1e-9
    costs 3x the time). This is scikit-learn's ``LogisticRegression(C=1/(N·l2))`` objective
    divided by ``C·N``. The gradient is written out (no autograd): it halves the time per step.

    Args:
        train_x: (N, D) features (prepare them first, see :func:`prepare`).
        train_y: (N,) integer labels in [0, num_classes).
        l2: penalty strength, > 0.
        tolerance: stop once every gradient entry is at most this.

    Returns:
        (W, b): (C, D) weights and (C,) bias, float64; logits are ``x @ W.T + b``. Starting from
        zero keeps ``sum(b) == 0``: the softmax leaves one constant shift of ``b`` free.
    """
    if not l2 > 0:
        raise MimcliError(f"logistic regression needs an L2 strength > 0, got {l2}")
    x = _as_tensor(train_x).to(torch.float64)
    y = _as_tensor(train_y).long().ravel()
    if y.numel() != x.shape[0] or (y.numel() and (y.min() < 0 or y.max() >= num_classes)):
        raise MimcliError(
            f"logistic regression: labels must be {x.shape[0]} values in [0, {num_classes})"
        )
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    onehot = F.one_hot(y, num_classes).to(torch.float64)
    theta = torch.zeros(num_classes, x.shape[1] + 1, dtype=torch.float64)
    optimizer = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tolerance,
        tolerance_change=1e-15,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        loss, theta.grad = _loss_and_grad(theta, x1, y, onehot, l2)
        return loss

    with _threads_for(x1.numel() * num_classes):
        optimizer.step(closure)
    return theta[:, :-1].clone(), theta[:, -1].clone()


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """Run small problems on one thread; torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if work >= SINGLE_THREAD_WORK or threads == 1:
        yield
        return
    with torch_threads(1):
        yield


def _cv_folds(y: np.ndarray, max_folds: int) -> np.ndarray:
    """Fold id of each image: each class's images dealt round-robin (in index order) to folds."""
    folds = np.empty(y.size, dtype=np.int64)
    min_count = int(np.unique(y, return_counts=True)[1].min())
    n_folds = min(max_folds, min_count)
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        folds[members] = np.arange(members.size) % n_folds
    return folds


def choose_l2(
    train_x: Array,
    train_y: np.ndarray,
    num_classes: int,
    grid: Sequence[float] = L2_GRID,
    max_folds: int = CV_FOLDS,
) -> float:
    """Pick the L2 strength by stratified cross-validation on a few-shot split itself.

    Folds: each class's images are dealt round-robin to ``min(max_folds, smallest class count)``
    folds (2-shot: two folds of 1 image per class; 5-shot: leave one image per class out). Each
    fold is centred with its own training part's mean. Best mean held-out accuracy wins; ties go
    to the lower held-out cross-entropy, then to the stronger penalty. A split with a class of one
    image returns ``ONE_SHOT_L2``.

    Args:
        train_x: (M, D) raw (unprepared) features of the split.
        train_y: (M,) labels.
    """
    y = np.asarray(train_y).ravel()
    if int(np.unique(y, return_counts=True)[1].min()) < 2:
        return ONE_SHOT_L2
    x = _as_tensor(train_x)
    folds = _cv_folds(y, max_folds)
    labels = torch.from_numpy(y).long()
    scores = []
    for l2 in grid:
        correct, loss = 0, 0.0
        for fold in range(int(folds.max()) + 1):
            held = torch.from_numpy(folds == fold)
            fit_x, held_x = prepare(x[~held], x[held])
            weight, bias = logistic_regression(fit_x, labels[~held], num_classes, l2)
            logits = held_x @ weight.T + bias
            correct += int((logits.argmax(dim=1) == labels[held]).sum())
            loss += float(F.cross_entropy(logits, labels[held], reduction="sum"))
        scores.append((-correct, loss, -l2))
    return float(grid[min(range(len(grid)), key=scores.__getitem__)])


def _take(x: Array, indices: np.ndarray) -> torch.Tensor:
    if torch.is_tensor(x):
        return x[torch.from_numpy(indices).to(x.device)].detach().cpu()
    return _as_tensor(x[indices])


def hits(
    val_x: Array, val_y: Array, mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> np.ndarray:
    """Per-query correctness (bool) of ``(W, b)`` on (Q, D) raw val features, prepared with
    ``mean`` (chunk by chunk: the val set is never copied whole at float64)."""
    truth = _as_tensor(val_y).long().ravel()
    parts = []
    for start in range(0, truth.numel(), VAL_CHUNK):
        part = val_x[start : start + VAL_CHUNK]
        logits = _centre_normalise(part, mean) @ weight.T + bias
        parts.append((logits.argmax(dim=1) == truth[start : start + VAL_CHUNK]).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def accuracy(
    val_x: Array, val_y: Array, mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> float:
    """Top-1 accuracy in percent of ``(W, b)`` on (Q, D) raw val features (see :func:`hits`)."""
    correct = hits(val_x, val_y, mean, weight, bias)
    return 100.0 * int(correct.sum()) / correct.size


def lowshot_eval(
    train_feats: Array,
    train_labels: Array,
    val_feats: Array,
    val_labels: Array,
    shots: Sequence[float] = SHOTS,
    seeds: Sequence[int] = SEEDS,
    l2: float | None = None,
    split_dir: Path | None = None,
    num_classes: int | None = None,
    progress: Progress | None = None,
    split_files: Sequence[NamedSplit] = (),
    train_names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Low-shot accuracy for each shot setting, over seeded splits.

    For every (shots, seed): the split (read from ``split_dir`` when its file is there, else drawn
    and, with ``split_dir``, saved), features centred with the split's mean and L2-normalised, a
    logistic regression fitted (``l2`` as given, or :func:`choose_l2`), accuracy on all val images.

    Args:
        train_feats: (N, D) train features (numpy, memmap or tensor; only the split rows are read).
        train_labels: (N,) labels.
        val_feats: (Q, D) val features; val_labels: (Q,) labels.
        split_dir: folder of split files (``5shot-seed0.json``, ``1pct-seed1.json``, …).
        num_classes: defaults to 1 + the largest train or val label.
        progress: called as ``progress("lowshot", splits_done, splits_total)``.
        split_files: subsets read from ``--split-file``s, each fitted and scored the same way
            once, after the seeded settings.
        train_names: (N,) relative paths of the train images; with ``split_dir``, each seeded
            split is also written there as a split file (``5shot-seed0.txt``).

    Returns:
        ``{"1-shot": {"mean": %, "std": % (sample std over seeds, 0 for one seed),
        "runs": [% per seed], "seeds": [...], "l2": [strength per seed],
        "l2_rule": "given" | "fixed 1-shot default" | "cv"}, ..., "1%": {...}}``, then one entry
        per split file under its name: ``{"mean": %, "std": 0, "runs": [%], "seeds": [],
        "l2": [strength], "l2_rule": ..., "split_file": path, "images": M, "classes": count}``.
    """
    y_train = _as_tensor(train_labels).long().ravel().numpy()
    y_val = _as_tensor(val_labels).long().ravel()
    if train_feats.shape[0] != y_train.size or val_feats.shape[0] != y_val.numel():
        raise MimcliError("low-shot: features and labels differ in length")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise MimcliError(
            f"low-shot: train features have {train_feats.shape[1]} dimensions, "
            f"val features {val_feats.shape[1]}"
        )
    if num_classes is None:
        num_classes = int(max(y_train.max(), int(y_val.max()))) + 1
    check_split_names(
        [s.name for s in split_files], [s.path for s in split_files], [shot_name(s) for s in shots]
    )
    results: dict[str, dict[str, Any]] = {}
    total = len(shots) * len(seeds) + len(split_files)
    done = 0
    if progress is not None:
        progress("lowshot", 0, total)

    def score(indices: np.ndarray) -> tuple[float, float, str, str]:
        """Accuracy, L2 strength and its rule of a fit on the train images at ``indices``, and
        its per-query correctness (packed, for paired tests between models)."""
        nonlocal done
        subset = _take(train_feats, indices)
        subset_y = y_train[indices]
        if l2 is not None:
            strength, rule = float(l2), "given"
        elif int(np.unique(subset_y, return_counts=True)[1].min()) < 2:
            strength, rule = ONE_SHOT_L2, "fixed 1-shot default"
        else:
            strength, rule = choose_l2(subset, subset_y, num_classes), "cv"
        fit_x = prepare(subset)[0]
        weight, bias = logistic_regression(fit_x, torch.from_numpy(subset_y), num_classes, strength)
        mean = subset.to(torch.float64).mean(dim=0)
        correct = hits(val_feats, y_val, mean, weight, bias)
        acc = 100.0 * int(correct.sum()) / correct.size
        done += 1
        if progress is not None:
            progress("lowshot", done, total)
        return acc, strength, rule, pack(correct)

    for setting in shots:
        runs, strengths, rules, packed = [], [], set(), []
        for seed in seeds:
            split = split_for(y_train, setting, seed, split_dir, train_names)
            acc, strength, rule, correct = score(split)
            runs.append(acc)
            strengths.append(strength)
            rules.add(rule)
            packed.append(correct)
        results[shot_name(setting)] = {
            "mean": float(np.mean(runs)),
            "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
            "runs": runs,
            "seeds": [int(s) for s in seeds],
            "l2": strengths,
            "l2_rule": " + ".join(sorted(rules)),
            "correct": packed,
        }
    for split in split_files:
        acc, strength, rule, correct = score(split.indices)
        results[split.name] = {
            "correct": [correct],
            "mean": acc,
            "std": 0.0,
            "runs": [acc],
            "seeds": [],
            "l2": [strength],
            "l2_rule": rule,
            "split_file": split.path,
            "images": int(split.indices.size),
            "classes": int(np.unique(y_train[split.indices]).size),
        }
    return results
