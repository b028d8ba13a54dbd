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
    exactly. The training loop drives it with explicit calls, in this order each step::

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

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue needs size >= 1 and dim >= 1, got size={size} dim={dim}")
        initial = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("features", initial)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("filled", torch.tensor(0, dtype=torch.int64))

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
        rows = F.normalize(features.detach().float(), dim=1).to(self.features.device)
        row_ids = ids.detach().long().to(self.ids.device)
        start = int(self.ptr)
        if n_new > self.size:
            rows, row_ids = rows[-self.size :], row_ids[-self.size :]
            start += n_new - self.size
        slots = (start + torch.arange(rows.shape[0], device=self.features.device)) % self.size
        self.features[slots] = rows
        self.ids[slots] = row_ids
        self.ptr.fill_((int(self.ptr) + n_new) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n_new))

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

        Raises:
            MimcliError: a query has no valid entry (every slot holds its own id).
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        q = F.normalize(queries.detach().float(), dim=1).to(self.features.device)
        q_ids = query_ids.detach().long().to(self.ids.device)
        scores, slots = topk_inner_product(
            q, self.features, topk, backend=backend, query_ids=q_ids, database_ids=self.ids
        )
        scores, slots = scores.to(self.features.device), slots.to(self.features.device)
        n_valid = (slots >= 0).sum(dim=1)  # valid hits come first; padding (-1) fills the rest
        if bool((n_valid == 0).any()):
            raise MimcliError(
                f"the neighbour queue ({self.size} slots) holds only the query's own entries; "
                "use a larger --queue-size"
            )
        if slots.shape[1] == 1:
            choice = torch.zeros_like(n_valid)
        else:
            draw = torch.rand(n_valid.shape[0], generator=generator).to(n_valid.device)
            choice = (draw * n_valid).long().clamp_max(n_valid - 1)
        positions = slots.gather(1, choice[:, None]).squeeze(1)
        return NeighbourResult(
            neighbours=self.features[positions].clone(),
            similarity=scores.gather(1, choice[:, None]).squeeze(1),
            positions=positions,
            ids=self.ids[positions].clone(),
        )


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
        if not text.isdigit():
            raise MimcliError(f"--queue-size must be 'auto' or a positive integer, got {spec!r}")
        spec = int(text)
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise MimcliError(f"--queue-size must be 'auto' or a positive integer, got {spec!r}")
    return spec


def neighbour_label_agreement(
    result_ids: Tensor, query_labels: Tensor, labels_by_id: Tensor
) -> float:
    """Fraction of queries whose chosen neighbour has the query's label (a monitoring metric).

    Neighbours with id -1 (random initial entries) are left out of both counts.

    Args:
        result_ids: (B,) int64 dataset ids of the chosen neighbours (``NeighbourResult.ids``).
        query_labels: (B,) int64 labels of the queries.
        labels_by_id: (M,) int64 label of every dataset id.

    Returns:
        agreement in [0, 1], or NaN when no neighbour has a real id yet.
    """
    device = labels_by_id.device
    result_ids, query_labels = result_ids.to(device), query_labels.to(device)
    real = result_ids >= 0
    if not bool(real.any()):
        return float("nan")
    same = labels_by_id[result_ids[real]] == query_labels[real]
    return float(same.float().mean())
