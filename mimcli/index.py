"""Exact inner-product nearest-neighbour search: FAISS (IndexFlatIP, GPU index when available)
or chunked torch matmul + topk. Both return the same neighbours; ``auto`` picks per device.

Optional per-query exclusion by id (a sample must never retrieve its own earlier entry from the
MIM-Refiner queue): excluded slots never appear, and missing results are padded with index -1 and
score -inf."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from mimcli.errors import MimcliError

Backend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")

# Largest similarity block the torch backend materialises at once (elements): 64M floats = 256 MB.
MAX_BLOCK_ELEMENTS = 64 * 1024 * 1024
# Database rows per torch chunk; the running top-k is merged across chunks.
DATABASE_CHUNK = 262_144


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    if not faiss_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Choose ``faiss`` or ``torch``.

    ``auto``: on CPU FAISS when installed; on CUDA FAISS only with GPU support, otherwise torch
    (a CPU FAISS search would copy everything back to the host).
    """
    if backend not in BACKENDS:
        raise MimcliError(f"unknown --knn-backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "faiss":
        if not faiss_available():
            raise MimcliError("--knn-backend faiss: FAISS is not installed; pip install faiss-cpu")
        return "faiss"
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        return "faiss" if faiss_gpu_available() else "torch"
    return "faiss" if faiss_available() else "torch"


def _as_float32_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return x.float().contiguous()


def _topk_torch(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    query_ids: torch.Tensor | None = None,
    database_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_query, n_db = queries.shape[0], database.shape[0]
    db_chunk = min(n_db, DATABASE_CHUNK)
    q_chunk = max(1, min(n_query, MAX_BLOCK_ELEMENTS // max(db_chunk, 1)))
    out_scores = torch.empty(n_query, k, dtype=torch.float32, device=queries.device)
    out_index = torch.empty(n_query, k, dtype=torch.int64, device=queries.device)
    exclude = query_ids is not None and database_ids is not None
    for q0 in range(0, n_query, q_chunk):
        q = queries[q0 : q0 + q_chunk]
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for d0 in range(0, n_db, db_chunk):
            sims = q @ database[d0 : d0 + db_chunk].T
            if exclude:
                qid = query_ids[q0 : q0 + q_chunk, None]  # type: ignore[index]
                dbid = database_ids[None, d0 : d0 + db_chunk]  # type: ignore[index]
                sims = sims.masked_fill((qid == dbid) & (dbid != -1), float("-inf"))
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            i = i + d0
            if best_s is None:
                best_s, best_i = s, i
            else:
                cat_s = torch.cat([best_s, s], dim=1)
                cat_i = torch.cat([best_i, i], dim=1)  # type: ignore[list-item]
                best_s, pick = cat_s.topk(k, dim=1)
                best_i = cat_i.gather(1, pick)
        if exclude:
            # Only masked slots score -inf (features are finite): they are padding, not results.
            best_i = best_i.masked_fill(best_s == float("-inf"), -1)  # type: ignore[union-attr]
        out_scores[q0 : q0 + q.shape[0]] = best_s  # type: ignore[assignment]
        out_index[q0 : q0 + q.shape[0]] = best_i  # type: ignore[assignment]
    return out_scores, out_index


def _topk_faiss(
    queries: torch.Tensor,
    database: torch.Tensor,
    k: int,
    query_ids: torch.Tensor | None = None,
    database_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    device = queries.device
    # Below this many queries FAISS skips BLAS for a scalar loop that is much slower for wide
    # features; queries arrive in batches, so always take the BLAS path.
    faiss.cvar.distance_compute_blas_threshold = 1
    d = database.shape[1]
    if device.type == "cuda" and faiss_gpu_available():
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(database.detach().cpu().numpy())
    if query_ids is None or database_ids is None:
        scores, idx = index.search(queries.detach().cpu().numpy(), k)
        return torch.from_numpy(scores).to(device), torch.from_numpy(idx).to(device)
    qid, dbid = query_ids.cpu(), database_ids.cpu()
    # A query loses at most as many hits as the database holds entries with its id, so searching
    # k + that maximum and dropping excluded hits leaves exactly the top k valid entries.
    extra = _max_excluded(qid, dbid)
    wide = min(k + extra, database.shape[0])
    scores_np, idx_np = index.search(queries.detach().cpu().numpy(), wide)
    scores_w, idx_w = torch.from_numpy(scores_np), torch.from_numpy(idx_np)
    hit_ids = dbid[idx_w.clamp_min(0)]
    valid = (idx_w >= 0) & ((hit_ids != qid[:, None]) | (hit_ids == -1))
    # Stable sort on "invalid" moves valid hits to the front in their original (descending) order.
    order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
    keep = valid.gather(1, order)
    scores_k = scores_w.gather(1, order).masked_fill(~keep, float("-inf"))
    idx_k = idx_w.gather(1, order).masked_fill(~keep, -1)
    return scores_k.to(device), idx_k.to(device)


def _max_excluded(query_ids: torch.Tensor, database_ids: torch.Tensor) -> int:
    """Largest number of database entries any one query must skip (ids of -1 never count)."""
    real = database_ids[database_ids != -1]
    if real.numel() == 0:
        return 0
    values, counts = torch.unique(real, return_counts=True)
    counts = counts[torch.isin(values, query_ids)]
    return int(counts.max()) if counts.numel() else 0


def _as_ids(ids: torch.Tensor | np.ndarray, length: int, name: str) -> torch.Tensor:
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(np.ascontiguousarray(ids))
    if ids.ndim != 1 or ids.shape[0] != length or ids.dtype.is_floating_point:
        raise ValueError(f"{name} must be ({length},) integers, got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def topk_inner_product(
    queries: torch.Tensor | np.ndarray,
    database: torch.Tensor | np.ndarray,
    k: int,
    backend: str = "auto",
    query_ids: torch.Tensor | np.ndarray | None = None,
    database_ids: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, optionally excluding entries that share the query's id.

    With ``query_ids`` and ``database_ids`` both given, database entry ``j`` is never returned for
    query ``i`` when ``database_ids[j] == query_ids[i]``; database ids of -1 (empty or random
    slots) are never excluded. When a query has fewer than ``k`` valid entries the remaining
    columns are padded with index -1 and score -inf (always at the end of the row), so callers
    check ``indices >= 0`` rather than catch an error.

    Args:
        queries: (Q, D) float features.
        database: (N, D) float features.
        k: neighbours per query; clipped to N.
        backend: ``auto``, ``faiss`` or ``torch``.
        query_ids: (Q,) int64 ids of the queries, or None.
        database_ids: (N,) int64 ids of the database entries, or None.

    Returns:
        scores (Q, k) float32, descending; indices (Q, k) int64 into ``database`` (-1 = padding).
    """
    q = _as_float32_tensor(queries)
    db = _as_float32_tensor(database)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"shape mismatch: queries {tuple(q.shape)} vs database {tuple(db.shape)}")
    if db.shape[0] == 0:
        raise MimcliError("nearest-neighbour search over an empty set of features")
    if (query_ids is None) != (database_ids is None):
        raise ValueError("give both query_ids and database_ids, or neither")
    qid = dbid = None
    if query_ids is not None and database_ids is not None:
        qid = _as_ids(query_ids, q.shape[0], "query_ids")
        dbid = _as_ids(database_ids, db.shape[0], "database_ids")
    k = min(k, db.shape[0])
    if resolve_backend(backend, q.device) == "faiss":
        return _topk_faiss(q, db, k, qid, dbid)
    if qid is not None and dbid is not None:
        qid, dbid = qid.to(q.device), dbid.to(q.device)
    return _topk_torch(q, db.to(q.device), k, qid, dbid)
