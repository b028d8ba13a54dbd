"""``mimcli refine``: MIM-Refiner (arXiv 2402.10093) — ID heads with Nearest Neighbour Alignment
on late blocks of a MIM encoder, a head warm-up with the encoder frozen, then full refinement —
and the other objectives of the family (``--objective``, :mod:`mimcli.objectives`), which share
this loop, its runs, resume and DDP.

The training loop (``train_stage``) reads top to bottom: schedules -> forward + losses (the
objective) -> backward/step -> objective update (queues, momentum networks) and encoder EMA ->
log -> checkpoint. Setup, resume and export live around it.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mimcli import distributed as dist
from mimcli.data import ImageList, eval_transform, scan_folder, subsample
from mimcli.errors import MimcliError
from mimcli.features import extract_features
from mimcli.knn import knn_accuracy
from mimcli.models.build import build_model
from mimcli.models.sources import LoadedModel, load_model
from mimcli.models.taps import parse_blocks
from mimcli.objectives import OBJECTIVES, objective_class
from mimcli.objectives.base import Objective, ObjectiveContext
from mimcli.objectives.nna import default_temperature  # noqa: F401  (re-exported)
from mimcli.optim import (
    apply_lr,
    encoder_param_groups,
    head_param_groups,
    lr_at,
    make_optimizer,
    scaled_lr,
)
from mimcli.results import load_probe
from mimcli.runs import RunFolder, environment, load_checkpoint, save_checkpoint
from mimcli.runtime import configure_threads, seed_everything, select_device
from mimcli.views import (
    MultiCropDataset,
    ViewBatch,
    check_local_crops_supported,
    collate_views,
    default_view_config,
)

Progress = Callable[[str, int, int, dict[str, float]], None]
STAGES = ("heads", "refine")
# What options left at None mean when the objective has no default of its own (NNA's values).
FALLBACK_DEFAULTS: dict[str, Any] = {
    "blocks": "auto",
    "head_input": "cls",
    "local_crops": 10,
    "photometric": True,
    "freeze_blocks": 0,
    "lr": 4e-4,
}


@dataclass
class RefineConfig:
    """Every option of ``mimcli refine`` (blocks counted from 1)."""

    model: str
    data: Path
    out: Path
    objective: str = "nna"
    blocks: str | None = None  # None: the objective's default (NNA: auto)
    probe: Path | None = None
    head_epochs: float = 20.0
    head_steps: int | None = None
    epochs: float = 20.0
    steps: int | None = None
    limit: int | None = None
    batch_size: int = 256
    lr: float | None = None  # None: the objective's default (NNA 4e-4)
    head_lr: float = 2e-4
    head_warmup: float = 0.2
    warmup: float = 0.2
    weight_decay: float = 0.05
    head_weight_decay: float = 1e-5
    layer_decay: float = 0.65
    local_crops: int | None = None  # None: the objective's default (NNA 10)
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    head_width: str = "auto"
    head_input: str | None = None  # None: the objective's default (NNA cls)
    queue_size: str = "auto"
    topk: int = 20
    temperature: float | None = None
    ema: float = 0.9999
    export: str = "ema"
    freeze_blocks: int | None = None  # None: the objective's default (NNA 0)
    val: Path | None = None
    val_every: int = 0
    val_limit: int | None = 5000
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    knn_backend: str = "auto"
    grad_clip: float | None = None
    grad_checkpointing: bool = False
    probe_train: Path | None = None
    probe_val: Path | None = None
    threads: int | None = None
    # objective options (None: the objective's documented default)
    photometric: bool | None = None
    teacher: list[str] = field(default_factory=list)
    mask_ratio: float | None = None
    momentum: float | None = None
    image_weight: float | None = None
    mimic_weight: float | None = None
    reconstruction: bool = True
    decoder: Path | None = None


@dataclass
class RefineResult:
    out: Path
    export_dir: Path
    blocks: list[int]
    blocks_reason: str
    steps: dict[str, int]
    final_loss: float
    seconds: float
    knn: list[dict[str, Any]] = field(default_factory=list)
    best_knn: dict[str, Any] | None = None
    objective: str = "nna"


# --- setup -----------------------------------------------------------------------------------


# Objective options and the objectives that read them; setting one for another objective warns.
OPTION_USERS: dict[str, tuple[str, ...]] = {
    "teacher": ("mimco", "mrmae"),
    "mask_ratio": ("mimco", "conmim", "mrmae"),
    "momentum": ("nnclr", "conmim"),
    "image_weight": ("mimco",),
    "mimic_weight": ("mrmae",),
    "decoder": ("mrmae",),
    "reconstruction": ("mrmae",),
    "temperature": ("nna", "nnclr", "mimco", "conmim"),
    "blocks": ("nna", "nnclr"),
    "head_input": ("nna", "nnclr"),
    "local_crops": ("nna", "nnclr"),
    "probe": ("nna", "nnclr"),
}


def ignored_options(cfg: RefineConfig, depth: int, embed_dim: int) -> list[str]:
    """Flags set to something other than their default that ``cfg.objective`` does not read
    (shown as warnings)."""
    defaults = {**FALLBACK_DEFAULTS, **objective_class(cfg.objective).defaults(depth, embed_dim)}
    unset = {"teacher": [], "reconstruction": True}
    out = []
    for name, users in OPTION_USERS.items():
        value = getattr(cfg, name)
        if value is None or value == unset.get(name) or value == defaults.get(name):
            continue
        if cfg.objective not in users:
            flag = (
                "--no-reconstruction" if name == "reconstruction" else "--" + name.replace("_", "-")
            )
            out.append(flag)
    return out


# Options that shape a run; --resume must be given the same values.
RESUME_KEYS = (
    "objective", "batch_size", "seed", "blocks", "head_width", "head_input", "queue_size", "topk",
    "temperature", "local_crops", "global_scale", "local_scale", "photometric", "freeze_blocks",
    "teacher", "mask_ratio", "momentum", "image_weight", "mimic_weight", "reconstruction",
    "decoder", "lr", "head_lr", "layer_decay", "weight_decay", "head_weight_decay", "ema",
)  # fmt: skip


def fill_defaults(cfg: RefineConfig, depth: int, embed_dim: int) -> RefineConfig:
    """A copy of ``cfg`` with options left at None set from the objective's defaults, then NNA's."""
    defaults = {**FALLBACK_DEFAULTS, **objective_class(cfg.objective).defaults(depth, embed_dim)}
    filled = {k: v for k, v in defaults.items() if getattr(cfg, k, None) is None}
    return replace(cfg, **filled)


def resolve_blocks(spec: str, depth: int, probe: Path | None) -> tuple[list[int], str]:
    """``auto`` (probe.json recommendation, else the last third, at most 8), ``lastN``, or a list
    like ``17,20,24`` / ``17-24``. Returns 1-based blocks and the reason, for config.json."""
    spec = spec.strip()
    if spec == "auto":
        if probe is not None:
            rec = load_probe(probe).recommendation
            blocks = [int(b) for b in rec.blocks]
            reason = f"probe {probe}: {rec.rule}"
        else:
            if depth == 32:  # ViT-H: the paper's blocks 21-32
                n, reason = 12, "paper default for 32 blocks (ViT-H): the last 12"
            else:
                n = min(8, max(1, round(depth / 3)))
                reason = f"paper default: the last third of the {depth} blocks, at most 8 heads"
            blocks = list(range(depth - n + 1, depth + 1))
    elif spec.startswith("last"):
        try:
            n = int(spec[4:])
        except ValueError as exc:
            raise MimcliError(f"--blocks {spec!r}: expected lastN, e.g. last4") from exc
        if not 1 <= n <= depth:
            raise MimcliError(f"--blocks {spec}: the model has {depth} blocks")
        blocks, reason = list(range(depth - n + 1, depth + 1)), f"the last {n} blocks"
    else:
        blocks, reason = parse_blocks(spec) or [], "given with --blocks"
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad or not blocks:
        raise MimcliError(f"--blocks {spec}: blocks must lie in 1..{depth}, got {blocks}")
    return blocks, reason


def stage_steps(epochs: float, steps: int | None, steps_per_epoch: int) -> int:
    if steps is not None:
        if steps < 0:
            raise MimcliError("step counts must be 0 or more")
        return steps
    return int(math.ceil(epochs * steps_per_epoch))


def trainable_encoder(loaded: LoadedModel, freeze_blocks: int) -> nn.Module:
    """The encoder rebuilt with ``dynamic_img_size`` (local crops are smaller than the input
    size), the fixed position table frozen, and the stem plus ``freeze_blocks`` blocks frozen."""
    args = dict(loaded.model_args)
    if "beit" not in loaded.arch:
        args["dynamic_img_size"] = True
    encoder = build_model(loaded.arch, args)
    encoder.load_state_dict(loaded.model.state_dict())
    encoder.pretrained_cfg = loaded.pretrained_cfg
    depth = len(encoder.blocks)
    if not 0 <= freeze_blocks <= depth:
        raise MimcliError(f"--freeze-blocks must lie in 0..{depth}")
    for name, param in encoder.named_parameters():
        frozen = name == "pos_embed"
        if freeze_blocks:
            frozen |= not name.startswith(("blocks.", "norm.", "fc_norm."))
            frozen |= name.startswith("blocks.") and int(name.split(".")[1]) < freeze_blocks
        param.requires_grad_(not frozen)
    return encoder


class BatchPlan:
    """Which images form each step's batch: a seeded permutation per (stage, epoch), so any
    step's batch can be rebuilt exactly when a run resumes."""

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


