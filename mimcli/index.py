"""Exact inner-product nearest-neighbour search: FAISS (``faiss.knn`` on the CPU, a GPU flat index
when GPU FAISS is installed) or chunked torch matmul + topk. Both return the same neighbours;
``auto`` picks per device (see :func:`resolve_backend`).

Optional per-query exclusion by id (a sample must never retrieve its own earlier entry from the
MIM-Refiner queue). The torch backend sets the similarities of excluded entries to -inf in each
block it has materialised anyway, before its top-k: nothing depends on the ids' values, so a
search on a GPU never waits for one (no ``unique``, boolean indexing or read-back). FAISS, which
answers in host memory anyway, asks for k plus the largest number of entries any one query must
skip, drops the excluded hits and keeps the first k that remain. Either way a query left with
fewer than k valid entries is padded with index -1 and score -inf at the end of its row."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from mimcli.errors import MimcliError

Backend = Literal["auto", "faiss", "torch"]
BACKENDS = ("auto", "faiss", "torch")

# Largest similarity block the torch backend materialises at once (elements): 64M floats = 256 MB.
MAX_BLOCK_ELEMENTS = 64 * 1024 * 1024
# Database rows per torch chunk; the running top-k is merged across chunks.
DATABASE_CHUNK = 262_144
# Database rows per FAISS BLAS block: N / 32, within [1,024 (FAISS's default), 8,192]; see
# _faiss_database_block.
FAISS_DATABASE_BLOCKS = 32
FAISS_DATABASE_BLOCK_RANGE = (1_024, 8_192)


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
    """Choose ``faiss`` or ``torch``; both return the same neighbours, so this is speed only.

    ``auto``, per device and independent of size:

    * CPU (and MPS, searched from host memory): FAISS when installed, otherwise torch. Measured
      on 2 Xeon cores (``benchmarks/queue_lookup.py``, ``benchmarks/knn_search.py``), FAISS's
      in-place ``faiss.knn`` runs at ~90% of the float32 GEMM rate on large searches and torch's
      matmul + topk at ~60% (topk is a second pass over every similarity block): FAISS is
      1.4-1.8x faster for queues of 16k-1M entries and 10k-250k train sets, and level with torch
      on a 4k-entry queue, so there is no size below which torch should take over.
    * CUDA: FAISS only with GPU support; otherwise torch on the GPU, since a CPU FAISS search
      would copy the database (the whole queue, every refinement step) to the host and give up
      the GPU's matmul. GPU FAISS is not measured (no GPU FAISS wheels on the machines used).
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
    """Top-k: blocks of at most ``MAX_BLOCK_ELEMENTS`` similarities, computed into one reused
    buffer (a fresh 256 MB tensor per block costs page faults), running top-k merged across
    database chunks. With ids, entries sharing the query's id (database ids of -1 never do) are
    set to -inf in the block before its top-k; -inf hits come back as index -1 (padding)."""
    excluding = query_ids is not None and database_ids is not None
    if excluding:
        # a query id of -1 must match nothing: -2 is no database id
        query_ids = torch.where(query_ids == -1, -2, query_ids)  # type: ignore[arg-type]
    n_query, n_db = queries.shape[0], database.shape[0]
    db_chunk = min(n_db, DATABASE_CHUNK)
    q_chunk = max(1, min(n_query, MAX_BLOCK_ELEMENTS // max(db_chunk, 1)))
    buffer = torch.empty(q_chunk * db_chunk, dtype=torch.float32, device=queries.device)
    out_scores = torch.empty(n_query, k, dtype=torch.float32, device=queries.device)
    out_index = torch.empty(n_query, k, dtype=torch.int64, device=queries.device)
    for q0 in range(0, n_query, q_chunk):
        q = queries[q0 : q0 + q_chunk]
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for d0 in range(0, n_db, db_chunk):
            block = database[d0 : d0 + db_chunk]
            sims = buffer[: q.shape[0] * block.shape[0]].view(q.shape[0], block.shape[0])
            torch.mm(q, block.T, out=sims)
            if excluding:
                same = (
                    database_ids[d0 : d0 + db_chunk][None, :]
                    == (  # type: ignore[index]
                        query_ids[q0 : q0 + q_chunk][:, None]  # type: ignore[index]
                    )
                )
                sims.masked_fill_(same, float("-inf"))
            if k == 1:  # a max is cheaper than topk(1)
                s, i = sims.max(dim=1, keepdim=True)
            else:
                s, i = sims.topk(min(k, block.shape[0]), dim=1)
            i = i + d0
            if best_s is None or best_i is None:
                best_s, best_i = s, i
            else:
                cat_s = torch.cat([best_s, s], dim=1)
                cat_i = torch.cat([best_i, i], dim=1)
                best_s, pick = cat_s.topk(k, dim=1)
                best_i = cat_i.gather(1, pick)
        out_scores[q0 : q0 + q.shape[0]] = best_s  # type: ignore[assignment]
        out_index[q0 : q0 + q.shape[0]] = best_i  # type: ignore[assignment]
    if excluding:  # excluded entries (and only they: similarities are finite) scored -inf
        out_index.masked_fill_(out_scores == float("-inf"), -1)
    return out_scores, out_index


def _faiss_database_block(n_db: int) -> int:
    """Database rows per FAISS BLAS block: ``n_db / 32`` within [1,024, 8,192].

    FAISS runs one BLAS call and one OpenMP reduction per block of (up to 4,096 queries) x
    (1,024 database rows by default): hundreds of fork/joins per search of a large queue. On an
    idle machine that costs little, but when another process wants a core (data-loader workers,
    a second job) every fork/join waits for a descheduled thread, and a 262k-entry queue lookup
    took 5x as long as on an idle machine (torch: 2x). Capping the blocks per search at 32 makes
    it 2x faster under that contention and no slower idle; small databases keep the default
    (a block buffer they would only page-fault in), and 8,192 rows keep the buffer <= 128 MB.
    """
    low, high = FAISS_DATABASE_BLOCK_RANGE
    return int(min(high, max(low, n_db // FAISS_DATABASE_BLOCKS)))


_GPU_RESOURCES: dict[int, Any] = {}


def gpu_resources(device_index: int) -> Any:
    """This process's ``faiss.StandardGpuResources`` for one GPU, made on first use and reused
    (they hold the GPU's scratch memory and streams; making them per search costs more than the
    search of a refinement step's queue)."""
    import faiss

    if device_index not in _GPU_RESOURCES:
        _GPU_RESOURCES[device_index] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device_index]


def _topk_faiss_gpu(
    queries: torch.Tensor, database: torch.Tensor, k: int, device_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the GPU with GPU FAISS, the database searched where it is (a queue on the GPU is
    not copied to the host): ``faiss.knn_gpu`` on torch tensors (``faiss.contrib.torch_utils``),
    with the process's cached resources. Answered as CPU tensors, like the other paths."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

    index = torch.cuda.current_device() if device_index is None else device_index
    scores, idx = faiss.knn_gpu(
        gpu_resources(index),
        queries.detach().float().contiguous(),
        database.detach().float().contiguous(),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
        device=index,
    )
    return scores.cpu(), idx.cpu()


def _topk_faiss(
    queries: torch.Tensor, database: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain top-k with FAISS, answered as CPU tensors: ``faiss.knn_gpu`` on CUDA with GPU FAISS
    (:func:`_topk_faiss_gpu`), else ``faiss.knn`` on the CPU, which searches the array in place
    (building an ``IndexFlatIP`` would first copy the whole database, on every call: a new queue
    every refinement step)."""
    import faiss

    device = queries.device
    if device.type == "cuda" and faiss_gpu_available():
        return _topk_faiss_gpu(queries, database, k, device.index)
    q_np = queries.detach().cpu().numpy()
    # Below this many queries FAISS skips BLAS for a scalar loop that is much slower for wide
    # features; queries arrive in batches, so always take the BLAS path.
    faiss.cvar.distance_compute_blas_threshold = 1
    # For this search only (a FAISS global).
    cvar = faiss.cvar
    saved = cvar.distance_compute_blas_database_bs
    cvar.distance_compute_blas_database_bs = _faiss_database_block(database.shape[0])
    try:
        scores, idx = faiss.knn(
            q_np, database.detach().cpu().numpy(), k, metric=faiss.METRIC_INNER_PRODUCT
        )
    finally:
        cvar.distance_compute_blas_database_bs = saved
    return torch.from_numpy(scores), torch.from_numpy(idx)


def _max_excluded(query_ids: torch.Tensor, database_ids: torch.Tensor) -> int:
    """Largest number of database entries any one query must skip (ids of -1 never count).

    One binary search per database entry into the sorted query ids: O(N log Q), no sort of N."""
    wanted = torch.unique(query_ids[query_ids != -1])  # sorted
    if wanted.numel() == 0:
        return 0
    pos = torch.searchsorted(wanted, database_ids).clamp_max_(wanted.numel() - 1)
    hit = wanted[pos] == database_ids
    if not bool(hit.any()):
        return 0
    return int(torch.bincount(pos[hit], minlength=wanted.numel()).max())


def _drop_excluded(
    scores: torch.Tensor,
    index: torch.Tensor,
    query_ids: torch.Tensor,
    database_ids: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop hits that share the query's id from a wide top list, keep the first ``k`` valid ones
    in order, pad with index -1 / score -inf."""
    hit_ids = database_ids[index.clamp_min(0)]
    valid = (index >= 0) & ((hit_ids != query_ids[:, None]) | (hit_ids == -1))
    # Stable sort on "invalid" moves valid hits to the front in their original (descending) order.
    order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
    keep = valid.gather(1, order)
    return (
        scores.gather(1, order).masked_fill(~keep, float("-inf")),
        index.gather(1, order).masked_fill(~keep, -1),
    )


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
    if resolve_backend(backend, q.device) == "torch":
        db = db.to(q.device, non_blocking=True)
        if qid is not None and dbid is not None:
            qid = qid.to(q.device, non_blocking=True)
            dbid = dbid.to(q.device, non_blocking=True)
        return _topk_torch(q, db, k, qid, dbid)  # on q's device, nothing read back
    if qid is None or dbid is None:
        scores, idx = _topk_faiss(q, db, k)
    else:
        # FAISS answers in host memory. A query loses at most as many hits as the database
        # holds entries with its id, so searching k + that maximum and dropping excluded hits
        # leaves exactly the top k valid entries (no (Q, N) mask).
        qid, dbid = qid.cpu(), dbid.cpu()
        extra = _max_excluded(qid, dbid)
        scores, idx = _topk_faiss(q, db, min(k + extra, db.shape[0]))
        if extra:
            scores, idx = _drop_excluded(scores, idx, qid, dbid, k)
    return scores.to(q.device), idx.to(q.device)
