"""The LBFGS logistic regression (against scikit-learn) and the end-to-end low-shot evaluation on
data with a known answer (splits: tests/test_splits.py)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mimcli.errors import MimcliError
from mimcli.evaluate import lowshot
from mimcli.evaluate.lowshot import (
    ONE_SHOT_L2,
    choose_l2,
    logistic_regression,
    lowshot_eval,
    prepare,
)
from mimcli.evaluate.splits import load_split, lowshot_splits, save_split, split_meta


def uneven_labels(counts, seed=0):
    """Shuffled labels with ``counts[c]`` images of class c."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def gaussian_clusters(num_classes, per_class, dim, spread, seed, noise_seed=0):
    """Class c around centre c (random directions of norm 10, fixed by ``seed``), isotropic
    noise of std ``spread`` (drawn with ``noise_seed``: train and val share centres)."""
    centres = np.random.default_rng(seed).standard_normal((num_classes, dim))
    centres *= 10.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = np.random.default_rng([seed, noise_seed]).standard_normal((labels.size, dim))
    feats = centres[labels] + spread * noise
    return feats.astype(np.float32), labels


def test_prepare_centres_with_the_train_mean_then_normalises_rows():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((8, 4)) + 5.0
    other = rng.standard_normal((3, 4))
    train_p, other_p = prepare(train, other)
    assert train_p.dtype == torch.float64
    expected = other - train.mean(axis=0)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(other_p.numpy(), expected)
    assert np.allclose(train_p.norm(dim=1).numpy(), 1.0)


def test_analytic_gradient_matches_autograd():
    rng = np.random.default_rng(1)
    x1 = torch.from_numpy(np.c_[rng.standard_normal((20, 6)), np.ones(20)])
    y = torch.from_numpy(rng.integers(0, 4, 20))
    theta = torch.from_numpy(rng.standard_normal((4, 7))).requires_grad_(True)
    onehot = torch.nn.functional.one_hot(y, 4).double()
    loss, grad = lowshot._loss_and_grad(theta.detach(), x1, y, onehot, 0.3)
    reference = torch.nn.functional.cross_entropy(x1 @ theta.T, y)
    reference = reference + 0.15 * theta[:, :-1].pow(2).sum()
    reference.backward()
    assert torch.allclose(loss, reference.detach())
    assert torch.allclose(grad, theta.grad)


@pytest.mark.parametrize("l2", [1e-3, 0.05, 1.0])
def test_logistic_regression_matches_scikit_learn(l2):
    rng = np.random.default_rng(2)
    n, dim, classes = 90, 6, 4
    x = rng.standard_normal((n, dim)) + rng.standard_normal((classes, dim))[np.arange(n) % 4]
    y = np.arange(n) % classes
    weight, bias = logistic_regression(x, y, classes, l2, tolerance=1e-10)
    # scikit-learn minimises C·sum_i CE_i + ||W||²/2 = C·n·(mean CE + ||W||²/(2·C·n))
    ref = LogisticRegression(C=1.0 / (n * l2), tol=1e-12, max_iter=10_000).fit(x, y)
    assert np.allclose(weight.numpy(), ref.coef_, atol=1e-5)
    # the bias is defined up to a shared shift; ours sums to zero
    assert abs(float(bias.sum())) < 1e-9
    assert np.allclose(bias.numpy(), ref.intercept_ - ref.intercept_.mean(), atol=1e-5)
    probs = torch.softmax(torch.from_numpy(x) @ weight.T + bias, dim=1).numpy()
    assert np.allclose(probs, ref.predict_proba(x), atol=1e-6)
    # the default tolerance (1e-7) still gives the same classifier for every practical purpose
    weight, bias = logistic_regression(x, y, classes, l2)
    probs = torch.softmax(torch.from_numpy(x) @ weight.T + bias, dim=1).numpy()
    assert np.abs(probs - ref.predict_proba(x)).max() < 1e-4