# --- monitoring ------------------------------------------------------------------------------


class Monitor:
    """k-NN (k=20, tau 0.07) of the last block, CLS and mean patch, on labelled folders."""

    def __init__(self, cfg: RefineConfig, train: ImageList, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        assert cfg.val is not None
        self.memory = subsample(train, cfg.val_limit, cfg.seed)
        self.queries = subsample(scan_folder(cfg.val, what="--val"), cfg.val_limit, cfg.seed)
        if self.memory.classes != self.queries.classes:
            raise MimcliError("--data and --val need the same class sub-folders for k-NN")

    def measure(self, encoder: nn.Module) -> dict[str, float]:
        was_training = encoder.training
        transform = eval_transform(encoder.pretrained_cfg)
        depth = len(encoder.blocks)
        out = {}
        feats = [
            extract_features(
                encoder,
                imgs,
                transform,
                [depth],
                self.device,
                batch_size=256,
                num_workers=self.cfg.num_workers,
            )
            for imgs in (self.memory, self.queries)
        ]
        try:
            for kind in ("cls", "patch"):
                out[kind] = knn_accuracy(
                    feats[0].block(depth, kind),
                    feats[0].labels,
                    feats[1].block(depth, kind),
                    feats[1].labels,
                    ks=(20,),
                    tau=0.07,
                    num_classes=len(self.memory.classes),
                    backend=self.cfg.knn_backend,
                    device=self.device,
                )[20]
        finally:
            for f in feats:
                f.close()
        encoder.train(was_training)
        return out


# --- the run ---------------------------------------------------------------------------------


class Refiner:
    """Holds the encoder, heads, queues, EMA and optimiser of one run."""

    def __init__(self, cfg: RefineConfig, progress: Progress | None = None) -> None:
        self.cfg, self.progress = cfg, progress
        self.start_time = time.perf_counter()
        configure_threads(cfg.threads)
        seed_everything(cfg.seed)  # identical head initialisation on every rank
        self.device = select_device(cfg.device)
        dist.init_from_env(self.device)
        self.run = RunFolder(cfg.out)
        self._validate()
        self.images = subsample(
            scan_folder(cfg.data, labelled=False, what="--data"), cfg.limit, cfg.seed
        )
        if len(self.images) < cfg.batch_size:
            raise MimcliError(
                f"--data has {len(self.images)} images, fewer than one batch "
                f"(--batch-size {cfg.batch_size})"
            )
        self.loaded = load_model(cfg.model)
        depth = self.loaded.num_blocks
        dim = self.loaded.embed_dim
        self.ignored_options = ignored_options(cfg, depth, dim)
        self.cfg = cfg = fill_defaults(cfg, depth, dim)
        probe = cfg.probe
        if cfg.blocks == "auto" and probe is None and cfg.probe_train and cfg.probe_val:
            probe = self.probe_now()
        self.blocks, self.blocks_reason = resolve_blocks(cfg.blocks or "auto", depth, probe)
        self.encoder = trainable_encoder(self.loaded, int(cfg.freeze_blocks or 0)).to(self.device)
        if cfg.grad_checkpointing:
            self.encoder.set_grad_checkpointing(True)
        self.views = default_view_config(
            self.loaded.pretrained_cfg,
            int(self.encoder.patch_embed.patch_size[0]),
            int(cfg.local_crops or 0),
            photometric=bool(cfg.photometric),
            global_scale=tuple(cfg.global_scale),
            local_scale=tuple(cfg.local_scale),
        )
        check_local_crops_supported(self.encoder, self.views, self.loaded.arch)
        self.per_epoch = len(self.images) // cfg.batch_size
        self.totals = {
            "heads": stage_steps(cfg.head_epochs, cfg.head_steps, self.per_epoch),
            "refine": stage_steps(cfg.epochs, cfg.steps, self.per_epoch),
        }
        self.labels_by_id = torch.tensor(self.images.labels, dtype=torch.int64)
        self.objective: Objective = objective_class(cfg.objective)(
            ObjectiveContext(
                cfg=cfg,
                encoder=self.encoder,
                loaded=self.loaded,
                blocks=self.blocks,
                views=self.views,
                device=self.device,
                dataset_size=len(self.images),
                seed=cfg.seed,
                sync_bn=dist.is_distributed(),
                totals=dict(self.totals),
                extra={"labels_by_id": self.labels_by_id if self.images.labelled else None},
            )
        ).to(self.device)
        self.ema = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        self.monitor = Monitor(cfg, self.images, self.device) if cfg.val else None
        self.knn_log: list[dict[str, Any]] = []
        self.stage, self.stage_step, self.last_loss = "heads", 0, float("nan")
        self.optimizer: torch.optim.Optimizer | None = None

    def probe_now(self) -> Path:
        """Probe the base model on --probe-train/--probe-val; its recommendation picks blocks."""
        from mimcli.probe import ProbeConfig, run_probe

        out = self.cfg.out / "probe"
        if not (out / "probe.json").exists():  # a resumed run reuses the first probe
            run_probe(
                ProbeConfig(
                    model=self.cfg.model,
                    train=self.cfg.probe_train,  # type: ignore[arg-type]
                    val=self.cfg.probe_val,
                    out=out,  # type: ignore[arg-type]
                    limit_train=self.cfg.val_limit,
                    limit_val=self.cfg.val_limit,
                    device=self.cfg.device,
                    num_workers=self.cfg.num_workers,
                    knn_backend=self.cfg.knn_backend,
                    seed=self.cfg.seed,
                )
            )
        return out / "probe.json"

    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.objective not in OBJECTIVES:
            raise MimcliError(
                f"--objective {cfg.objective!r}: choose one of {', '.join(OBJECTIVES)}"
            )
        if cfg.batch_size < 2:
            raise MimcliError("--batch-size must be at least 2 (in-batch negatives)")
        if cfg.batch_size % dist.world_size():
            raise MimcliError("--batch-size must be divisible by the number of processes")
        if cfg.export not in ("ema", "raw"):
            raise MimcliError("--export must be ema or raw")
        if cfg.head_input not in (None, "cls", "patch"):
            raise MimcliError("--head-input must be cls or patch")
        if not 0 <= cfg.ema < 1:
            raise MimcliError("--ema must lie in [0, 1)")
        if cfg.topk < 1:
            raise MimcliError("--topk must be at least 1")
        if cfg.temperature is not None and not cfg.temperature > 0:
            raise MimcliError(f"--temperature must be positive, got {cfg.temperature}")
        if cfg.momentum is not None and not 0 <= cfg.momentum < 1:
            raise MimcliError(f"--momentum must lie in [0, 1), got {cfg.momentum}")
        if cfg.mask_ratio is not None and not 0 < cfg.mask_ratio < 1:
            raise MimcliError(
                f"--mask-ratio must lie strictly between 0 and 1, got {cfg.mask_ratio}"
            )
        for flag, value in (
            ("--image-weight", cfg.image_weight),
            ("--mimic-weight", cfg.mimic_weight),
        ):
            if value is not None and not value >= 0:
                raise MimcliError(f"{flag} must be 0 or more, got {value}")
        if cfg.resume and not (self.run.checkpoint_path.exists()):
            raise MimcliError(f"--resume: no checkpoint in {cfg.out}")
        if not cfg.resume and self.run.checkpoint_path.exists():
            raise MimcliError(
                f"{cfg.out} already holds a run; add --resume to continue it or "
                "choose another --out"
            )

    # -- configuration record --
    def resolved(self) -> dict[str, Any]:
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items()}
        return {
            "config": cfg,
            "resolved": {
                "blocks": self.blocks if self.objective.uses_blocks else None,
                "blocks_reason": self.blocks_reason_shown(),
                **self.objective.describe(),
                "freeze_blocks": self.cfg.freeze_blocks,
                "steps": self.totals,
                "steps_per_epoch": self.per_epoch,
                "lr": scaled_lr(self.peak_base("refine"), self.cfg.batch_size),
                "head_lr": scaled_lr(self.cfg.head_lr, self.cfg.batch_size),
                "views": asdict(self.views),
                "images": len(self.images),
                "device": str(self.device),
                "world_size": dist.world_size(),
                "precision": "bf16 autocast" if self.device.type == "cuda" else "fp32",
                "arch": self.loaded.arch,
                "model_args": self.loaded.model_args,
                "format": self.loaded.format,
            },
            "environment": environment(),
        }

    def blocks_reason_shown(self) -> str:
        if self.objective.uses_blocks:
            return self.blocks_reason
        return f"not used: --objective {self.cfg.objective} trains the whole encoder"

    # -- optimiser per stage --
    def make_optimizer(self, stage: str) -> torch.optim.Optimizer:
        heads = head_param_groups(self.objective, self.cfg.head_weight_decay)
        if stage == "heads":
            return make_optimizer(heads)
        return make_optimizer(
            encoder_param_groups(self.encoder, self.cfg.weight_decay, self.cfg.layer_decay) + heads
        )

    def peak_base(self, stage: str) -> float:
        return float(self.cfg.head_lr if stage == "heads" else self.cfg.lr)  # type: ignore[arg-type]

    def peak_lr(self, stage: str) -> float:
        return scaled_lr(self.peak_base(stage), self.cfg.batch_size)

    def warmup_steps(self, stage: str) -> int:
        frac = self.cfg.head_warmup if stage == "heads" else self.cfg.warmup
        return int(round(frac * self.totals[stage]))

    def ema_decay(self, step: int) -> float:
        """timm ModelEmaV3-style warm-up: min(decay, 1 - (1 + step)^(-2/3)), so short runs still
        move the EMA (after 100 steps it averages over roughly the last 20)."""
        return min(self.cfg.ema, 1.0 - (1.0 + step) ** (-2.0 / 3.0))

    # -- forward --
    def step_losses(
        self, batch: ViewBatch, stage: str = "refine", step: int = 0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss and metrics for one batch (its queue/momentum updates wait for
        :meth:`Objective.after_step`)."""
        return self.objective.step(self.encoder, batch, stage, step)

    # -- the loop --
    def loader(self, stage: str, start: int) -> DataLoader:
        dataset = KeyedDataset(self.images, self.objective.transform(), seed=self.cfg.seed)
        plan = BatchPlan(
            len(self.images),
            self.cfg.batch_size,
            self.cfg.seed,
            STAGES.index(stage),
            start,
            self.totals[stage],
        )
        return DataLoader(
            dataset,
            batch_sampler=plan,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
        )

    def train_stage(self, stage: str, start: int) -> None:
        """Run ``stage`` from its step ``start`` to its end."""
        warmup = stage == "heads"
        total, peak, warm = self.totals[stage], self.peak_lr(stage), self.warmup_steps(stage)
        self.encoder.train(not warmup)
        self.objective.train()
        tick = time.perf_counter()
        for step, batch in zip(range(start, total), self.loader(stage, start), strict=True):
            self.stage, self.stage_step = stage, step
            # schedules
            lr = lr_at(step, total, peak, warm)
            apply_lr(self.optimizer, lr)  # type: ignore[arg-type]
            # forward + losses
            if batch.bad and dist.is_distributed():
                raise MimcliError(
                    f"unreadable images in --data (dataset positions {batch.bad[:5]}); with "
                    "several processes every rank needs a full batch: remove or fix them"
                )
            loss, metrics = self.step_losses(batch, stage, step)
            if not torch.isfinite(loss):
                raise MimcliError(
                    f"loss became non-finite at {stage} step {step}; stopped. The last good "
                    f"checkpoint is kept in {self.run.checkpoint_path} (try a lower --lr)"
                )
            # backward / step
            self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            loss.backward()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]  # type: ignore[union-attr]
            dist.average_gradients(params)
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.optimizer.step()  # type: ignore[union-attr]
            # objective update (queues, momentum networks) / encoder EMA
            self.objective.after_step(self.encoder, stage, step)
            if not warmup:
                self.update_ema(step)
            # log
            now = time.perf_counter()
            images_per_s = len(batch.indices) * dist.world_size() / max(now - tick, 1e-9)
            tick = now
            self.last_loss = dist.mean_scalar(float(loss.detach()), self.device)
            record = {
                "stage": stage,
                "step": self.global_step(stage, step),
                "stage_step": step,
                "loss": self.last_loss,
                "lr": lr,
                "images_per_s": images_per_s,
                **({} if warmup else {"ema_decay": self.ema_decay(step)}),
                **metrics,
            }
            done = step + 1
            if self.monitor and (
                done == total or (self.cfg.val_every and done % self.cfg.val_every == 0)
            ):
                record.update(self.measure(stage, step))
            if dist.rank() == 0:
                self.run.log(record)
            if self.progress:
                self.progress(stage, done, total, {"loss": self.last_loss, "img/s": images_per_s})
            # checkpoint
            if done == total or done % self.cfg.checkpoint_every == 0:
                self.save(stage, done)

    def update_ema(self, step: int) -> None:
        decay = self.ema_decay(step)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.encoder.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - decay)

    def global_step(self, stage: str, step: int) -> int:
        return step + (self.totals["heads"] if stage == "refine" else 0)

    def measure(self, stage: str, step: int) -> dict[str, Any]:
        assert self.monitor is not None
        entry: dict[str, Any] = {"stage": stage, "step": self.global_step(stage, step) + 1}
        for name, model in (("encoder", self.encoder), ("ema", self.ema)):
            scores = self.monitor.measure(model)
            entry.update({f"knn_{name}_cls": scores["cls"], f"knn_{name}_patch": scores["patch"]})
        self.knn_log.append(entry)
        return {k: v for k, v in entry.items() if k.startswith("knn_")}

    # -- checkpoint / resume --
    def save(self, stage: str, done: int) -> None:
        """Everything needed to continue exactly: weights, optimiser, queues, RNG states (the
        objective's per-rank state, e.g. each rank's neighbour-draw generator, from every rank)."""
        rank_extra = dist.gather_objects(self.objective.rank_state())
        if dist.rank() != 0:
            return
        state = {
            "rank_extra": rank_extra,
            "stage": stage,
            "done": done,
            "totals": self.totals,
            "encoder": self.encoder.state_dict(),
            "ema": self.ema.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),  # type: ignore[union-attr]
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "knn_log": self.knn_log,
            "last_loss": self.last_loss,
        }
        save_checkpoint(self.run.checkpoint_path, state)

    def restore(self) -> tuple[str, int]:
        state = load_checkpoint(self.run.checkpoint_path)
        if state["totals"] != self.totals:
            raise MimcliError(
                f"--resume: the run was planned with steps {state['totals']}, now {self.totals}; "
                "resume with the same options"
            )
        saved = self.run.read_config().get("config", {})
        was = saved.get("objective", "nna")
        if was != self.cfg.objective:
            raise MimcliError(
                f"--resume: {self.cfg.out} is a --objective {was} run; resume it with "
                f"--objective {was}"
            )
        now = json.loads(json.dumps(asdict(self.cfg), default=str))
        changed = [
            f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}"
            for k in RESUME_KEYS
            if k in saved and saved[k] != now[k]
        ]
        if changed:
            raise MimcliError(
                f"--resume: options differ from the run in {self.cfg.out} ({'; '.join(changed)}); "
                "resume with the run's options (see its config.json)"
            )
        self.encoder.load_state_dict(state["encoder"])
        self.ema.load_state_dict(state["ema"])
        if "objective" not in state:  # written before objectives: NNA heads and queues apart
            state["objective"] = {
                **{f"heads.{k}": v for k, v in state["heads"].items()},
                **{f"queues.{k}": v for k, v in state["queues"].items()},
                "_extra_state": {"lookup_gen": state["rng"]["lookup"]},
            }
        self.objective.load_state_dict(state["objective"])
        rank_extra = state.get("rank_extra") or []
        if dist.rank() < len(rank_extra) and rank_extra[dist.rank()] is not None:
            self.objective.load_rank_state(rank_extra[dist.rank()])
        stage = state["stage"]
        self.optimizer = self.make_optimizer(stage)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.knn_log = list(state["knn_log"])
        self.last_loss = state["last_loss"]
        self.run.truncate_metrics(self.global_step(stage, state["done"] - 1))
        return stage, state["done"]

    # -- export --
    def export(self) -> Path:
        """The encoder (EMA unless --export raw) in timm's Hugging Face layout."""
        from timm.models import save_for_hf

        source = self.ema if self.cfg.export == "ema" else self.encoder
        model = build_model(self.loaded.arch, self.loaded.model_args)
        model.load_state_dict(source.state_dict())
        model.pretrained_cfg = dict(self.loaded.pretrained_cfg)
        target = self.run.export_dir
        tmp = target.with_name(target.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_for_hf(
            model, str(tmp), model_args=dict(self.loaded.model_args), safe_serialization=True
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target

    def run_all(self) -> RefineResult:
        start_stage, start_step = "heads", 0
        if self.cfg.resume:
            start_stage, start_step = self.restore()
        elif dist.rank() == 0:
            self.run.write_config(self.resolved())
        for stage in STAGES[STAGES.index(start_stage) :]:
            first = start_step if stage == start_stage else 0
            if first >= self.totals[stage]:
                continue
            if self.optimizer is None or first == 0:
                self.optimizer = self.make_optimizer(stage)
            self.train_stage(stage, first)
            self.optimizer = None
        dist.check_identical(
            list(self.encoder.parameters())
            + list(self.objective.parameters())
            + list(self.objective.buffers()),
            "weights",
        )
        export_dir = self.export() if dist.rank() == 0 else self.run.export_dir
        best = None
        if self.knn_log:
            best = max(self.knn_log, key=lambda e: e.get("knn_ema_cls", 0.0))
        return RefineResult(
            out=self.cfg.out,
            export_dir=export_dir,
            blocks=self.blocks if self.objective.uses_blocks else [],
            blocks_reason=self.blocks_reason_shown(),
            steps=self.totals,
            final_loss=self.last_loss,
            seconds=time.perf_counter() - self.start_time,
            knn=self.knn_log,
            best_knn=best,
            objective=self.cfg.objective,
        )


def run_refine(cfg: RefineConfig, progress: Progress | None = None) -> RefineResult:
    """Refine ``cfg.model`` on ``cfg.data`` into ``cfg.out`` (see ``Refiner``)."""
    return Refiner(cfg, progress).run_all()
