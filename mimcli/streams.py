"""Reading streams (``wds/`` and ``hfids/`` sources, :mod:`mimcli.datasources`) as torch
``IterableDataset``\\ s.

Features (probe, eval, refine's monitor): :class:`OrderedImages`, every sample once, each
DataLoader worker reading every L-th shard in order.

Refinement: :class:`StreamBatches`, one batch per step, deterministic in (seed, stage, epoch):

- each epoch the shards (those holding kept samples) are permuted by a generator seeded from
  (seed, stage, epoch), as :class:`mimcli.views.BatchPlan` seeds its permutation; rank ``r`` of
  ``W`` takes every W-th shard of that order, and its ``L`` lanes (one per DataLoader worker)
  every L-th of those: ranks and workers read disjoint shards;
- a lane reads its shards in turn, through a shuffle buffer seeded from (seed, stage, epoch,
  rank, lane), and starts over when they run dry (its seeded order again), so every rank runs the
  same ``images // batch`` steps per epoch and no collective waits on a rank with less data;
- step ``j`` of an epoch comes from lane ``j % L`` (its ``j // L``-th batch): the order does not
  depend on when a run started, so ``--resume`` skips the samples already consumed (read, not
  decoded) and continues sample for sample. The lane count is part of the order, so a resumed
  run keeps its run's (``data_lanes`` in config.json).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mimcli.data import BAD_IMAGE_ERRORS as BAD_IMAGE
from mimcli.data import ImageDataset, ImageList
from mimcli.errors import MimcliError

SHUFFLE_BUFFER = 1000  # samples per lane (raw records: ~0.1 MB each for ImageNet JPEGs)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _selection(images: ImageList) -> dict[int, int] | None:
    """Stream row -> ImageList position (None: every row, position = row)."""
    return None if images.rows is None else {r: i for i, r in enumerate(images.rows)}


def live_shards(images: ImageList) -> list[int]:
    """The shards that hold at least one of ``images``' samples."""
    offsets = images.reader.offsets
    if images.rows is None:
        return [s for s in range(len(offsets) - 1) if offsets[s + 1] > offsets[s]]
    hit = np.unique(np.searchsorted(offsets, np.asarray(images.rows), side="right") - 1)
    return [int(s) for s in hit]