def test_logistic_regression_is_deterministic_and_checks_its_inputs():
    x, y = gaussian_clusters(3, 10, 5, 1.0, seed=0)
    first = logistic_regression(x, y, 3, 0.01)
    second = logistic_regression(x, y, 3, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(MimcliError, match="> 0"):
        logistic_regression(x, y, 3, 0.0)
    with pytest.raises(MimcliError, match="labels"):
        logistic_regression(x, y, 2, 0.01)


def test_cross_validation_prefers_weak_penalty_on_separable_data_and_skips_one_shot():
    feats, labels = gaussian_clusters(4, 5, 8, 0.5, seed=0)
    assert choose_l2(feats, labels, 4) == min(lowshot.L2_GRID)
    folds = lowshot._cv_folds(labels, 5)
    for fold in range(5):  # 5-shot: leave one image of each class out
        assert np.bincount(labels[folds == fold]).tolist() == [1, 1, 1, 1]
    one_shot = np.arange(4)
    assert choose_l2(feats[[0, 5, 10, 15]], one_shot, 4) == ONE_SHOT_L2


def test_separated_clusters_give_near_perfect_five_shot_accuracy():
    train, train_y = gaussian_clusters(10, 30, 32, 1.0, seed=0)
    val, val_y = gaussian_clusters(10, 50, 32, 1.0, seed=0, noise_seed=1)
    result = lowshot_eval(train, train_y, val, val_y, shots=(5,), seeds=(0, 1, 2))
    assert result["5-shot"]["mean"] >= 99.0
    assert min(result["5-shot"]["runs"]) >= 98.0


def test_shuffled_labels_give_chance_accuracy():
    train, train_y = gaussian_clusters(10, 30, 16, 1.0, seed=0)
    val, val_y = gaussian_clusters(10, 50, 16, 1.0, seed=0, noise_seed=1)
    kwargs = dict(shots=(5,), seeds=(0, 1, 2), l2=0.01)
    assert lowshot_eval(train, train_y, val, val_y, **kwargs)["5-shot"]["mean"] > 99
    shuffled = np.random.default_rng(0).permutation(train_y)
    result = lowshot_eval(train, shuffled, val, val_y, **kwargs)
    assert result["5-shot"]["mean"] < 25.0


def test_pure_noise_gives_chance_accuracy():
    rng = np.random.default_rng(0)
    train, val = rng.standard_normal((500, 32)), rng.standard_normal((2000, 32))
    train_y, val_y = rng.integers(0, 10, 500), rng.integers(0, 10, 2000)
    result = lowshot_eval(train, train_y, val, val_y, shots=(5,), seeds=(0, 1, 2), l2=0.01)
    assert 5.0 < result["5-shot"]["mean"] < 15.0


def test_lowshot_eval_reports_mean_and_spread_and_reproduces_from_split_files(tmp_path):
    train, train_y = gaussian_clusters(5, 40, 8, 6.0, seed=1)
    val, val_y = gaussian_clusters(5, 40, 8, 6.0, seed=1, noise_seed=1)
    shots = (1, 2, 0.1)
    calls = []
    first = lowshot_eval(
        train,
        train_y,
        val,
        val_y,
        shots=shots,
        split_dir=tmp_path,
        progress=lambda *a: calls.append(a),
    )
    assert calls == [("lowshot", done, 9) for done in range(10)]
    assert list(first) == ["1-shot", "2-shot", "10%"]
    for row in first.values():
        assert len(row["runs"]) == 3 and row["seeds"] == [0, 1, 2]
        assert row["mean"] == pytest.approx(np.mean(row["runs"]))
        assert row["std"] == pytest.approx(np.std(row["runs"], ddof=1))
        assert all(0.0 <= acc <= 100.0 for acc in row["runs"])
    assert first["1-shot"]["l2"] == [ONE_SHOT_L2] * 3
    assert first["1-shot"]["l2_rule"] == "fixed 1-shot default"
    assert first["2-shot"]["l2_rule"] == "cv"
    assert all(value in lowshot.L2_GRID for value in first["10%"]["l2"])

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 9 and "1shot-seed0.json" in files and "10pct-seed2.json" in files
    saved = load_split(tmp_path / "2shot-seed1.json", labels=train_y, shots=2, seed=1)
    assert np.array_equal(saved, lowshot_splits(train_y, 2, 1))
    again = lowshot_eval(train, train_y, val, val_y, shots=shots, split_dir=tmp_path)
    assert again == first

    given = lowshot_eval(train, train_y, val, val_y, shots=(2,), seeds=(0,), l2=0.5)
    assert given["2-shot"]["l2"] == [0.5] and given["2-shot"]["l2_rule"] == "given"
    assert given["2-shot"]["std"] == 0.0


def test_lowshot_eval_reads_the_saved_split_not_a_new_draw(tmp_path):
    train, train_y = gaussian_clusters(3, 20, 8, 12.0, seed=2)
    val, val_y = gaussian_clusters(3, 200, 8, 12.0, seed=2, noise_seed=1)
    # a hand-written split under seed 0's name: the result must follow it, not a new draw
    chosen = np.array([19, 39, 59])
    assert not np.array_equal(chosen, lowshot_splits(train_y, 1, 0))
    save_split(tmp_path / "1shot-seed0.json", chosen, split_meta(train_y, 1, 0))
    stored = lowshot_eval(train, train_y, val, val_y, shots=(1,), seeds=(0,), split_dir=tmp_path)
    drawn = lowshot_eval(train, train_y, val, val_y, shots=(1,), seeds=(0,))

    def accuracy_of(indices):
        mean = torch.from_numpy(train[indices]).double().mean(dim=0)
        fit_x = prepare(train[indices])[0]
        weight, bias = logistic_regression(fit_x, train_y[indices], 3, ONE_SHOT_L2)
        return lowshot.accuracy(val, val_y, mean, weight, bias)

    assert stored["1-shot"]["runs"] == [accuracy_of(chosen)]
    assert drawn["1-shot"]["runs"] == [accuracy_of(lowshot_splits(train_y, 1, 0))]
    assert stored != drawn

    other = train_y.copy()
    other[0] = 2
    with pytest.raises(MimcliError, match="another train set"):
        lowshot_eval(train, other, val, val_y, shots=(1,), seeds=(0,), split_dir=tmp_path)


def test_lowshot_eval_reads_read_only_memmapped_float16_features(tmp_path):
    train, train_y = gaussian_clusters(4, 25, 8, 1.0, seed=4)
    val, val_y = gaussian_clusters(4, 25, 8, 1.0, seed=4, noise_seed=1)
    np.save(tmp_path / "train.npy", train.astype(np.float16))
    np.save(tmp_path / "val.npy", val.astype(np.float16))
    mapped_train = np.load(tmp_path / "train.npy", mmap_mode="r")
    mapped_val = np.load(tmp_path / "val.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on non-writable arrays
        from_map = lowshot_eval(mapped_train, train_y, mapped_val, val_y, shots=(2,), seeds=(0,))
    in_memory = lowshot_eval(
        train.astype(np.float16),
        train_y,
        torch.from_numpy(val.astype(np.float16)),
        val_y,
        shots=(2,),
        seeds=(0,),
    )
    assert from_map == in_memory
    assert from_map["2-shot"]["mean"] >= 95.0
