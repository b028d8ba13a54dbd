"""Nearest-neighbour queue, one per head: a FIFO of past projections that supplies each sample's
positive (NNCLR, Dwibedi et al., arXiv 2104.14548; as used by MIM-Refiner, Alkin et al.,
arXiv 2402.10093, section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimcli.errors import MimcliError
from mimcli.index import topk_inner_product

# The paper's queue length; smaller datasets get one slot per sample (random entries would linger).
MAX_AUTO_QUEUE_SIZE = 65_536
MAX_QUEUE_SIZE = 2**24  # 256x the paper's queue; larger is a typo (and a memory bomb)


@dataclass
class NeighbourResult:
    """What :meth:`NeighbourQueue.lookup` chose for each query.

    Attributes:
        neighbours: (B, D) float32 queue entries (L2-normalised, detached).
        similarity: (B,) float32 cosine similarity of each query to its chosen neighbour.
        positions: (B,) int64 queue slots chosen.
        ids: (B,) int64 dataset ids of the chosen entries (-1 = a random initial entry).
    """

    neighbours: Tensor
    similarity: Tensor
    positions: Tensor
    ids: Tensor


class NeighbourQueue(nn.Module):
    """FIFO of L2-normalised projections with the dataset ids of their samples.

    All state lives in buffers, so ``state_dict()`` / ``load_state_dict()`` checkpoint the queue
    exactly. The write pointer and fill count are also kept as Python ints (the ``ptr`` and
    ``filled`` buffers mirror them with ``fill_``, a write to the device, and are read back only
    when a state is loaded), so neither call reads anything from the device: a refinement step on a
    GPU never waits for it. The training loop drives it with explicit calls, in this order each
    step::

        result = queue.lookup(projection, ids, topk=...)   # 1. look up (before enqueueing)
        ...loss uses result.neighbours...
        queue.enqueue(gathered_projection, gathered_ids)   # 2. then enqueue

    Looking up first means a sample's current projection is never its own neighbour; the id
    exclusion additionally skips its projections from earlier epochs.

    Under DDP every rank looks up its own queries, but the caller all-gathers the features and
    ids of the whole global batch (in rank order) before ``enqueue``, so every rank's queue stays
    identical without any collective in here.

    Args:
        size: number of slots N.
        dim: feature width D.
        generator: seeds the random initial entries (the head warm-up replaces them).
    """

    features: Tensor
    ids: Tensor
    ptr: Tensor
    filled: Tensor
    starved: Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue needs size >= 1 and dim >= 1, got size={size} dim={dim}")
        initial = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("features", initial)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("filled", torch.tensor(0, dtype=torch.int64))
        # queries since the last check that found no entry but their own (see lookup); not
        # part of the state: a run stops before it saves one with any
        self.register_buffer("starved", torch.tensor(0, dtype=torch.int64), persistent=False)
        self._ptr = 0
        self._filled = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the host copies follow the loaded buffers (one read when a state is loaded)
        self._ptr, self._filled = int(self.ptr), int(self.filled)

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    @torch.no_grad()
    def enqueue(self, features: Tensor, ids: Tensor) -> None:
        """Write detached, L2-normalised copies at ``ptr``, wrapping around (oldest out first).

        Equivalent to writing the rows one by one: with B > N only the last N rows survive, in
        the slots they would have reached.

        Args:
            features: (B, D) projections (any float dtype; stored as float32).
            ids: (B,) int64 dataset ids of the samples.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"enqueue expects (B, {self.dim}) features, got {tuple(features.shape)}"
            )
        if ids.shape != features.shape[:1]:
            raise ValueError(f"enqueue expects ({features.shape[0]},) ids, got {tuple(ids.shape)}")
        n_new = features.shape[0]
        if n_new == 0:
            return
        device = self.features.device
        rows = F.normalize(features.detach().float(), dim=1).to(device, non_blocking=True)
        row_ids = ids.detach().long().to(device, non_blocking=True)
        start = self._ptr
        if n_new > self.size:
            rows, row_ids = rows[-self.size :], row_ids[-self.size :]
            start = (start + n_new - self.size) % self.size
        # at most two contiguous runs of slots: up to the end, then from the front
        first = min(rows.shape[0], self.size - start)
        self.features[start : start + first] = rows[:first]
        self.ids[start : start + first] = row_ids[:first]
        rest = rows.shape[0] - first
        if rest:
            self.features[:rest] = rows[first:]
            self.ids[:rest] = row_ids[first:]
        self._ptr = (self._ptr + n_new) % self.size
        self._filled = min(self.size, self._filled + n_new)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    @torch.no_grad()
    def lookup(
        self,
        queries: Tensor,
        query_ids: Tensor,
        topk: int = 1,
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ) -> NeighbourResult:
        """Pick a neighbour for each query by cosine similarity, never one with the query's id.

        ``topk == 1`` takes the nearest entry (head warm-up); ``topk > 1`` draws uniformly among
        the ``topk`` nearest (refinement uses 20). Does not modify the queue.

        Args:
            queries: (B, D) projections; L2-normalised here, gradients are not tracked.
            query_ids: (B,) int64 dataset ids of the queries.
            topk: size of the candidate set to draw from.
            generator: CPU generator for the draw (only used when ``topk > 1``); pass a seeded
                one and checkpoint its state for reproducible, resumable runs.
            backend: ``auto``, ``faiss`` or ``torch``; ``auto`` is FAISS on the CPU (searching
                the queue in place, no index is built) and torch on CUDA unless FAISS has GPU
                support (:func:`mimcli.index.resolve_backend`).

        Returns:
            the chosen entries, see :class:`NeighbourResult`.

        A query with no valid entry (every slot holds its own id) is not an error here, which
        would need a read from the device: it gets slot 0 and is counted in the ``starved``
        buffer, which :meth:`check` (or the training loop at its logging steps, through
        :meth:`mimcli.objectives.base.Objective.alarms`) turns into a :class:`MimcliError`.
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        device = self.features.device
        q = F.normalize(queries.detach().float(), dim=1).to(device, non_blocking=True)
        q_ids = query_ids.detach().long().to(device, non_blocking=True)
        scores, slots = topk_inner_product(
            q, self.features, topk, backend=backend, query_ids=q_ids, database_ids=self.ids
        )
        scores = scores.to(device, non_blocking=True)
        slots = slots.to(device, non_blocking=True)
        n_valid = (slots >= 0).sum(dim=1)  # valid hits come first; padding (-1) fills the rest
        self.starved.add_((n_valid == 0).sum())
        if slots.shape[1] == 1:
            choice = torch.zeros_like(n_valid)
        else:
            draw = torch.rand(n_valid.shape[0], generator=generator).to(device, non_blocking=True)
            choice = (draw * n_valid).long().clamp_max(n_valid - 1).clamp_min(0)
        positions = slots.gather(1, choice[:, None]).squeeze(1).clamp_min(0)
        return NeighbourResult(
            neighbours=self.features[positions].clone(),
            similarity=scores.gather(1, choice[:, None]).squeeze(1),
            positions=positions,
            ids=self.ids[positions].clone(),
        )

    def starved_message(self) -> str:
        """The error for a look-up that found only the query's own entries."""
        return (
            f"the neighbour queue ({self.size} slots) holds only the query's own entries; "
            "use a larger --queue-size"
        )

    def check(self) -> None:
        """Raise if a look-up since the last check found only the query's own entries (one
        read from the device; the training loop reads the count with its metrics instead).

        Raises:
            MimcliError: with :meth:`starved_message`.
        """
        if int(self.starved):
            self.starved.zero_()
            raise MimcliError(self.starved_message())


