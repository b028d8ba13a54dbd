import numpy as np
import pytest
import torch

from mimcli import index
from mimcli.errors import MimcliError
from mimcli.index import resolve_backend, topk_inner_product


@pytest.mark.parametrize("n_db,n_q,d,k", [(500, 37, 16, 5), (3000, 200, 64, 20), (7, 3, 8, 10)])
def test_faiss_and_torch_give_same_neighbours(n_db, n_q, d, k):
    gen = torch.Generator().manual_seed(n_db)
    db = torch.nn.functional.normalize(torch.randn(n_db, d, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(n_q, d, generator=gen), dim=1)
    s_f, i_f = topk_inner_product(q, db, k, backend="faiss")
    s_t, i_t = topk_inner_product(q, db, k, backend="torch")
    assert i_f.shape == (n_q, min(k, n_db))
    assert torch.equal(i_f, i_t)
    torch.testing.assert_close(s_f, s_t, atol=1e-5, rtol=1e-5)
    # and both equal a brute-force argsort
    full = q @ db.T
    expected = full.argsort(dim=1, descending=True)[:, : min(k, n_db)]
    assert torch.equal(i_t, expected)


def test_torch_backend_chunks_queries_and_database(monkeypatch):
    monkeypatch.setattr(index, "DATABASE_CHUNK", 64)
    monkeypatch.setattr(index, "MAX_BLOCK_ELEMENTS", 64 * 5)
    gen = torch.Generator().manual_seed(1)
    db = torch.randn(1000, 8, generator=gen)
    q = torch.randn(33, 8, generator=gen)
    s, i = topk_inner_product(q, db, 7, backend="torch")
    full = q @ db.T
    ref_s, ref_i = full.topk(7, dim=1)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s)


def test_numpy_inputs_and_errors():
    db = np.eye(4, dtype=np.float64)
    s, i = topk_inner_product(np.array([[0.0, 0.0, 1.0, 0.0]]), db, 2, backend="torch")
    assert i[0, 0].item() == 2 and s[0, 0].item() == pytest.approx(1.0)
    with pytest.raises(MimcliError, match="knn-backend"):
        resolve_backend("annoy")
    with pytest.raises(MimcliError, match="empty"):
        topk_inner_product(np.ones((1, 4)), np.zeros((0, 4)), 1)
    assert resolve_backend("auto", "cpu") == "faiss"


def _brute_force_excluded(q, db, q_ids, db_ids, k):
    """Reference: full similarity matrix, excluded entries at -inf, argsort; -1 past the valid."""
    full = q @ db.T
    mask = (q_ids[:, None] == db_ids[None, :]) & (db_ids[None, :] != -1)
    full = full.masked_fill(mask, float("-inf"))
    scores, order = full.sort(dim=1, descending=True)
    scores, order = scores[:, :k], order[:, :k]
    return scores, order.masked_fill(scores == float("-inf"), -1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("n_db,n_q,d,k,n_ids", [(400, 50, 16, 5, 60), (2000, 128, 32, 20, 300)])
def test_exclusion_matches_brute_force(backend, n_db, n_q, d, k, n_ids):
    gen = torch.Generator().manual_seed(n_db + k)
    db = torch.nn.functional.normalize(torch.randn(n_db, d, generator=gen), dim=1)
    db_ids = torch.randint(-1, n_ids, (n_db,), generator=gen)  # repeated ids and some -1 slots
    q_ids = torch.randint(0, n_ids, (n_q,), generator=gen)
    q_ids[::7] = -1  # queries whose copy sits in a random slot: never excluded
    # Every query has an exact copy of itself in the database under its own id: the top hit
    # without exclusion, and never returned with it (unless the id is -1).
    q = db[:n_q].clone()
    db_ids[:n_q] = q_ids
    s, i = topk_inner_product(q, db, k, backend=backend, query_ids=q_ids, database_ids=db_ids)
    ref_s, ref_i = _brute_force_excluded(q, db, q_ids, db_ids, k)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, atol=1e-5, rtol=1e-5)
    own = q_ids != -1
    assert own.any() and (~own).any()
    assert not (i[own] == torch.arange(n_q)[own, None]).any()
    assert torch.equal(i[~own, 0], torch.arange(n_q)[~own])
    returned_ids = db_ids[i]
    assert not ((returned_ids == q_ids[:, None]) & (returned_ids != -1)).any()


