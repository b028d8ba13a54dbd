"""Linear probe grid (mimcli.evaluate.linear): known answers on synthetic features, the holdout
choice, float16 memory maps, and one cell against a plain single-cell training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimcli.errors import MimcliError
from mimcli.evaluate.linear import (
    LinearConfig,
    build_inputs,
    feature_dim,
    feature_sets,
    holdout_split,
    linear_probe,
)

C, K, D = 10, 4, 16
FAST = dict(epochs=8, batch_size=128)


@pytest.fixture(autouse=True)
def one_thread():
    """The probe is many tiny tensor ops: a second OpenMP thread only adds waiting, and on a busy
    2-core machine it makes these tests ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_split(n_per_class, signal, rng, means, noise=1.0):
    """(cls, patch, labels) with K blocks of width D; only ``signal`` = (block, "cls"|"patch")
    carries the class (its class mean plus noise), every other feature is pure noise."""
    labels = np.repeat(np.arange(C), n_per_class)
    labels = labels[rng.permutation(len(labels))]
    arrays = {kind: rng.normal(size=(K, len(labels), D)).astype(np.float32) for kind in "cp"}
    block, kind = signal
    arrays[kind[0]][block] = means[labels] + noise * rng.normal(size=(len(labels), D))
    return arrays["c"], arrays["p"], labels


def make_data(signal=(K - 1, "cls"), n_train=100, n_val=50, spread=4.0, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    means = spread * rng.normal(size=(C, D)).astype(np.float32)
    train = make_split(n_train, signal, rng, means, noise)
    val = make_split(n_val, signal, rng, means, noise)
    return train, val


def cell(result, features, lr):
    (match,) = [g for g in result["grid"] if g["features"] == features and g["lr"] == lr]
    return match


def test_feature_sets_and_their_inputs():
    assert feature_sets(4) == ["cls@last", "cls+patch@last", "cls@last4", "cls+patch@last4"]
    assert feature_sets(2) == feature_sets(4)
    assert feature_sets(1) == ["cls@last", "cls+patch@last"]
    # block b's CLS holds 10·b, its patch 10·b + 1, so every column says where it came from
    blocks = 6
    cls = torch.arange(blocks, dtype=torch.float32).mul(10).view(blocks, 1, 1).expand(-1, 3, 2)
    patch = cls + 1
    inputs = build_inputs(cls, patch, feature_sets(blocks))
    assert inputs["cls@last"][0].tolist() == [50, 50]
    assert inputs["cls+patch@last"][0].tolist() == [50, 50, 51, 51]
    assert inputs["cls@last4"][0].tolist() == [20, 20, 30, 30, 40, 40, 50, 50]
    assert inputs["cls+patch@last4"][0].tolist() == [
        20, 20, 21, 21, 30, 30, 31, 31, 40, 40, 41, 41, 50, 50, 51, 51
    ]  # fmt: skip
    for name, x in inputs.items():
        assert x.shape == (3, feature_dim(name, blocks, 2))
    two = build_inputs(cls[-2:], patch[-2:], ["cls@last4"])["cls@last4"]
    assert two[0].tolist() == [40, 40, 50, 50] and feature_dim("cls@last4", 2, 2) == 4


@pytest.mark.parametrize(
    ("signal", "allowed"),
    [
        ((3, "cls"), {"cls@last", "cls+patch@last", "cls@last4", "cls+patch@last4"}),
        ((3, "patch"), {"cls+patch@last", "cls+patch@last4"}),
        ((0, "cls"), {"cls@last4", "cls+patch@last4"}),
        ((0, "patch"), {"cls+patch@last4"}),
    ],
)
def test_separable_classes_are_found_in_the_informative_features(signal, allowed):
    (train, val) = make_data(signal)
    result = linear_probe(*train, *val, C, LinearConfig(**FAST))
    assert result["best"]["features"] in allowed
    assert result["best"]["val_acc"] > 95.0 and result["best"]["holdout_acc"] > 95.0
    for g in result["grid"]:
        if g["features"] not in allowed:  # sets without the signal stay near chance (10%)
            assert g["holdout_acc"] < 30.0 and g["val_acc"] < 30.0, g
    assert len(result["grid"]) == 4 * len(LinearConfig().lrs)
    # separable: many cells tie on the holdout; ties go to the smaller lr, then the simpler set
    top = max(g["holdout_acc"] for g in result["grid"])
    tied = [(g["lr"], feature_sets(K).index(g["features"])) for g in result["grid"]]
    tied = [t for t, g in zip(tied, result["grid"], strict=True) if g["holdout_acc"] == top]
    assert len(tied) > 1
    best = (result["best"]["lr"], feature_sets(K).index(result["best"]["features"]))
    assert best == min(tied)
    assert result["epochs"] == FAST["epochs"]


def test_shuffled_labels_give_chance():
    (train, val) = make_data()
    rng = np.random.default_rng(1)
    train = (train[0], train[1], rng.permutation(train[2]))
    val = (val[0], val[1], rng.permutation(val[2]))
    result = linear_probe(*train, *val, C, LinearConfig(**FAST))
    assert result["best"]["val_acc"] < 20.0
    assert max(g["val_acc"] for g in result["grid"]) < 22.0


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [50, 21, 5, 1])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    fit, held = holdout_split(labels, 0.1, seed=3)
    assert np.intersect1d(fit, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(len(labels)))
    # round(10% of n), at least one, at most n - 1: 50 → 5, 21 → 2, 5 → 1, 1 → 0
    assert np.bincount(labels[held], minlength=4).tolist() == [5, 2, 1, 0]
    again = holdout_split(labels, 0.1, seed=3)
    assert np.array_equal(again[0], fit) and np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(labels, 0.1, seed=4)[1], held)