def queue_size(spec: str | int, dataset_size: int) -> int:
    """Resolve ``--queue-size``.

    Args:
        spec: ``"auto"`` (``min(65536, dataset_size)``: the paper's size, or one slot per sample
            on smaller data so random initial entries do not linger) or a positive integer.
        dataset_size: number of training samples.

    Returns:
        the number of queue slots.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            if dataset_size < 1:
                raise MimcliError("--queue-size auto needs a non-empty training set")
            return min(MAX_AUTO_QUEUE_SIZE, dataset_size)
        if not (text.isascii() and text.isdigit()):
            raise MimcliError(f"--queue-size must be 'auto' or a positive integer, got {spec!r}")
        spec = int(text)
    if isinstance(spec, bool) or not isinstance(spec, int) or not 1 <= spec <= MAX_QUEUE_SIZE:
        raise MimcliError(
            f"--queue-size must be 'auto' or a whole number in 1..{MAX_QUEUE_SIZE}, got {spec!r}"
        )
    return spec


def neighbour_label_agreement(
    result_ids: Tensor, query_labels: Tensor, labels_by_id: Tensor
) -> Tensor:
    """Fraction of queries whose chosen neighbour has the query's label (a monitoring metric),
    computed where ``labels_by_id`` lives without reading anything back (no boolean indexing).

    Neighbours with id -1 (random initial entries) are left out of both counts.

    Args:
        result_ids: (B,) int64 dataset ids of the chosen neighbours (``NeighbourResult.ids``).
        query_labels: (B,) int64 labels of the queries.
        labels_by_id: (M,) int64 label of every dataset id.

    Returns:
        0-dim float32 tensor on ``labels_by_id``'s device: agreement in [0, 1], or NaN when no
        neighbour has a real id yet.
    """
    device = labels_by_id.device
    result_ids = result_ids.to(device, non_blocking=True)
    query_labels = query_labels.to(device, non_blocking=True)
    real = result_ids >= 0
    same = (labels_by_id[result_ids.clamp_min(0)] == query_labels) & real
    count = real.sum()
    agreement = same.sum().float() / count.clamp_min(1).float()
    return torch.where(count > 0, agreement, torch.full_like(agreement, float("nan")))