def stream_lanes(images: ImageList, world: int, workers: int, explicit: bool) -> int:
    """Lanes (DataLoader workers) per rank for a stream; one clear line when its shards cannot
    give every rank and worker its own. ``explicit``: the worker count was asked for; else it
    shrinks to what the shards allow, and to a count that divides each rank's shards evenly
    when one is at least half of it (every lane delivers the same number of batches: uneven
    lanes repeat some samples and skip others each epoch, ~1/shards-per-lane of them)."""
    shards = len(live_shards(images))
    lanes = max(1, workers)
    if shards < world * lanes and not explicit:
        lanes = max(1, shards // world)
    if not explicit:  # lanes that split a rank's shards evenly, if that costs at most half
        per_rank = shards // world
        even = [n for n in range(lanes, 0, -1) if per_rank % n == 0 and 2 * n >= lanes]
        lanes = even[0] if even else lanes
    if shards < world * lanes:
        raise MimcliError(
            f"{images.root}: {shards} shard(s) cannot give each of {world} process(es) x "
            f"{lanes} data worker(s) its own; write more, smaller shards or lower --num-workers"
        )
    return lanes


class OrderedImages(IterableDataset):
    """``(image tensor or None, label, position)`` for every sample of a stream ImageList;
    worker ``w`` of ``L`` reads shards ``w, w+L, ...`` in order (None marks an unreadable
    image)."""

    def __init__(self, images: ImageList, transform: Callable[[Image.Image], Any]) -> None:
        self.images, self.transform = images, transform

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        worker, workers = _worker()
        stream, images = self.images.reader, self.images
        offsets, where = stream.offsets, _selection(images)
        for shard in live_shards(images)[worker::workers]:
            row = int(offsets[shard])
            for record in stream.read(shard):
                pos = row if where is None else where.get(row)
                row += 1
                if pos is None:
                    continue
                try:
                    item = self.transform(stream.decode(record))
                except BAD_IMAGE:
                    item = None
                yield item, images.labels[pos], pos


def image_dataset(images: ImageList, transform: Callable[[Image.Image], Any]) -> Any:
    """``(tensor or None, label, position)`` items of ``images``: random access for folders and
    datasets (:class:`mimcli.data.ImageDataset`), shard by shard for streams
    (:class:`OrderedImages`; a worker without shards ends at once)."""
    if images.streaming:
        return OrderedImages(images, transform)
    return ImageDataset(images, transform)


def shuffle_buffer(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle of a (long) stream through a buffer of ``size`` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class StreamBatches(IterableDataset):
    """This rank's batches of one stage from step ``start`` (see the module docstring); each
    item is ``collate(list of (views or None, label, position))``. ``sample(record, epoch_key,
    position)`` decodes and transforms one sample (seeded as the map-style path seeds)."""

    def __init__(
        self,
        images: ImageList,
        sample: Callable[[Any, int, int], Any],
        collate: Callable[[list[Any]], Any],
        *,
        seed: int,
        stage: int,
        start: int,
        total: int,
        batch_size: int,
        lanes: int,
        rank: int,
        world: int,
    ) -> None:
        self.images, self.sample, self.collate = images, sample, collate
        self.seed, self.stage, self.start, self.total = seed, stage, start, total
        self.per_epoch = len(images) // batch_size
        self.per_rank = batch_size // world
        self.lanes, self.rank, self.world = lanes, rank, world
        self.shards = live_shards(images)
        self.where = _selection(images)  # stream row -> position, built once
        if len(self.shards) < world * lanes:  # a lane without shards would wait forever
            raise MimcliError(
                f"{images.root}: {len(self.shards)} shard(s) cannot give each of {world} "
                f"process(es) x {lanes} lane(s) its own (a resumed run keeps its lanes: resume "
                "it on as many processes as it started with)"
            )

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def lane_shards(self, epoch: int, lane: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.stage * 100 + epoch)
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()]
        return order[self.rank :: self.world][lane :: self.lanes]

    def lane(self, epoch: int, lane: int) -> Iterator[tuple[int, Any]]:
        """(position, raw record) of one lane, shuffled, wrapping around forever."""
        stream, offsets, where = self.images.reader, self.images.reader.offsets, self.where
        shards = self.lane_shards(epoch, lane)

        def one_pass() -> Iterator[tuple[int, Any]]:
            for shard in shards:
                row = int(offsets[shard])
                for record in stream.read(shard):
                    pos = row if where is None else where.get(row)
                    row += 1
                    if pos is not None:
                        yield pos, record

        held = self.held(shards)
        if not held:
            raise MimcliError(f"{self.images.root}: lane {lane} of rank {self.rank} has no samples")
        rng = np.random.default_rng([self.seed, self.stage, epoch, self.rank, lane])
        size = max(1, min(SHUFFLE_BUFFER, held))

        def passes() -> Iterator[tuple[int, Any]]:
            while True:  # the buffer drains at the end of each pass: a pass gives each sample once
                yield from shuffle_buffer(one_pass(), size, rng)

        return passes()

    def held(self, shards: list[int]) -> int:
        """How many of the kept samples ``shards`` hold (from the index, nothing read)."""
        offsets = self.images.reader.offsets
        if self.images.rows is None:
            return int(sum(offsets[s + 1] - offsets[s] for s in shards))
        rows = np.sort(np.asarray(self.images.rows))
        return int(
            sum(
                np.searchsorted(rows, offsets[s + 1]) - np.searchsorted(rows, offsets[s])
                for s in shards
            )
        )

    def __iter__(self) -> Iterator[Any]:
        worker, workers = _worker()
        if workers != self.lanes:
            raise RuntimeError(f"StreamBatches: {workers} workers for {self.lanes} lanes")
        current: tuple[int, int] | None = None
        it: Iterator[tuple[int, Any]] | None = None
        taken = 0  # batches this lane iterator has given
        for step in range(self.start + worker, self.total, workers):
            epoch, pos = divmod(step, self.per_epoch)
            lane, k = pos % self.lanes, pos // self.lanes
            if current != (epoch, lane):
                current, it, taken = (epoch, lane), self.lane(epoch, lane), 0
            assert it is not None
            for _ in range((k - taken) * self.per_rank):  # resume: skip, do not decode
                next(it)
            items = []
            for _ in range(self.per_rank):
                position, record = next(it)
                key = self.stage * 100_000 + epoch
                items.append(
                    (self.sample(record, key, position), self.images.labels[position], position)
                )
            taken = k + 1
            yield self.collate(items)