def test_val_set_never_influences_the_choice():
    # overlapping classes, so the grid has real differences to choose between
    (train, val) = make_data((0, "patch"), spread=0.5)
    cfg = LinearConfig(**FAST)
    first = linear_probe(*train, *val, C, cfg)
    permuted = np.random.default_rng(5).permutation(val[2])
    second = linear_probe(*train, val[0], val[1], permuted, C, cfg)
    assert 30.0 < first["best"]["val_acc"] < 95.0
    assert [g["holdout_acc"] for g in second["grid"]] == [g["holdout_acc"] for g in first["grid"]]
    assert (second["best"]["features"], second["best"]["lr"]) == (
        first["best"]["features"],
        first["best"]["lr"],
    )
    assert second["best"]["val_acc"] != first["best"]["val_acc"]
    assert second["best"]["val_acc"] < 25.0
    # the choice is the top holdout accuracy, ties to the smaller lr
    top = max(g["holdout_acc"] for g in first["grid"])
    assert first["best"]["holdout_acc"] == top
    tied = [g["lr"] for g in first["grid"] if g["holdout_acc"] == top]
    assert first["best"]["lr"] == min(tied)


def test_same_seed_same_result_other_seed_other_holdout():
    (train, val) = make_data((0, "patch"), spread=0.5)
    a = linear_probe(*train, *val, C, LinearConfig(**FAST))
    b = linear_probe(*train, *val, C, LinearConfig(**FAST))
    c = linear_probe(*train, *val, C, LinearConfig(**FAST, seed=1))
    assert a == b
    assert [g["holdout_acc"] for g in c["grid"]] != [g["holdout_acc"] for g in a["grid"]]


def test_float16_memmaps_match_float32_arrays(tmp_path):
    (train, val) = make_data((0, "patch"), spread=1.0)
    cfg = LinearConfig(**FAST)
    maps = []
    for split, (cls, patch, labels) in (("train", train), ("val", val)):
        for name, array in (("cls", cls), ("patch", patch)):
            mm = np.lib.format.open_memmap(
                tmp_path / f"{split}_{name}.npy", "w+", np.float16, array.shape
            )
            mm[:] = array
            mm.flush()
            maps.append(np.load(tmp_path / f"{split}_{name}.npy", mmap_mode="r"))
        maps.append(labels)
    assert isinstance(maps[0], np.memmap) and maps[0].dtype == np.float16
    from_maps = linear_probe(*maps, C, cfg)
    from_float32 = linear_probe(*train, *val, C, cfg)
    rounded = [m.astype(np.float32) if m.dtype == np.float16 else m for m in maps]
    assert linear_probe(*rounded, C, cfg) == from_maps  # the map is read exactly as its values
    assert from_maps["best"]["features"] == from_float32["best"]["features"]
    for a, b in zip(from_maps["grid"], from_float32["grid"], strict=True):
        assert abs(a["val_acc"] - b["val_acc"]) <= 2.0
        assert abs(a["holdout_acc"] - b["holdout_acc"]) <= 2.0


class RowCountingArray:
    """Wraps a (K, N, D) array and records how many rows each read takes."""

    def __init__(self, array):
        self.array, self.shape, self.ndim, self.reads = array, array.shape, array.ndim, []

    def __getitem__(self, index):
        part = self.array[index]
        self.reads.append(part.shape[1])
        return part


