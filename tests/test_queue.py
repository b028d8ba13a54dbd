import math

import pytest
import torch
import torch.nn.functional as F

from mimcli.errors import MimcliError
from mimcli.queue import NeighbourQueue, neighbour_label_agreement, queue_size

BACKENDS = ["faiss", "torch"]


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _brute_force_order(queue: NeighbourQueue, queries: torch.Tensor, query_ids: torch.Tensor):
    """(B, N) cosine with excluded slots at -inf, and slots sorted by it (descending)."""
    sims = F.normalize(queries, dim=1) @ queue.features.T
    excluded = (query_ids[:, None] == queue.ids[None, :]) & (queue.ids[None, :] != -1)
    sims = sims.masked_fill(excluded, float("-inf"))
    return sims, sims.argsort(dim=1, descending=True)


def test_initial_state_is_random_unit_vectors_with_no_ids():
    queue = NeighbourQueue(6, 4, generator=torch.Generator().manual_seed(0))
    assert queue.features.dtype == torch.float32 and queue.features.shape == (6, 4)
    torch.testing.assert_close(queue.features.norm(dim=1), torch.ones(6))
    assert queue.features.std() > 0.1
    assert queue.ids.tolist() == [-1] * 6 and int(queue.ptr) == 0 and int(queue.filled) == 0
    again = NeighbourQueue(6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(queue.features, again.features)


def test_fifo_wraparound_exact_contents():
    queue = NeighbourQueue(5, 2)

    # Row j of batch b is (10 * b + j, 1), id 10 * b + j: easy to recognise after normalising.
    def batch(b: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        vals = torch.arange(n, dtype=torch.float32) + 10 * b
        return torch.stack([vals, torch.ones(n)], dim=1), vals.long()

    expected_ids = [
        [0, 1, 2, -1, -1],  # ptr 3
        [12, 1, 2, 10, 11],  # ptr 1: wrapped, slot 0 overwritten
        [12, 20, 21, 22, 11],  # ptr 4
        [31, 32, 21, 22, 30],  # ptr 2
    ]
    expected_ptr, expected_filled = [3, 1, 4, 2], [3, 5, 5, 5]
    for b in range(4):
        queue.enqueue(*batch(b))
        assert queue.ids.tolist() == expected_ids[b]
        assert int(queue.ptr) == expected_ptr[b] and int(queue.filled) == expected_filled[b]
    # Each slot holds the normalised vector of its id (ids are the raw first coordinate).
    ids = queue.ids.float()
    torch.testing.assert_close(queue.features, F.normalize(torch.stack([ids, torch.ones(5)], 1)))

    # Partly filled queue: untouched slots keep their random initial vectors.
    fresh = NeighbourQueue(5, 2)
    initial = fresh.features.clone()
    fresh.enqueue(*batch(0))
    assert torch.equal(fresh.features[3:], initial[3:])

    # A batch bigger than the queue keeps the last `size` rows, in the slots they would reach.
    # Ids 50..56 written one by one from ptr 2 would land in slots 2,3,4,0,1,2,3: 50 and 51 are
    # overwritten, and the oldest survivor (52) sits at the new ptr 4.
    queue.enqueue(*batch(5, n=7))
    assert queue.ids.tolist() == [53, 54, 55, 56, 52]
    assert int(queue.ptr) == 4 and int(queue.filled) == 5
    ids = queue.ids.float()
    torch.testing.assert_close(queue.features, F.normalize(torch.stack([ids, torch.ones(5)], 1)))


def test_enqueue_detaches_and_normalises():
    queue = NeighbourQueue(4, 3)
    x = torch.tensor([[3.0, 0.0, 4.0]], requires_grad=True)
    queue.enqueue(x.to(torch.bfloat16) * 2, torch.tensor([7]))
    assert not queue.features.requires_grad
    torch.testing.assert_close(queue.features[0], torch.tensor([0.6, 0.0, 0.8]))
    with pytest.raises(ValueError):
        queue.enqueue(torch.ones(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_self_match(backend):
    queue = NeighbourQueue(8, 4, generator=torch.Generator().manual_seed(1))
    entries = _unit(8, 4, seed=2)
    queue.enqueue(entries, torch.arange(100, 108))
    query = entries[3:4] * 5.0  # exact copy (up to scale) of slot 3, id 103
    own = queue.lookup(query, torch.tensor([103]), backend=backend)
    sims = entries @ entries[3]
    sims[3] = -math.inf
    assert own.positions.item() == int(sims.argmax()) != 3
    assert own.ids.item() != 103
    torch.testing.assert_close(own.neighbours[0], entries[int(sims.argmax())])
    # With a different id the exact copy is found, at similarity 1.
    other = queue.lookup(query, torch.tensor([999]), backend=backend)
    assert other.positions.item() == 3 and other.ids.item() == 103
    assert other.similarity.item() == pytest.approx(1.0, abs=1e-5)
    # Several earlier copies of the same sample (earlier epochs) are all skipped.
    queue.enqueue(query.repeat(3, 1), torch.tensor([103, 103, 103]))
    again = queue.lookup(query, torch.tensor([103]), topk=4, backend=backend)
    assert queue.ids[again.positions].item() != 103


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_is_brute_force_argmax_with_exclusion(backend):
    queue = NeighbourQueue(300, 16, generator=torch.Generator().manual_seed(3))
    entries = _unit(250, 16, seed=4)
    entry_ids = torch.randint(0, 60, (250,), generator=torch.Generator().manual_seed(5))
    queue.enqueue(entries, entry_ids)  # 50 random slots with id -1 remain
    queries = entries[:40] + 0.05 * _unit(40, 16, seed=6)  # close to their own entries
    query_ids = entry_ids[:40]
    result = queue.lookup(queries, query_ids, topk=1, backend=backend)
    sims, order = _brute_force_order(queue, queries, query_ids)
    assert torch.equal(result.positions, order[:, 0])
    torch.testing.assert_close(result.similarity, sims.gather(1, order[:, :1]).squeeze(1))
    torch.testing.assert_close(result.neighbours, queue.features[order[:, 0]])
    assert torch.equal(result.ids, queue.ids[order[:, 0]])
    assert (result.ids != query_ids).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_sampling_stays_in_topk_and_is_reproducible(backend):
    queue = NeighbourQueue(200, 8, generator=torch.Generator().manual_seed(7))
    entries = _unit(200, 8, seed=8)
    entry_ids = torch.arange(200) % 50  # four copies of every id
    queue.enqueue(entries, entry_ids)
    queries, query_ids = entries[:10], entry_ids[:10]
    _, order = _brute_force_order(queue, queries, query_ids)
    top5 = order[:, :5]

    gen = torch.Generator().manual_seed(123)
    draws = torch.stack(
        [queue.lookup(queries, query_ids, 5, gen, backend).positions for _ in range(200)]
    )  # (200, 10)
    in_top5 = (draws[:, :, None] == top5[None]).any(dim=2)
    assert in_top5.all()
    for q in range(10):
        chosen = set(draws[:, q].tolist())
        assert len(chosen) == 5  # 200 uniform draws over 5 slots hit every one
        assert chosen == set(top5[q].tolist())
    assert (queue.ids[draws] != query_ids).all()

    gen_again = torch.Generator().manual_seed(123)
    replay = torch.stack(
        [queue.lookup(queries, query_ids, 5, gen_again, backend).positions for _ in range(200)]
    )
    assert torch.equal(draws, replay)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faiss_and_torch_backends_agree(seed):
    queue = NeighbourQueue(4096, 32, generator=torch.Generator().manual_seed(seed))
    entries = _unit(4000, 32, seed=10 + seed)
    entry_ids = torch.randint(0, 500, (4000,), generator=torch.Generator().manual_seed(seed))
    queue.enqueue(entries, entry_ids)
    queries = entries[:256] + 0.1 * _unit(256, 32, seed=20 + seed)
    query_ids = entry_ids[:256]
    via_faiss = queue.lookup(queries, query_ids, backend="faiss")
    via_torch = queue.lookup(queries, query_ids, backend="torch")
    assert torch.equal(via_faiss.positions, via_torch.positions)
    assert torch.equal(via_faiss.ids, via_torch.ids)
    torch.testing.assert_close(via_faiss.similarity, via_torch.similarity)
    assert (via_torch.ids != query_ids).all()
    # auto (FAISS on CPU when installed, see mimcli.index.resolve_backend) picks the same slots
    via_auto = queue.lookup(queries, query_ids)
    assert torch.equal(via_auto.positions, via_torch.positions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_larger_than_valid_entries_draws_only_valid(backend):
    queue = NeighbourQueue(4, 3)
    queue.enqueue(_unit(4, 3, seed=0), torch.tensor([4, 4, 5, 6]))
    gen = torch.Generator().manual_seed(0)
    queries, query_ids = _unit(1, 3, seed=1).repeat(2, 1), torch.tensor([4, 9])
    draws = torch.stack(
        [queue.lookup(queries, query_ids, 4, gen, backend).positions for _ in range(400)]
    )
    assert set(draws[:, 0].tolist()) == {2, 3}  # slots 0 and 1 hold id 4: padding, never drawn
    assert set(draws[:, 1].tolist()) == {0, 1, 2, 3}
    # uniform over the valid candidates (binomial(400, 1/2): std 10)
    assert 140 <= int((draws[:, 0] == 2).sum()) <= 260
    counts = torch.bincount(draws[:, 1], minlength=4)
    assert (counts >= 60).all() and (counts <= 140).all()


def test_queue_with_only_own_entries_raises():
    """Counted on the device by the look-up (no read there), raised by check()."""
    queue = NeighbourQueue(2, 3)
    queue.enqueue(_unit(2, 3, seed=0), torch.tensor([4, 4]))
    queue.lookup(_unit(1, 3, seed=1), torch.tensor([4]), topk=3)
    assert int(queue.starved) == 1 and "starved" not in queue.state_dict()
    with pytest.raises(MimcliError, match="queue-size"):
        queue.check()
    assert queue.lookup(_unit(1, 3, seed=1), torch.tensor([5])).ids.item() == 4
    queue.check()  # counted since the last check: nothing


def test_state_dict_round_trip():
    queue = NeighbourQueue(50, 8, generator=torch.Generator().manual_seed(0))
    queue.enqueue(_unit(37, 8, seed=1), torch.arange(37))
    queue.enqueue(_unit(20, 8, seed=2), torch.arange(37, 57))  # wraps: ptr 7
    state = {k: v.clone() for k, v in queue.state_dict().items()}
    assert set(state) == {"features", "ids", "ptr", "filled"}
    restored = NeighbourQueue(50, 8, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(restored.features, queue.features)
    restored.load_state_dict(state)
    for name in ("features", "ids", "ptr", "filled"):
        assert torch.equal(getattr(restored, name), getattr(queue, name)), name
    assert int(restored.ptr) == 7 and int(restored.filled) == 50

    queries, query_ids = _unit(16, 8, seed=3), torch.arange(10, 26)
    before = queue.lookup(queries, query_ids, 4, torch.Generator().manual_seed(5))
    after = restored.lookup(queries, query_ids, 4, torch.Generator().manual_seed(5))
    assert torch.equal(before.positions, after.positions)
    assert torch.equal(before.neighbours, after.neighbours)
    # and both keep evolving identically
    queue.enqueue(_unit(3, 8, seed=4), torch.tensor([1, 2, 3]))
    restored.enqueue(_unit(3, 8, seed=4), torch.tensor([1, 2, 3]))
    assert torch.equal(queue.features, restored.features) and int(restored.ptr) == 10


def test_queue_size():
    assert queue_size("auto", 1000) == 1000
    assert queue_size("auto", 10**6) == 65536
    assert queue_size(4096, 10) == 4096
    assert queue_size("512", 10) == 512
    for bad in (0, -3, "0", "big", "1.5", True, 2.0):
        with pytest.raises(MimcliError, match="queue-size"):
            queue_size(bad, 1000)  # type: ignore[arg-type]
    with pytest.raises(MimcliError):
        queue_size("auto", 0)


def test_neighbour_label_agreement():
    labels_by_id = torch.tensor([0, 0, 1, 1, 2])
    result_ids = torch.tensor([1, 2, -1, 4, 3])
    query_labels = torch.tensor([0, 0, 2, 2, 0])
    # real neighbours: id1 (0 vs 0 ok), id2 (1 vs 0 no), id4 (2 vs 2 ok), id3 (1 vs 0 no)
    agreement = neighbour_label_agreement(result_ids, query_labels, labels_by_id)
    assert agreement.dim() == 0 and float(agreement) == pytest.approx(0.5)
    assert math.isnan(
        neighbour_label_agreement(torch.tensor([-1]), torch.tensor([0]), labels_by_id)
    )
