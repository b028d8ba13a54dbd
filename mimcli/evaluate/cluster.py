"""Clustering evaluation (METHOD §1.5): k-means with k = number of classes on standardised,
L2-normalised features; ACC with Hungarian matching, NMI, AMI, ARI, silhouette, Davies–Bouldin.

Units: ``acc`` is in percent; ``nmi``, ``ami`` and ``ari`` are fractions (1 = perfect; AMI and
ARI are about 0 for chance and may be slightly negative); ``silhouette`` lies in [-1, 1], higher is
better; ``davies_bouldin`` is >= 0, lower is better.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn import metrics

from mimcli.errors import MimcliError
from mimcli.evaluate.knn import feature_stats, standardize_with
from mimcli.runtime import faiss_threads

Array = torch.Tensor | np.ndarray

# silhouette_score is O(N²): larger sets are scored on a fixed random sample of this many points.
SILHOUETTE_SAMPLE = 10_000
# Below this many multiply-adds per k-means iteration (N·k·D), FAISS runs on one thread: its
# per-iteration barriers cost more than they save, 35x more on 2 cores shared with another job
# (60k x 128 features, k=10: 1.6 s on one thread, 38 s on two).
SINGLE_THREAD_WORK = 1 << 27


def kmeans(
    features: np.ndarray, k: int, seed: int = 0, restarts: int = 5, iters: int = 50
) -> np.ndarray:
    """Euclidean k-means with FAISS (exact assignment; the run with the lowest objective of
    ``restarts`` wins).

    Every point takes part in training (FAISS would otherwise subsample to 256 points per
    centroid). The result is fixed by ``seed`` for a given FAISS thread count (set by
    ``mimcli.runtime.configure_threads``).

    Args:
        features: (N, D) features, cast to float32.
        k: number of clusters, 1 <= k <= N.

    Returns:
        (N,) int64 cluster of each point, in [0, k).
    """
    import faiss

    x = np.ascontiguousarray(np.asarray(features), dtype=np.float32)
    if x.ndim != 2:
        raise MimcliError(f"k-means needs (N, D) features, got shape {x.shape}")
    n, dim = x.shape
    if not 1 <= k <= n:
        raise MimcliError(f"k-means with k={k} needs between 1 and {n} clusters")
    model = faiss.Kmeans(
        dim,
        k,
        niter=iters,
        nredo=restarts,
        seed=seed,
        spherical=False,
        verbose=False,
        max_points_per_centroid=max(256, -(-n // k)),
        min_points_per_centroid=1,
    )
    with faiss_threads(1 if n * k * dim < SINGLE_THREAD_WORK else None):
        model.train(x)
        _, assignment = model.index.search(x, 1)
    return assignment[:, 0].astype(np.int64)


def cluster_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy in percent under the best one-to-one mapping of clusters to classes.

    The mapping maximises the number of matched points (Hungarian algorithm on the contingency
    matrix). With more clusters than classes the unmatched clusters count as wrong.

    Args:
        true: (N,) class labels; pred: (N,) cluster ids (any integers).
    """
    true = np.asarray(true).ravel()
    pred = np.asarray(pred).ravel()
    if true.size != pred.size or true.size == 0:
        raise MimcliError(
            f"cluster accuracy needs two equal, non-empty labellings ({true.size}, {pred.size})"
        )
    classes, true_ids = np.unique(true, return_inverse=True)
    clusters, pred_ids = np.unique(pred, return_inverse=True)
    contingency = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(contingency, (pred_ids, true_ids), 1)
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    return 100.0 * float(contingency[rows, cols].sum()) / true.size


def cluster_eval(
    features: Array,
    labels: Array,
    num_classes: int,
    seed: int = 0,
    restarts: int = 5,
    standardize: bool = True,
    iters: int = 50,
) -> dict[str, float]:
    """Cluster features with k = ``num_classes`` and score the clusters against the labels.

    Features are standardised per dimension with their own mean/std (``standardize``) and then
    L2-normalised, so Euclidean k-means ranks points as cosine similarity does. Silhouette and
    Davies–Bouldin use Euclidean distances on those features (silhouette on a fixed sample of
    ``SILHOUETTE_SAMPLE`` points above that size) and are NaN when k-means leaves one cluster.

    Args:
        features: (N, D) features (numpy, memmap or tensor; standardised chunk by chunk).
        labels: (N,) classes.

    Returns:
        ``{"acc": %, "nmi", "ami", "ari": fractions, "silhouette": [-1, 1],
        "davies_bouldin": >= 0}``.
    """
    truth = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if features.shape[0] != truth.size:
        raise MimcliError(f"clustering: {features.shape[0]} feature rows but {truth.size} labels")
    if standardize:
        mean, std = feature_stats(features)
    else:
        mean = torch.zeros(features.shape[1], dtype=torch.float64)
        std = torch.ones_like(mean)
    x = standardize_with(features, mean, std).numpy()
    pred = kmeans(x, num_classes, seed=seed, restarts=restarts, iters=iters)
    found = np.unique(pred).size
    if 2 <= found < x.shape[0]:
        sample = SILHOUETTE_SAMPLE if x.shape[0] > SILHOUETTE_SAMPLE else None
        silhouette = float(
            metrics.silhouette_score(
                x, pred, metric="euclidean", sample_size=sample, random_state=seed
            )
        )
        davies_bouldin = float(metrics.davies_bouldin_score(x, pred))
    else:
        silhouette = davies_bouldin = float("nan")
    return {
        "acc": cluster_accuracy(truth, pred),
        "nmi": float(metrics.normalized_mutual_info_score(truth, pred)),
        "ami": float(metrics.adjusted_mutual_info_score(truth, pred)),
        "ari": float(metrics.adjusted_rand_score(truth, pred)),
        "silhouette": silhouette,
        "davies_bouldin": davies_bouldin,
    }