def test_exclusion_backends_agree_and_torch_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    db = torch.randn(1000, 8, generator=gen)
    db_ids = torch.randint(0, 40, (1000,), generator=gen)  # ~25 entries per id to skip
    q = torch.randn(33, 8, generator=gen)
    q_ids = torch.randint(0, 40, (33,), generator=gen)
    s_f, i_f = topk_inner_product(q, db, 7, "faiss", query_ids=q_ids, database_ids=db_ids)
    monkeypatch.setattr(index, "DATABASE_CHUNK", 64)
    monkeypatch.setattr(index, "MAX_BLOCK_ELEMENTS", 64 * 5)
    s_t, i_t = topk_inner_product(q, db, 7, "torch", query_ids=q_ids, database_ids=db_ids)
    ref_s, ref_i = _brute_force_excluded(q, db, q_ids, db_ids, 7)
    assert torch.equal(i_f, ref_i) and torch.equal(i_t, ref_i)
    torch.testing.assert_close(s_f, ref_s)
    torch.testing.assert_close(s_t, ref_s)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exclusion_pads_with_minus_one_and_neg_inf(backend):
    db = torch.eye(4)
    db_ids = torch.tensor([5, 5, 6, -1])
    q = torch.tensor([[1.0, 0.5, 0.25, 0.1], [1.0, 0.5, 0.25, 0.1]])
    q_ids = torch.tensor([5, 6])
    s, i = topk_inner_product(q, db, 4, backend, query_ids=q_ids, database_ids=db_ids)
    assert i.tolist() == [[2, 3, -1, -1], [0, 1, 3, -1]]
    assert s[0, :2].tolist() == pytest.approx([0.25, 0.1])
    assert s[1, :3].tolist() == pytest.approx([1.0, 0.5, 0.1])
    assert torch.isneginf(s[0, 2:]).all() and torch.isneginf(s[1, 3])
    # no ids: plain top-k, unchanged behaviour
    _, plain = topk_inner_product(q, db, 4, backend)
    assert plain[0].tolist() == [0, 1, 2, 3]


def test_exclusion_argument_errors():
    db, q = torch.randn(5, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="both"):
        topk_inner_product(q, db, 1, "torch", query_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="database_ids"):
        topk_inner_product(
            q,
            db,
            1,
            "torch",
            query_ids=torch.tensor([0, 1]),
            database_ids=torch.zeros(4, dtype=torch.int64),
        )
    ids = np.arange(5)
    _, i = topk_inner_product(q, db, 5, "faiss", query_ids=np.array([0, 1]), database_ids=ids)
    assert (i[0] != 0).all() and (i[1] != 1).all() and (i[:, -1] == -1).all()


