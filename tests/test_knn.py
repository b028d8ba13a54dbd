import math

import numpy as np
import pytest
import torch

from mimcli.evaluate.knn import knn_accuracy, knn_predict, standardize, weighted_votes


def test_weighted_vote_hand_example():
    # Query's 3 neighbours: one very close of class 1, two further of class 0.
    scores = torch.tensor([[0.9, 0.5, 0.45]])
    labels = torch.tensor([[1, 0, 0]])
    votes = weighted_votes(scores, labels, num_classes=2, tau=0.07)
    assert votes[0, 1].item() == pytest.approx(math.exp(0.9 / 0.07))
    assert votes[0, 0].item() == pytest.approx(math.exp(0.5 / 0.07) + math.exp(0.45 / 0.07))
    assert votes.argmax(1).item() == 1  # weight beats the 2-vs-1 majority at tau 0.07
    votes_hot = weighted_votes(scores, labels, num_classes=2, tau=10.0)
    assert votes_hot.argmax(1).item() == 0  # at high temperature it is nearly a majority vote


def test_knn_predict_known_answer():
    # Train points on the axes of 2-D space (after standardising they stay separable).
    train = np.array([[1, 0], [1.1, 0.1], [0, 1], [0.1, 1.2], [-1, 0], [-1.1, -0.1]], np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    query = np.array([[0.9, 0.05], [0.05, 0.8], [-0.7, 0.0]], np.float32)
    preds = knn_predict(train, labels, query, ks=(1, 2), tau=0.07, backend="torch")
    assert preds[1].tolist() == [0, 1, 2]
    assert preds[2].tolist() == [0, 1, 2]
    acc = knn_accuracy(train, labels, query, np.array([0, 1, 0]), ks=(2,), backend="faiss")
    assert acc[2] == pytest.approx(200 / 3)


def test_standardize_uses_train_statistics():
    train = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    query = torch.tensor([[2.0, 40.0]])
    t, q = standardize(train, query)
    # train mean (2, 20), std (1, 10): query -> (0, 2) -> normalised (0, 1)
    torch.testing.assert_close(q, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(
        t, torch.nn.functional.normalize(torch.tensor([[-1.0, -1], [1, 1]]), dim=1)
    )


def naive_knn_accuracy(train, train_labels, query, query_labels, k, tau):
    """Plain numpy loop version of the protocol, for oracle comparison."""
    mean, std = train.mean(0), train.std(0)

    def prep(x):
        z = (x - mean) / np.maximum(std, 1e-6)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    tr, qu = prep(train.astype(np.float64)), prep(query.astype(np.float64))
    correct = 0
    for i in range(len(qu)):
        sims = tr @ qu[i]
        order = np.argsort(-sims, kind="stable")[:k]
        votes = {}
        for j in order:
            votes[train_labels[j]] = votes.get(train_labels[j], 0.0) + np.exp(sims[j] / tau)
        best = max(sorted(votes), key=lambda c: votes[c])
        correct += best == query_labels[i]
    return 100.0 * correct / len(qu)


def test_knn_accuracy_matches_naive_loop():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 24))
    tl = rng.integers(0, 5, 400)
    ql = rng.integers(0, 5, 150)
    train = centers[tl] + rng.normal(scale=1.5, size=(400, 24))
    query = centers[ql] + rng.normal(scale=1.5, size=(150, 24))
    for k in (1, 10, 20):
        ours = knn_accuracy(train, tl, query, ql, ks=(k,), tau=0.07)[k]
        assert ours == pytest.approx(naive_knn_accuracy(train, tl, query, ql, k, 0.07))
    shuffled = knn_accuracy(train, rng.permutation(tl), query, ql, ks=(10,))[10]
    assert shuffled < 40  # chance is 20%


def test_chunked_standardisation_equals_whole(monkeypatch):
    from mimcli.evaluate import knn

    rng = np.random.default_rng(3)
    train = rng.normal(3.0, 2.0, size=(1000, 16)).astype(np.float16)
    query = rng.normal(3.0, 2.0, size=(70, 16)).astype(np.float16)
    whole_t, whole_q = standardize(torch.from_numpy(train), torch.from_numpy(query))
    monkeypatch.setattr(knn, "CHUNK_ROWS", 64)
    chunk_t, chunk_q = standardize(train, query)
    torch.testing.assert_close(chunk_t, whole_t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunk_q, whole_q, atol=1e-6, rtol=1e-6)
    # the reference: numpy in float64
    t64 = train.astype(np.float64)
    z = (query.astype(np.float64) - t64.mean(0)) / t64.std(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(chunk_q.numpy(), z, atol=1e-5)


def test_standard_error_and_mcnemar_against_hand_counts():
    """Binomial SE and the exact McNemar test (scipy's binomtest on the discordant pairs),
    against counts worked out by hand; packed correctness survives the round trip."""
    import math

    import numpy as np

    from mimcli.evaluate.stats import mcnemar, pack, standard_error, unpack

    assert standard_error(80.0, 100) == pytest.approx(100 * math.sqrt(0.8 * 0.2 / 100))
    a = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1], dtype=bool)
    b = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    # discordant: a-only 1, b-only 3; two-sided exact: P(X<=1)+P(X>=3) for Bin(4, 1/2) = 10/16
    assert mcnemar(a, b) == pytest.approx(10 / 16)
    assert mcnemar(a, a) == 1.0
    many = np.zeros(200, dtype=bool)
    assert mcnemar(many, ~many) < 1e-50  # 200 to 0
    assert np.array_equal(unpack(pack(a)), a) and np.array_equal(unpack(pack(many[:13])), many[:13])
