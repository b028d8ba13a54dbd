"""Clustering metrics: Hungarian accuracy against brute force and hand-worked examples, k-means
determinism, and the full evaluation on data with a known answer (separated clusters, noise)."""

import itertools
import math

import numpy as np
import pytest

from mimcli.errors import MimcliError
from mimcli.evaluate import cluster
from mimcli.evaluate.cluster import cluster_accuracy, cluster_eval, kmeans
from mimcli.evaluate.knn import standardize


def separated_clusters(num_classes, per_class, dim, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim))
    centres *= 10.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    feats = centres[labels] + spread * rng.standard_normal((labels.size, dim))
    return feats.astype(np.float32), labels


def brute_force_accuracy(true, pred, k):
    """Best accuracy (%) over every relabelling of k clusters onto k classes."""
    best = max(np.mean(np.asarray(perm)[pred] == true) for perm in itertools.permutations(range(k)))
    return 100.0 * best


def naive_nmi(true, pred):
    """Mutual information over the arithmetic mean of the two entropies, from counts."""
    n = true.size
    joint = {}
    for t, p in zip(true.tolist(), pred.tolist(), strict=True):
        joint[t, p] = joint.get((t, p), 0) + 1
    count_t = {t: int(np.sum(true == t)) for t in set(true.tolist())}
    count_p = {p: int(np.sum(pred == p)) for p in set(pred.tolist())}
    mi = sum(c / n * math.log(c * n / (count_t[t] * count_p[p])) for (t, p), c in joint.items())
    h_t = -sum(c / n * math.log(c / n) for c in count_t.values())
    h_p = -sum(c / n * math.log(c / n) for c in count_p.values())
    return mi / ((h_t + h_p) / 2)


def naive_ari(true, pred):
    """Hubert–Arabie adjusted Rand index from pair counts."""
    pairs = 0
    for t in set(true.tolist()):
        for p in set(pred.tolist()):
            pairs += math.comb(int(np.sum((true == t) & (pred == p))), 2)
    rows = sum(math.comb(int(np.sum(true == t)), 2) for t in set(true.tolist()))
    cols = sum(math.comb(int(np.sum(pred == p)), 2) for p in set(pred.tolist()))
    expected = rows * cols / math.comb(true.size, 2)
    return (pairs - expected) / ((rows + cols) / 2 - expected)


def test_a_permuted_labelling_is_100_percent():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 7, 500)
    perm = rng.permutation(7)
    assert cluster_accuracy(true, perm[true]) == 100.0
    assert cluster_accuracy(true, 100 + 3 * perm[true]) == 100.0  # any cluster ids


def test_hungarian_beats_greedy_on_a_hand_made_example():
    # cluster 0 holds 4 of class 0 and 2 of class 1; cluster 1 holds 3 of class 0.
    # greedy (largest cell first) maps 0->0, then 1->1: 4/9; the best one-to-one map is
    # 0->1, 1->0: 5/9; majority vote per cluster (not one-to-one) would claim 7/9
    true = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0])
    pred = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert cluster_accuracy(true, pred) == pytest.approx(100 * 5 / 9)


def test_three_class_example_and_extra_clusters_count_as_wrong():
    true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([1, 1, 0, 0, 0, 2, 2, 2, 2, 1])
    # contingency (cluster x class): [1,2,0], [2,0,1], [0,1,3] -> 0->1, 1->0, 2->2: 2+2+3
    assert cluster_accuracy(true, pred) == pytest.approx(70.0)
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])) == 50.0
    assert cluster_accuracy(np.array([0, 1, 2, 3]), np.zeros(4, dtype=int)) == 25.0


@pytest.mark.parametrize("seed", range(10))
def test_hungarian_matches_brute_force_over_all_permutations(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 4, 60)
    noisy = np.where(rng.random(60) < 0.5, rng.permutation(4)[true], rng.integers(0, 4, 60))
    assert cluster_accuracy(true, noisy) == pytest.approx(brute_force_accuracy(true, noisy, 4))


