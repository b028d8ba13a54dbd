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