def test_only_minibatches_are_read():
    (train, val) = make_data(n_train=300)
    wrapped = [RowCountingArray(train[0]), RowCountingArray(train[1])]
    result = linear_probe(*wrapped, train[2], *val, C, LinearConfig(epochs=2, batch_size=256))
    assert result["best"]["val_acc"] > 90.0
    fit_rows = 3000 - 300
    for array in wrapped:
        train_reads = array.reads[: 2 * (fit_rows // 256)]
        assert sum(train_reads) == 2 * fit_rows  # every fit row once per epoch
        assert max(array.reads) < 512  # minibatches (< 2·batch), also when evaluating


def single_cell_reference(train, val, features, lr, cfg):
    """One BatchNorm1d(affine=False) + Linear trained alone by torch.optim.SGD: the protocol
    written out as a plain loop, sharing nothing with the grid but the holdout split."""
    (cls, patch, labels), (val_cls, val_patch, val_labels) = train, val

    def inputs(c, p, rows):
        if features == "cls+patch@last4":
            return np.concatenate(
                [np.concatenate([c[b, rows], p[b, rows]], 1) for b in range(K)], 1
            )
        assert features == "cls@last"
        return c[K - 1, rows]

    fit, held = holdout_split(labels, cfg.holdout, cfg.seed)
    dim = inputs(cls, patch, [0]).shape[1]
    model = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, C))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    optimizer = torch.optim.SGD(
        [
            {"params": [model[1].weight], "weight_decay": cfg.weight_decay},
            {"params": [model[1].bias], "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=0.9,
    )
    per_epoch = max(1, len(fit) // cfg.batch_size)
    total = per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    model.train()
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(fit)
        for rows in np.array_split(order, per_epoch):
            rows = np.sort(rows)
            x = torch.from_numpy(inputs(cls, patch, rows))
            loss = F.cross_entropy(model(x), torch.from_numpy(labels[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        held_pred = model(torch.from_numpy(inputs(cls, patch, held))).argmax(1).numpy()
        all_val = np.arange(len(val_labels))
        val_pred = model(torch.from_numpy(inputs(val_cls, val_patch, all_val))).argmax(1).numpy()
    return 100 * np.mean(held_pred == labels[held]), 100 * np.mean(val_pred == val_labels)


@pytest.mark.parametrize(("features", "lr"), [("cls+patch@last4", 0.1), ("cls@last", 0.01)])
def test_a_cell_trained_in_the_grid_matches_it_trained_alone(features, lr):
    # overlapping classes: mid-range accuracy, so a different training shows in the predictions
    (train, val) = make_data((3, "cls"), spread=0.5, n_train=60)
    cfg = LinearConfig(epochs=6, batch_size=100, weight_decay=0.05, seed=2)
    grid = linear_probe(*train, *val, C, cfg)
    held_acc, val_acc = single_cell_reference(train, val, features, lr, cfg)
    together = cell(grid, features, lr)
    assert 30.0 < val_acc < 90.0
    assert together["holdout_acc"] == pytest.approx(held_acc, abs=1e-9)
    assert together["val_acc"] == pytest.approx(val_acc, abs=1e-9)
    alone = linear_probe(*train, *val, C, LinearConfig(**{**cfg.__dict__, "lrs": (lr,)}))
    assert cell(alone, features, lr) == together


def test_fewer_than_four_blocks_and_progress():
    (train, val) = make_data((3, "cls"))
    calls = []
    two = [train[0][2:], train[1][2:], train[2], val[0][2:], val[1][2:], val[2]]
    result = linear_probe(*two, C, LinearConfig(**FAST), progress=lambda *a: calls.append(a))
    assert calls == [("train", e, FAST["epochs"]) for e in range(1, FAST["epochs"] + 1)]
    assert any("last 2" in note for note in result["notes"])
    one = [train[0][3:], train[1][3:], train[2], val[0][3:], val[1][3:], val[2]]
    result = linear_probe(*one, C, LinearConfig(**FAST))
    assert {g["features"] for g in result["grid"]} == {"cls@last", "cls+patch@last"}
    assert result["best"]["val_acc"] > 95.0


def test_a_diverging_cell_is_reported_and_not_chosen():
    (train, val) = make_data((0, "patch"), spread=0.5)
    result = linear_probe(*train, *val, C, LinearConfig(**FAST, lrs=(0.01, 1e36)))
    assert result["best"]["lr"] == 0.01
    assert any("diverged" in note for note in result["notes"])


def test_bad_input_is_a_clear_error():
    (train, val) = make_data()
    with pytest.raises(MimcliError, match="labels must lie"):
        linear_probe(*train, val[0], val[1], val[2] + 1, C, LinearConfig(**FAST))
    with pytest.raises(MimcliError, match="labels of shape"):
        linear_probe(*train, val[0], val[1], val[2][:-1], C, LinearConfig(**FAST))
    with pytest.raises(MimcliError, match="do not match"):
        linear_probe(*train, val[0][:, :, :8], val[1][:, :, :8], val[2], C, LinearConfig())
    inf = train[0].astype(np.float16)
    inf[0, 5, 0] = np.inf
    with pytest.raises(MimcliError, match="NaN or inf"):
        linear_probe(inf, *train[1:], *val, C, LinearConfig(**FAST))