def test_cluster_accuracy_refuses_mismatched_labellings():
    with pytest.raises(MimcliError):
        cluster_accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(MimcliError):
        cluster_accuracy(np.zeros(0), np.zeros(0))


def test_kmeans_is_deterministic_given_the_seed():
    feats, _ = separated_clusters(5, 40, 8, seed=0, spread=3.0)
    first = kmeans(feats, 5, seed=0)
    assert first.dtype == np.int64 and first.shape == (200,)
    assert set(first.tolist()) <= set(range(5))
    assert np.array_equal(first, kmeans(feats, 5, seed=0))
    with pytest.raises(MimcliError, match="k=201"):
        kmeans(feats, 201)


def test_kmeans_trains_on_every_point():
    # Trained on all points, the result is a fixed point of Lloyd's step on the full set: the
    # means of the clusters reassign no point. FAISS's default 256-points-per-centroid subsample
    # (768 of 6000 here) leaves its centroids off those means, and 26-84 points flip.
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    feats = (centres[rng.integers(0, 3, 6000)] + rng.standard_normal((6000, 2))).astype(np.float32)
    labels = kmeans(feats, 3, seed=0, iters=100)
    means = np.stack([feats[labels == c].mean(axis=0) for c in range(3)])
    nearest = ((feats[:, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert np.array_equal(nearest, labels)


def test_separated_clusters_score_near_perfect():
    feats, labels = separated_clusters(6, 100, 16, seed=0)
    result = cluster_eval(feats, labels, num_classes=6)
    assert set(result) == {"acc", "nmi", "ami", "ari", "silhouette", "davies_bouldin"}
    assert result["acc"] >= 99.5
    assert min(result["nmi"], result["ami"], result["ari"]) >= 0.98
    assert result["silhouette"] > 0.6
    assert 0.0 < result["davies_bouldin"] < 0.6


def test_random_features_and_labels_score_chance():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((2000, 32))
    labels = rng.integers(0, 10, 2000)
    result = cluster_eval(feats, labels, num_classes=10)
    assert 10.0 <= result["acc"] < 15.0
    assert result["nmi"] < 0.02
    assert abs(result["ami"]) < 0.01 and abs(result["ari"]) < 0.01
    separated = cluster_eval(*separated_clusters(10, 200, 32, seed=1), num_classes=10)
    assert separated["silhouette"] > result["silhouette"] + 0.3
    assert separated["davies_bouldin"] < result["davies_bouldin"]


def test_metrics_agree_with_naive_formulas_on_the_same_clustering():
    feats, labels = separated_clusters(4, 60, 8, seed=2, spread=6.0)
    result = cluster_eval(feats, labels, num_classes=4, seed=3)
    pred = kmeans(standardize(feats)[0].numpy(), 4, seed=3)  # what cluster_eval clusters
    assert result["acc"] == pytest.approx(brute_force_accuracy(labels, pred, 4))
    assert result["nmi"] == pytest.approx(naive_nmi(labels, pred))
    assert result["ari"] == pytest.approx(naive_ari(labels, pred))
    assert 40.0 < result["acc"] < 99.0  # overlapping clusters: a non-trivial case


def test_standardisation_matters_when_one_dimension_dominates():
    feats, labels = separated_clusters(3, 100, 4, seed=3, spread=0.3)
    noise = np.random.default_rng(0).standard_normal((300, 1)) * 1000.0
    feats = np.concatenate([feats, noise], axis=1)
    assert cluster_eval(feats, labels, 3)["acc"] >= 99.0
    assert cluster_eval(feats, labels, 3, standardize=False)["acc"] < 80.0


def test_silhouette_sample_is_fixed_and_close_to_the_full_score(monkeypatch):
    feats, labels = separated_clusters(4, 150, 8, seed=4, spread=4.0)
    full = cluster_eval(feats, labels, 4)["silhouette"]
    monkeypatch.setattr(cluster, "SILHOUETTE_SAMPLE", 300)
    sampled = cluster_eval(feats, labels, 4)["silhouette"]
    assert sampled != full and abs(sampled - full) < 0.05
    assert cluster_eval(feats, labels, 4)["silhouette"] == sampled