def test_auto_backend_rule(monkeypatch):
    """auto: FAISS on CPU (and MPS) when installed, at every size; on CUDA only GPU FAISS."""
    monkeypatch.setattr(index, "faiss_available", lambda: True)
    monkeypatch.setattr(index, "faiss_gpu_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "faiss"
    assert resolve_backend("auto", "mps") == "faiss"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "torch"
    monkeypatch.setattr(index, "faiss_gpu_available", lambda: True)
    assert resolve_backend("auto", "cuda") == "faiss"
    monkeypatch.setattr(index, "faiss_available", lambda: False)
    monkeypatch.setattr(index, "faiss_gpu_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(MimcliError, match="not installed"):
        resolve_backend("faiss", "cpu")


def test_faiss_search_restores_block_sizes():
    import faiss

    before = (
        faiss.cvar.distance_compute_blas_query_bs,
        faiss.cvar.distance_compute_blas_database_bs,
    )
    db = torch.nn.functional.normalize(torch.randn(100_000, 4), dim=1)  # blocks of 3,125 rows
    q = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    assert index._faiss_database_block(db.shape[0]) == 3_125
    _, i = topk_inner_product(q, db, 3, "faiss")
    assert torch.equal(i, (q @ db.T).topk(3, dim=1).indices)
    after = (
        faiss.cvar.distance_compute_blas_query_bs,
        faiss.cvar.distance_compute_blas_database_bs,
    )
    assert after == before


def test_faiss_database_block_rule():
    """N / 32 database rows per FAISS BLAS block, never below FAISS's 1,024 nor above 8,192."""
    sizes = (10, 32_768, 65_536, 262_144, 10**7)
    assert [index._faiss_database_block(n) for n in sizes] == [1_024, 1_024, 2_048, 8_192, 8_192]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_top1_over_chunks_is_argmax(monkeypatch, backend):
    monkeypatch.setattr(index, "DATABASE_CHUNK", 64)
    monkeypatch.setattr(index, "MAX_BLOCK_ELEMENTS", 64 * 5)
    gen = torch.Generator().manual_seed(3)
    db, q = torch.randn(1000, 8, generator=gen), torch.randn(33, 8, generator=gen)
    s, i = topk_inner_product(q, db, 1, backend)
    full = q @ db.T
    assert i.shape == (33, 1) and torch.equal(i[:, 0], full.argmax(dim=1))
    torch.testing.assert_close(s[:, 0], full.max(dim=1).values)


def test_max_excluded_matches_counting():
    gen = torch.Generator().manual_seed(11)
    for n_db, n_ids in [(500, 40), (500, 5000), (3, 2)]:
        db_ids = torch.randint(-1, n_ids, (n_db,), generator=gen)
        q_ids = torch.cat([torch.randint(-1, n_ids, (30,), generator=gen), torch.tensor([-1])])
        expected = max(
            [int(((db_ids == qi) & (db_ids != -1)).sum()) for qi in q_ids.tolist()], default=0
        )
        assert index._max_excluded(q_ids, db_ids) == expected
    assert index._max_excluded(torch.tensor([-1, -1]), torch.tensor([-1, 3])) == 0
    assert index._max_excluded(torch.tensor([7]), torch.tensor([1, 2, 3])) == 0


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exclusion_without_shared_ids_is_plain_search(backend):
    gen = torch.Generator().manual_seed(5)
    db, q = torch.randn(300, 16, generator=gen), torch.randn(20, 16, generator=gen)
    plain_s, plain_i = topk_inner_product(q, db, 7, backend)
    s, i = topk_inner_product(
        q, db, 7, backend, query_ids=torch.arange(1000, 1020), database_ids=torch.arange(300)
    )
    assert torch.equal(i, plain_i)
    torch.testing.assert_close(s, plain_s)


def test_gpu_faiss_resources_are_made_once_and_the_database_is_searched_in_place(monkeypatch):
    """The GPU path (not runnable without a GPU) with FAISS's GPU entry points stood in for: one
    ``StandardGpuResources`` per process and GPU, reused across searches, and the database
    handed to ``faiss.knn_gpu`` as the torch tensor it is (no host copy of the queue)."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (imported first, as _topk_faiss_gpu does)

    made, calls = [], []

    class Resources:
        def __init__(self):
            made.append(self)

    def knn_gpu(res, xq, xb, k, metric=None, device=None):
        calls.append((res, xb, device))
        scores, ids = torch.topk(xq @ xb.T, k, dim=1)
        return scores, ids

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(index, "_GPU_RESOURCES", {})
    gen = torch.Generator().manual_seed(0)
    database = torch.randn(50, 8, generator=gen)
    for _ in range(3):
        queries = torch.randn(4, 8, generator=gen)
        scores, ids = index._topk_faiss_gpu(queries, database, 5, 0)
        expected = torch.topk(queries @ database.T, 5, dim=1)
        assert torch.equal(ids, expected.indices) and torch.allclose(scores, expected.values)
    assert len(made) == 1 and all(res is made[0] for res, _, _ in calls)
    assert all(xb.data_ptr() == database.data_ptr() and dev == 0 for _, xb, dev in calls)
    index._topk_faiss_gpu(torch.randn(2, 8), database, 1, 1)  # another GPU: its own resources
    assert len(made) == 2
