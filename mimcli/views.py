"""Multi-crop views for refinement: 2 global + N local crops with BYOL-style augmentations
(METHOD §1.4; MIM-Refiner, arXiv 2402.10093; augmentations of BYOL, arXiv 2006.07733).

Every sample's randomness is seeded from (seed, epoch, dataset index), so the views of a sample do
not depend on which DataLoader worker made them: a resumed run sees exactly the same images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from mimcli import distributed as dist
from mimcli.data import BAD_IMAGE_ERRORS, ImageDataset, ImageList
from mimcli.errors import MimcliError

# The paper's sizes at 224 px: global 224, local 96 (98 for patch-14 models).
PAPER_GLOBAL, PAPER_LOCAL = 224, 96


@dataclass
class ViewConfig:
    """How the views of one image are made (sizes in pixels)."""

    global_size: int
    local_size: int
    local_crops: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    photometric: bool = True  # BYOL colour jitter / grayscale / blur / solarize; off: crop + flip

    @property
    def num_views(self) -> int:
        return 2 + self.local_crops


def default_view_config(
    pretrained_cfg: dict[str, Any], patch_size: int, local_crops: int = 10, **overrides: Any
) -> ViewConfig:
    """Scale the paper's 224/96 crops to the model's input size; local crops are rounded to a
    multiple of the patch size (96 -> 98 for patch-14 models at 224)."""
    global_size = int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    local = global_size * PAPER_LOCAL / PAPER_GLOBAL
    local_size = max(patch_size, int(round(local / patch_size)) * patch_size)
    if patch_size == 14 and global_size == 224:
        local_size = 98
    cfg = ViewConfig(
        global_size=global_size,
        local_size=local_size,
        local_crops=local_crops,
        mean=tuple(pretrained_cfg.get("mean", ViewConfig.mean)),
        std=tuple(pretrained_cfg.get("std", ViewConfig.std)),
        interpolation=str(pretrained_cfg.get("interpolation", "bicubic")),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if cfg.local_crops < 0:
        raise MimcliError(f"--local-crops must be 0 or more, got {cfg.local_crops}")
    return cfg


def _blur(size: int, p: float) -> T.RandomApply:
    kernel = max(3, int(size * 0.1) // 2 * 2 + 1)  # ~10% of the crop, odd
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


def _pipeline(
    size: int, scale: tuple[float, float], cfg: ViewConfig, blur: float, solarize: float
) -> T.Compose:
    mode = T.InterpolationMode(cfg.interpolation)
    steps: list[Any] = [
        T.RandomResizedCrop(size, scale=scale, interpolation=mode),
        T.RandomHorizontalFlip(),
    ]
    if cfg.photometric:
        steps += [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            _blur(size, blur),
            T.RandomSolarize(128, p=solarize),
        ]
    steps += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(steps)


class MultiCropTransform:
    """PIL image -> [global0, global1, local0, ..., local{N-1}] tensors.

    The two globals are asymmetric as in BYOL: view 0 always blurred, never solarised; view 1
    rarely blurred (0.1), sometimes solarised (0.2); locals blurred half the time.
    """

    def __init__(self, cfg: ViewConfig) -> None:
        self.cfg = cfg
        self.global0 = _pipeline(cfg.global_size, cfg.global_scale, cfg, blur=1.0, solarize=0.0)
        self.global1 = _pipeline(cfg.global_size, cfg.global_scale, cfg, blur=0.1, solarize=0.2)
        self.local = _pipeline(cfg.local_size, cfg.local_scale, cfg, blur=0.5, solarize=0.0)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        views = [self.global0(img), self.global1(img)]
        views += [self.local(img) for _ in range(self.cfg.local_crops)]
        return views


class MultiCropDataset(ImageDataset):
    """Yields ``(views or None, label, index)``; None marks an unreadable image. Randomness is
    reseeded from (seed, epoch, index) before each image."""

    def __init__(self, images: ImageList, transform: MultiCropTransform, seed: int = 0) -> None:
        super().__init__(images, transform)
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        seed_sample(self.seed, self.epoch, index)
        return super().__getitem__(index)


def seed_sample(seed: int, epoch_key: int, index: int) -> None:
    """Seed Python's and torch's generators for one sample's augmentations."""
    sample_seed = hash((seed, epoch_key, index)) % (2**31)
    random.seed(sample_seed)
    torch.manual_seed(sample_seed)


class StreamSample:
    """One stream record -> its views (None when unreadable), seeded as
    :class:`MultiCropDataset` seeds a folder's image: the same image at the same (epoch key,
    index) gets the same views from a folder, a dataset or shards."""

    def __init__(self, decode: Callable[[Any], Image.Image], transform: Any, seed: int) -> None:
        self.decode, self.transform, self.seed = decode, transform, seed

    def __call__(self, record: Any, epoch_key: int, index: int) -> Any:
        seed_sample(self.seed, epoch_key, index)
        try:
            if getattr(self.transform, "decodes", False):  # augment.CanvasDecoder
                return self.transform(self.decode(record, load=False))
            return self.transform(self.decode(record))
        except BAD_IMAGE_ERRORS:
            return None


@dataclass
class ViewBatch:
    views: list[torch.Tensor]  # each (B, 3, h, w); globals first
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) dataset positions
    bad: list[int]

    def pin_memory(self) -> ViewBatch:
        """A copy in pinned memory (DataLoader's ``pin_memory`` calls this), so the copies to
        the GPU can overlap compute."""
        return ViewBatch(
            [v.pin_memory() for v in self.views],
            self.labels.pin_memory(),
            self.indices.pin_memory(),
            self.bad,
        )


def collate_views(items: Sequence[tuple[Any, int, int]]) -> ViewBatch:
    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    n_views = len(good[0][0]) if good else 0
    views = [torch.stack([it[0][v] for it in good]) for v in range(n_views)]
    return ViewBatch(
        views=views,
        labels=torch.tensor([it[1] for it in good], dtype=torch.int64),
        indices=torch.tensor([it[2] for it in good], dtype=torch.int64),
        bad=bad,
    )


def check_local_crops_supported(model: torch.nn.Module, cfg: ViewConfig, arch: str) -> None:
    """timm's BEiT (data2vec v1) has a fixed relative-position window and no dynamic image size."""
    if cfg.local_crops and "beit" in arch:
        raise MimcliError(
            f"{arch}: BEiT-style models (data2vec v1) have a fixed relative-position window and "
            "cannot take smaller local crops; run with --local-crops 0"
        )


class BatchPlan:
    """Which images form each step's batch: a seeded permutation per (stage, epoch), so any
    step's batch can be rebuilt exactly when a run resumes. Under torchrun each rank takes its
    contiguous share of the global batch."""

    def __init__(
        self, n_images: int, batch_size: int, seed: int, stage: int, start: int, total: int
    ) -> None:
        self.n, self.batch, self.seed, self.stage = n_images, batch_size, seed, stage
        self.start, self.total = start, total
        self.per_epoch = n_images // batch_size
        self.rank, self.world = dist.rank(), dist.world_size()

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.per_epoch)
            gen = torch.Generator().manual_seed(self.seed * 1000 + self.stage * 100 + epoch)
            order = torch.randperm(self.n, generator=gen)
            chunk = order[pos * self.batch : (pos + 1) * self.batch].tolist()
            per_rank = len(chunk) // self.world
            mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
            key = self.stage * 100_000 + epoch
            yield [(i, key) for i in mine]


class KeyedDataset(MultiCropDataset):
    """MultiCropDataset addressed by (index, epoch key) so augmentations are seeded per sample."""

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        index, self.epoch = key
        return super().__getitem__(index)
