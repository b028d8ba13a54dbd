"""The refine loop: MIM-Refiner (arXiv 2402.10093) and the other objectives of the family
(:mod:`mimcli.objectives`) share it. :class:`Refiner` sets a run up, runs its two stages (head
warm-up with the encoder frozen, then full refinement), checkpoints, resumes and exports.

``train_stage`` reads top to bottom: schedules -> forward + losses (the objective) ->
backward/step -> objective update (queues, momentum networks) and encoder EMA -> metrics summed
on the device -> log (every ``--log-every`` steps: the window's one read, its checks) ->
checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mimcli import distributed as dist
from mimcli import runlock
from mimcli.blocks import resolve_blocks
from mimcli.data import ImageList, subsample
from mimcli.datasources import Columns, open_images
from mimcli.ema import ema_decay, ema_update
from mimcli.errors import Interrupted, MimcliError
from mimcli.fileio import remove_stale_temporaries, write_text
from mimcli.models.build import build_model
from mimcli.models.sources import load_model
from mimcli.objectives import ignored_options, objective_class
from mimcli.objectives.base import Objective, ObjectiveContext
from mimcli.optim import (
    apply_lr,
    encoder_param_groups,
    head_param_groups,
    lr_at,
    make_optimizer,
    scaled_lr,
)
from mimcli.refine import sharding
from mimcli.refine.compiling import compile_step
from mimcli.refine.config import STAGES, RefineConfig, RefineResult, RefineStart
from mimcli.refine.engine import StepModule, step_module
from mimcli.refine.interrupts import StopRequests, ignore_stop_signals
from mimcli.refine.monitor import Monitor
from mimcli.refine.plan import PLAN_FILE, planned_seconds
from mimcli.refine.setup import (
    check_resume,
    fill_defaults,
    resume_num_heads,
    settle_resize_rule,
    stage_steps,
    trainable_architecture,
    trainable_encoder,
    validate,
)
from mimcli.refine.window import MetricWindow
from mimcli.runs import (
    RunFolder,
    environment,
    migrate_checkpoint,
    save_checkpoint,
    write_error,
)
from mimcli.runtime import (
    StepProgress,
    configure_threads,
    precision_name,
    resolve_workers,
    seed_everything,
    select_device,
)
from mimcli.streams import StreamBatches, stream_lanes
from mimcli.trackers import TrackerSet, open_trackers
from mimcli.views import (
    BatchPlan,
    KeyedDataset,
    MultiCropTransform,
    StreamSample,
    ViewBatch,
    check_local_crops_supported,
    collate_views,
    default_view_config,
)

# Runs a probe for ``--blocks auto`` and returns its probe.json (see refine.pipeline).
logger = logging.getLogger(__name__)
Prober = Callable[[RefineConfig], Path]


class Refiner:
    """Holds the encoder, objective (heads, queues...), EMA and optimiser of one run."""

    @runlock.released_on_error
    def __init__(
        self,
        cfg: RefineConfig,
        progress: StepProgress | None = None,
        prober: Prober | None = None,
        stops: StopRequests | None = None,
    ) -> None:
        self.cfg, self.progress = cfg, progress
        # signals (installed by refine.pipeline.run_refine), timed checkpoints, the last one
        self.stops = stops if stops is not None else StopRequests()
        self.last_save = time.monotonic()
        self.saved_at: tuple[str, int] | None = None  # (stage, done) of the last checkpoint
        self.resume_window: dict[str, Any] | None = None  # a window a checkpoint cut in two
        self.start_time = time.perf_counter()
        configure_threads(cfg.threads)
        seed_everything(cfg.seed)  # identical head initialisation on every rank
        self.device = select_device(cfg.device)
        dist.init_from_env(self.device)
        self.run = RunFolder(cfg.out)
        # one run per folder (runlock): rank 0 holds RUN/.mimcli.lock until run_all ends
        self.lock = runlock.hold_for_ranks(cfg.out, "refine", force=cfg.force_unlock)
        validate(cfg, dist.world_size(), self.run)
        self.cfg = cfg = settle_resize_rule(cfg, self.run)
        self.images = self.open_data(cfg)
        if self.images.streaming:  # a stream's order depends on its lanes: record them
            self.cfg = cfg = replace(cfg, data_lanes=self.stream_lanes(cfg))
        if len(self.images) < cfg.batch_size:
            raise MimcliError(
                f"--data has {len(self.images)} images, fewer than one batch "
                f"(--batch-size {cfg.batch_size})"
            )
        self.loaded = load_model(cfg.model, num_heads=resume_num_heads(cfg, self.run))
        depth, dim = self.loaded.num_blocks, self.loaded.embed_dim
        self.ignored_options = ignored_options(cfg.objective, asdict(cfg), depth, dim)
        self.cfg = cfg = fill_defaults(cfg, depth, dim)
        probe = cfg.probe
        if cfg.blocks == "auto" and probe is None and cfg.probe_train and cfg.probe_val:
            if prober is None:
                raise MimcliError(
                    "--probe-train/--probe-val: probing first needs refine.pipeline.run_refine "
                    "(or a prober passed to Refiner)"
                )
            probe = prober(cfg)
        self.blocks, self.blocks_reason = resolve_blocks(cfg.blocks or "auto", depth, probe)
        self.encoder = trainable_encoder(
            self.loaded, int(cfg.freeze_blocks or 0), str(cfg.pos_embed_resize)
        ).to(self.device)
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
        labels_by_id = torch.tensor(self.images.labels, dtype=torch.int64)
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
                extra={"labels_by_id": labels_by_id if self.images.labelled else None},
            )
        ).to(self.device)
        self.device_views = self.device_augment(cfg)
        self.ema = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        if cfg.compile:  # after every copy (a deep copy runs eager), before fully_shard
            compile_step(self.encoder, self.objective, self.device)
        # --shard: FSDP2 over one step module for both stages, the EMA sharded alike
        self.sharded, self.shard_reason = sharding.resolve_shard(
            cfg.shard,
            self.device,
            dist.world_size(),
            sharding.state_bytes(self.encoder, self.objective),
        )
        self.fsdp: StepModule | None = None
        if self.sharded:
            self.fsdp = sharding.shard(  # type: ignore[assignment]
                StepModule(self.encoder, self.objective, train_encoder=True),
                self.ema,
                self.device,
            )
        self.monitor = Monitor(cfg, self.images, self.device) if cfg.val else None
        self.knn_log: list[dict[str, Any]] = []
        self.last_loss = float("nan")
        self.trackers = TrackerSet()  # --tracker: opened by run_all on rank 0
        self.logged_through = -1  # on --resume: the last step metrics.jsonl held
        self.optimizer = self.make_optimizer("heads")

    # -- data --
    @staticmethod
    def open_data(cfg: RefineConfig) -> ImageList:
        """``--data`` (a folder, dataset or shards), ``--limit`` applied. Under torchrun rank 0
        reads it first (a dataset is prepared in the HF cache, a stream indexed once), the
        others then find it cached."""
        columns = Columns(cfg.image_column, cfg.label_column)

        def read() -> ImageList:
            images = open_images(cfg.data, labelled=False, what="--data", columns=columns)
            return subsample(images, cfg.limit, cfg.seed)

        if not dist.is_distributed():
            return read()
        images = read() if dist.rank() == 0 else None
        dist.wait_for_rank0()
        # a stream's index goes to every rank (other nodes may not share rank 0's cache: they
        # would index again, downloading remote shards once per node)
        path = getattr(images.reader, "index_path", None) if images is not None else None
        shared = dist.broadcast_object(
            (str(path), path.read_text()) if path is not None and path.exists() else None
        )
        if images is None and shared is not None and not Path(shared[0]).exists():
            write_text(Path(shared[0]), shared[1])
        return images if images is not None else read()

    def device_augment(self, cfg: RefineConfig) -> Any:
        """``--augment-on device``: the batched views (:class:`mimcli.augment.DeviceMultiCrop`)
        of the objective's multi-crop transform; None on the CPU path."""
        if cfg.augment_on == "cpu":
            return None
        transform = self.objective.transform()
        if not isinstance(transform, MultiCropTransform):
            raise MimcliError(
                f"--augment-on device makes multi-crop views (nna, nnclr); --objective "
                f"{cfg.objective} makes its own views: use --augment-on cpu"
            )
        from mimcli.augment import DeviceMultiCrop

        return DeviceMultiCrop(transform.cfg, cfg.seed)

    def worker_transform(self) -> Any:
        """What DataLoader workers do to an image: the objective's views, or with
        ``--augment-on device`` only decode into a canvas (:class:`mimcli.augment.CanvasDecoder`;
        the collated batch then holds ``[canvases, valid sizes]`` as its two "views")."""
        if self.device_views is None:
            return self.objective.transform()
        from mimcli.augment import CanvasDecoder

        return CanvasDecoder(self.device_views.cfg)

    def make_views(self, batch: ViewBatch, stage: str, step: int) -> ViewBatch:
        """``--augment-on device``: a batch of canvases -> its views on the device, seeded per
        (seed, epoch key, image) like the workers' views."""
        canvas, valid = batch.views
        key = STAGES.index(stage) * 100_000 + step // self.per_epoch
        keys = [(i, key) for i in batch.indices.tolist()]
        views = self.device_views(canvas.to(self.device, non_blocking=True), valid, keys)
        return ViewBatch(views, batch.labels, batch.indices, batch.bad)

    def stream_lanes(self, cfg: RefineConfig) -> int:
        """Lanes per rank of a stream: the recorded count on ``--resume``, else one per data
        worker (as many as the shards allow)."""
        if cfg.data_lanes:
            return int(cfg.data_lanes)
        workers, explicit = resolve_workers(cfg.num_workers)
        return stream_lanes(self.images, dist.world_size(), workers, explicit)

    # -- what the run is (config.json, banner) --
    def config_record(self) -> dict[str, Any]:
        """config.json: every option, every resolved value, the environment."""
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
                "lr": self.peak_lr("refine"),
                "head_lr": self.peak_lr("heads"),
                "views": asdict(self.views),
                "images": len(self.images),
                "device": str(self.device),
                "world_size": dist.world_size(),
                "sharded": self.sharded,
                "shard_reason": self.shard_reason,
                "precision": precision_name(self.device),
                "arch": self.loaded.arch,
                "model_args": self.loaded.model_args,
                "format": self.loaded.format,
                "num_heads": self.loaded.num_heads,
            },
            "environment": environment(),
        }

    def start_info(self) -> RefineStart:
        """What the run is about to do (the CLI prints it before the first step)."""
        return RefineStart(
            objective=self.cfg.objective,
            summary=self.objective.summary(),
            uses_blocks=self.objective.uses_blocks,
            blocks=self.blocks,
            blocks_reason=self.blocks_reason_shown(),
            steps=dict(self.totals),
            steps_per_epoch=self.per_epoch,
            lr=self.peak_lr("refine"),
            head_lr=self.peak_lr("heads"),
            views=self.objective.views_summary(),
            device=str(self.device),
            precision=precision_name(self.device),
            world_size=dist.world_size(),
            shard=self.shard_reason if dist.is_distributed() else "",
            ignored_flags=list(self.ignored_options),
            planned=self.planned_time(),
        )

    def planned_time(self) -> str:
        """From ``RUN/plan.json`` (``refine --plan --out RUN``) on a GPU it names: the run's
        estimated wall time at the planned MFU; empty otherwise."""
        path = self.run.root / PLAN_FILE
        if self.device.type != "cuda" or not path.is_file():
            return ""
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError):
            return ""
        name = torch.cuda.get_device_name(self.device)
        seconds = planned_seconds(plan, name, sum(self.totals.values()), self.cfg.batch_size)
        if seconds is None:
            return ""
        return f"plan.json: about {seconds / 3600:.1f} h on this {name} at MFU {plan.get('mfu')}"

    def blocks_reason_shown(self) -> str:
        if self.objective.uses_blocks:
            return self.blocks_reason
        return f"not used: --objective {self.cfg.objective} trains the whole encoder"

    # -- optimiser and schedules per stage --
    def make_optimizer(self, stage: str) -> torch.optim.Optimizer:
        heads = head_param_groups(self.objective, self.cfg.head_weight_decay)
        if stage == "heads":
            return make_optimizer(heads)
        return make_optimizer(
            encoder_param_groups(self.encoder, self.cfg.weight_decay, self.cfg.layer_decay) + heads
        )

    def peak_lr(self, stage: str) -> float:
        base = self.cfg.head_lr if stage == "heads" else self.cfg.lr
        return scaled_lr(float(base), self.cfg.batch_size)  # type: ignore[arg-type]

    def warmup_steps(self, stage: str) -> int:
        frac = self.cfg.head_warmup if stage == "heads" else self.cfg.warmup
        return int(round(frac * self.totals[stage]))

    def global_step(self, stage: str, step: int) -> int:
        return step + (self.totals["heads"] if stage == "refine" else 0)

    # -- one step's forward --
    def step_losses(
        self, batch: ViewBatch, stage: str = "refine", step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The objective's loss and metrics (0-dim device tensors) for one batch (its
        queue/momentum updates wait for :meth:`Objective.after_step`)."""
        return self.objective.step(self.encoder, batch, stage, step)

    def loader(self, stage: str, start: int) -> DataLoader:
        """This rank's batches of ``stage`` from its step ``start`` (seeded: BatchPlan for
        folders and datasets, StreamBatches for streams)."""
        pin = self.device.type == "cuda"
        workers, _ = resolve_workers(self.cfg.num_workers)
        if self.images.streaming:
            lanes = int(self.cfg.data_lanes or 1)
            batches = StreamBatches(
                self.images,
                StreamSample(self.images.reader.decode, self.worker_transform(), self.cfg.seed),
                collate_views,
                seed=self.cfg.seed,
                stage=STAGES.index(stage),
                start=start,
                total=self.totals[stage],
                batch_size=self.cfg.batch_size,
                lanes=lanes,
                rank=dist.rank(),
                world=dist.world_size(),
            )
            # the recorded order needs its lanes' workers (one lane: the main process may read)
            workers = lanes if workers or lanes > 1 else 0
            return DataLoader(
                batches,
                batch_size=None,
                num_workers=workers,
                pin_memory=pin,
                prefetch_factor=2 if workers else None,
                worker_init_fn=ignore_stop_signals,
            )
        dataset = KeyedDataset(self.images, self.worker_transform(), seed=self.cfg.seed)
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
            num_workers=workers,
            collate_fn=collate_views,
            pin_memory=pin,
            prefetch_factor=2 if workers else None,  # 2 batches of views per worker in flight
            worker_init_fn=ignore_stop_signals,
        )

    # -- the loop --
    def train_stage(self, stage: str, start: int) -> None:
        """Run ``stage`` from its step ``start`` to its end.

        Nothing in a step reads a device value on the host (a GPU would stall), except on
        logging steps: every ``--log-every`` steps, the last step of the stage, checkpoint
        steps and ``--val`` steps. There the loss and metrics of the window since the last
        logging step, summed on the device (:class:`mimcli.refine.window.MetricWindow`), are
        read at once: one ``metrics.jsonl`` record of their means, the non-finite check of
        every step's loss and the objective's alarms, before anything is saved. A checkpoint
        step on schedule always ends a window; one written on a stop request or by time keeps
        the window's part so far, so a resumed run logs the same windows.
        """
        with self.stops.deferred():  # a signal waits for the end of a step
            self.run_steps(stage, start)

    def run_steps(self, stage: str, start: int) -> None:
        """The steps of :meth:`train_stage`."""
        warmup = stage == "heads"
        total, peak, warm = self.totals[stage], self.peak_lr(stage), self.warmup_steps(stage)
        log_every = int(self.cfg.log_every)
        if log_every < 1:
            raise MimcliError(f"--log-every must be at least 1, got {log_every}")
        self.encoder.train(not warmup)
        self.objective.train()
        # DDP under torchrun, FSDP2 with --shard
        engine = (
            self.fsdp if self.fsdp is not None else step_module(self.encoder, self.objective, stage)
        )
        window = MetricWindow(self.device, log_every)
        window.restore(self.resume_window)  # the part of a window before a mid-window checkpoint
        self.resume_window = None
        tick, images = time.perf_counter(), 0
        for step, batch in zip(range(start, total), self.loader(stage, start), strict=True):
            # schedules
            lr = lr_at(step, total, peak, warm)
            apply_lr(self.optimizer, lr)
            # forward + losses
            if batch.bad and dist.is_distributed():
                raise MimcliError(
                    f"unreadable images in --data (dataset positions {batch.bad[:5]}); with "
                    "several processes every rank needs a full batch: remove or fix them"
                )
            if self.device_views is not None and len(batch.indices):
                batch = self.make_views(batch, stage, step)
            loss, metrics = engine(batch, stage, step)
            # backward (DDP averages the gradients over ranks as they are computed) / step
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.optimizer.step()
            # objective update (queues, momentum networks) / encoder EMA
            self.objective.after_step(self.encoder, stage, step)
            decay = ema_decay(step, self.cfg.ema)
            if not warmup:
                ema_update(self.ema, self.encoder, decay)
            # metrics stay on the device until the window ends
            window.add(step, loss, metrics)
            images += len(batch.indices) * dist.world_size()
            done = step + 1
            checkpoint = done == total or done % self.cfg.checkpoint_every == 0
            measure = self.monitor is not None and (
                done == total or bool(self.cfg.val_every and done % self.cfg.val_every == 0)
            )
            rate = images / max(time.perf_counter() - tick, 1e-9)
            # log (the window's one read from the device), checks before anything is saved
            if checkpoint or measure or done % log_every == 0:
                means = window.read(self.objective.alarms())
                rate = images / max(time.perf_counter() - tick, 1e-9)
                tick, images = time.perf_counter(), 0
                if means.first_non_finite is not None or not math.isfinite(means.loss):
                    bad = step if means.first_non_finite is None else means.first_non_finite
                    raise self.non_finite(stage, bad)
                for message, count in means.alarms.items():
                    if count:
                        raise MimcliError(message)
                self.last_loss = means.loss
                record = {
                    "stage": stage,
                    "step": self.global_step(stage, step),
                    "stage_step": step,
                    "loss": means.loss,
                    "lr": lr,
                    "images_per_s": rate,
                    **({} if warmup else {"ema_decay": decay}),
                    **means.metrics,
                }
                if measure:
                    record.update(self.measure(stage, step))
                if dist.rank() == 0:
                    try:
                        self.run.log(record)
                    except MimcliError as exc:
                        raise MimcliError(f"{exc}; {self.how_to_go_on()}") from None
                    self.trackers.log(record["step"], record)
            if self.progress:  # the loss of the last window; img/s of the window so far
                self.progress(stage, done, total, {"loss": self.last_loss, "img/s": rate})
            # checkpoint: on schedule, or on a stop request / timed (agreed over ranks)
            stop, timed, lost = dist.agree_on_flags(
                [self.stops.requested, self.checkpoint_due(), self.lock_lost()]
            )
            if lost:  # another process owns the folder now: nothing more is written
                raise MimcliError(
                    self.lock.lost_line()
                    if self.lock is not None
                    else f"{self.cfg.out}: another process took this run folder; stopped"
                )
            if checkpoint or stop or timed:
                self.save(stage, done, window)
            if stop:
                raise Interrupted(
                    f"{self.stops.name}: stopped after {stage} step {done} of {total} and saved "
                    f"a checkpoint; continue with: {self.resume_command()}",
                    self.stops.signum or 2,
                )

    def non_finite(self, stage: str, step: int) -> MimcliError:
        return MimcliError(
            f"loss became non-finite at {stage} step {step}; stopped. The last good checkpoint "
            f"is kept in {self.checkpoint_path()} (try a lower --lr)"
        )

    def checkpoint_due(self) -> bool:
        """Whether ``--checkpoint-minutes`` have passed since the last checkpoint."""
        minutes = float(self.cfg.checkpoint_minutes or 0)
        return minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes

    def lock_lost(self) -> bool:
        """Whether another process took this run folder's lock (``--force-unlock``)."""
        return bool(self.lock is not None and self.lock.lost)

    def resume_command(self) -> str:
        cfg = self.cfg
        return f"mimcli refine {cfg.model} --data {cfg.data} --out {cfg.out} --resume"

    def how_to_go_on(self) -> str:
        """What a run that stopped on an error can do next (its last checkpoint, if any)."""
        if self.saved_at is None:
            return "stopped before the first checkpoint: start the run again (without --resume)"
        stage, done = self.saved_at
        return (
            f"stopped; the checkpoint of {stage} step {done} is intact: continue with "
            f"{self.resume_command()}"
        )

    def measure(self, stage: str, step: int) -> dict[str, Any]:
        """k-NN of the encoder and its EMA now (``--val``); kept for the result."""
        assert self.monitor is not None
        entry: dict[str, Any] = {"stage": stage, "step": self.global_step(stage, step) + 1}
        for name, model in (("encoder", self.encoder), ("ema", self.ema)):
            scores = self.monitor.measure(self.whole(model))
            entry.update({f"knn_{name}_cls": scores["cls"], f"knn_{name}_patch": scores["patch"]})
        self.knn_log.append(entry)
        return {k: v for k, v in entry.items() if k.startswith("knn_")}

    # -- checkpoint / resume --
    def save(self, stage: str, done: int, window: MetricWindow | None = None) -> None:
        """Everything needed to continue exactly: weights, optimiser, queues, RNG states (the
        objective's per-rank state, e.g. each rank's neighbour-draw generator, from every rank)
        and, for a checkpoint in the middle of a logging window, every rank's part of it.

        A write that fails (disk full, file-size limit) stops the run with one line; the last
        checkpoint stays whole (it is replaced by a rename only once the new one is written)."""
        window_state = window.state() if window is not None else None
        gathered = dist.gather_objects((self.objective.rank_state(), window_state))
        rank_extra = [extra for extra, _ in gathered]
        windows = [w for _, w in gathered]
        for w in windows:  # what a logging step checks, before anything is saved
            bad = [i for i, x in enumerate((w or {}).get("losses", [])) if not math.isfinite(x)]
            if bad:
                raise self.non_finite(stage, w["first_step"] + bad[0])  # type: ignore[index]
        trainer = {
            "windows": windows,
            "rank_extra": rank_extra,
            "stage": stage,
            "done": done,
            "totals": self.totals,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "knn_log": self.knn_log,
            "last_loss": self.last_loss,
        }
        if self.fsdp is not None:  # every rank writes its shards
            try:
                sharding.save_sharded(
                    self.run.sharded_checkpoint_path,
                    self.sharded_state(),
                    trainer,
                    keep_previous=bool(self.cfg.keep_previous),
                )
            except MimcliError as exc:
                raise MimcliError(f"{exc}; {self.how_to_go_on()}") from None
            self.saved(stage, done)
            return
        error = None
        if dist.rank() == 0:
            state = {
                **trainer,
                "encoder": self.encoder.state_dict(),
                "ema": self.ema.state_dict(),
                "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
            }
            path, prev = self.run.checkpoint_path, self.run.prev_checkpoint_path
            try:
                save_checkpoint(path, state, previous=prev if self.cfg.keep_previous else None)
                if not self.cfg.keep_previous:
                    prev.unlink(missing_ok=True)
            except OSError as exc:
                error = f"{write_error('the checkpoint', path, exc)}; {self.how_to_go_on()}"
        error = dist.broadcast_object(error)  # every rank stops when rank 0 could not save
        if error is not None:
            raise MimcliError(error)
        self.saved(stage, done)

    def saved(self, stage: str, done: int) -> None:
        self.saved_at, self.last_save = (stage, done), time.monotonic()

    def checkpoint_path(self) -> Path:
        """Where this run's checkpoint goes (a folder under ``--shard``)."""
        return (
            self.run.sharded_checkpoint_path if self.fsdp is not None else self.run.checkpoint_path
        )

    def sharded_state(self) -> dict[str, Any]:
        """What a sharded checkpoint holds in DTensors (the optimiser keyed by parameter
        names, as torch.distributed.checkpoint expects)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        assert self.fsdp is not None
        return {
            "encoder": self.encoder.state_dict(),
            "ema": self.ema.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": get_optimizer_state_dict(self.fsdp, self.optimizer),
        }

    def load_state(self) -> dict[str, Any]:
        """The run's checkpoint as one structure: plain (one file), or sharded (this rank's
        shards filled in place; the optimiser rebuilt for the saved stage)."""
        sharded = sharding.find_sharded(self.run.sharded_checkpoint_path) is not None
        if sharded != (self.fsdp is not None):
            written = "with" if sharded else "without"
            flag = "--shard on and the same number of processes" if sharded else "--shard off"
            raise MimcliError(
                f"--resume: the checkpoint in {self.cfg.out} was written {written} sharding; "
                f"resume with {flag}"
            )
        if not sharded:
            return migrate_checkpoint(self.run.load_checkpoint())

        def template(trainer: dict[str, Any]) -> dict[str, Any]:
            self.optimizer = self.make_optimizer(trainer["stage"])
            return self.sharded_state()

        state = sharding.load_sharded(self.run.sharded_checkpoint_path, template)
        state.update(state.pop("sharded"))
        return state

    def restore(self) -> tuple[str, int]:
        """Load the run's checkpoint; returns (stage, steps done in it)."""
        check_resume(self.cfg, self.run, self.loaded.num_heads)
        state = self.load_state()
        if state["totals"] != self.totals:
            raise MimcliError(
                f"--resume: the run was planned with steps {state['totals']}, now {self.totals}; "
                "resume with the same options"
            )
        try:
            self.encoder.load_state_dict(state["encoder"])
            self.ema.load_state_dict(state["ema"])
            self.objective.load_state_dict(state["objective"])
        except RuntimeError as exc:  # another MODEL (or block choice) than the run's
            first = str(exc).strip().splitlines()[-1].strip()
            raise MimcliError(
                f"--resume: the checkpoint in {self.cfg.out} does not fit {self.cfg.model} "
                f"({first}); resume with the run's MODEL and options (see its config.json)"
            ) from None
        rank_extra = state.get("rank_extra") or []
        if dist.rank() < len(rank_extra) and rank_extra[dist.rank()] is not None:
            self.objective.load_rank_state(rank_extra[dist.rank()])
        stage = state["stage"]
        if self.fsdp is not None:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            # not strict: parameters that never got a gradient (blocks after the deepest head)
            # have no saved state, as in the run that wrote it
            set_optimizer_state_dict(
                self.fsdp,
                self.optimizer,
                state["optimizer"],
                options=StateDictOptions(strict=False),
            )
        else:
            self.optimizer = self.make_optimizer(stage)
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.knn_log = list(state["knn_log"])
        self.last_loss = state["last_loss"]
        windows = state.get("windows") or []
        self.resume_window = windows[dist.rank()] if dist.rank() < len(windows) else None
        self.saved_at, self.last_save = (stage, state["done"]), time.monotonic()
        self.logged_through = max((r.get("step", -1) for r in self.run.metrics()), default=-1)
        if dist.rank() == 0:  # the records a resumed run writes again
            self.run.truncate_metrics(self.global_step(stage, state["done"] - 1))
        return stage, state["done"]

    # -- export --
    def whole(self, module: nn.Module) -> nn.Module:
        """``module`` itself, or under ``--shard`` an unsharded copy of it gathered on every
        rank (a collective; for k-NN monitoring)."""
        if self.fsdp is None:
            return module
        copy_ = trainable_architecture(
            self.loaded.arch, self.loaded.model_args, str(self.cfg.pos_embed_resize)
        )
        copy_.load_state_dict(sharding.full_state_dict(module))
        copy_.pretrained_cfg = module.pretrained_cfg
        return copy_.to(self.device).train(module.training)

    def export(self) -> Path:
        """The encoder (EMA unless --export raw) in timm's Hugging Face layout, written by rank
        0 (under ``--shard`` every rank first helps gather the full weights)."""
        source = self.ema if self.cfg.export == "ema" else self.encoder
        weights = sharding.full_state_dict(source) if self.fsdp is not None else None
        if dist.rank() != 0:
            return self.run.export_dir
        model = build_model(self.loaded.arch, self.loaded.model_args)
        model.load_state_dict(weights if weights is not None else source.state_dict())
        model.pretrained_cfg = dict(self.loaded.pretrained_cfg)
        return self.run.write_export(model, self.loaded.model_args)

    def open_trackers(self, stage: str, done: int) -> TrackerSet:
        """``--tracker`` on rank 0: new tracker runs given the config record, or on ``--resume``
        the run's own ones again (``RUN/trackers.json``), from the checkpoint's next step."""
        if dist.rank() != 0 or not self.cfg.trackers:
            return TrackerSet()
        if not self.cfg.resume:
            return open_trackers(self.cfg.trackers, self.run.root, self.config_record())
        return open_trackers(
            self.cfg.trackers,
            self.run.root,
            self.run.read_config(),
            resume_step=self.global_step(stage, done),
            logged_through=self.logged_through,
        )

    def run_all(self) -> RefineResult:
        """Both stages (from the checkpoint with ``--resume``), then the export; the trackers
        are closed and the run folder's lock released however the run ends."""
        try:
            start_stage, start_step = "heads", 0
            if dist.rank() == 0:  # what a kill left half-written (this run holds the folder)
                for path in remove_stale_temporaries(self.run.root, keep=runlock.LOCK_FILE):
                    logger.info("removed %s, left half-written by a stopped run", path.name)
            dist.barrier()  # no rank writes before that is done
            if self.cfg.resume:
                start_stage, start_step = self.restore()
            elif dist.rank() == 0:  # a fresh start: records of an attempt that stopped
                self.run.write_config(self.config_record())  # before any checkpoint go
                self.run.metrics_path.unlink(missing_ok=True)
            self.trackers = self.open_trackers(start_stage, start_step)
            failed = True
            try:
                result = self.train_and_export(start_stage, start_step)
                failed = False
            finally:
                self.trackers.finish(failed)
            return result
        finally:
            runlock.release(self.lock)

    def train_and_export(self, start_stage: str, start_step: int) -> RefineResult:
        for stage in STAGES[STAGES.index(start_stage) :]:
            first = start_step if stage == start_stage else 0
            if first >= self.totals[stage]:
                continue
            if first == 0:  # a resumed stage keeps the optimiser restore() loaded
                self.optimizer = self.make_optimizer(stage)
            self.train_stage(stage, first)
        dist.check_identical(  # DTensor shards differ by design; the rest is replicated
            sharding.local_tensors(
                list(self.encoder.parameters())
                + list(self.objective.parameters())
                + list(self.objective.buffers())
            ),
            "weights",
        )
        export_dir = self.export()
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
