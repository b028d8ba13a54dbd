"""What ``mimcli refine`` is asked to do and what it reports: :class:`RefineConfig` (every
option, blocks counted from 1), :class:`RefineResult`, the stages, and the options a resumed run
must keep. Plain dataclasses, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# head warm-up (encoder frozen), then full refinement
STAGES = ("heads", "refine")


@dataclass
class RefineConfig:
    """Every option of ``mimcli refine`` (blocks counted from 1)."""

    model: str
    data: str | Path  # a folder or a source (mimcli.datasources)
    out: Path
    objective: str = "nna"
    num_heads: int | None = None  # MODEL's attention heads when its file has no count
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
    # how local views resize the position table: None = the official plain bicubic for a new
    # run; a resumed run keeps its recorded rule (timm's antialiased one when none is recorded)
    pos_embed_resize: str | None = None
    head_width: str = "auto"
    head_input: str | None = None  # None: the objective's default (NNA cls)
    queue_size: str = "auto"
    topk: int = 20
    temperature: float | None = None
    ema: float = 0.9999
    export: str = "ema"
    freeze_blocks: int | None = None  # None: the objective's default (NNA 0)
    val: str | Path | None = None
    val_every: int = 0
    val_limit: int | None = 5000
    checkpoint_every: int = 50
    checkpoint_minutes: float = 15.0  # also checkpoint when this long has passed (0: off)
    keep_previous: bool = True  # keep the checkpoint before the last (checkpoint.prev.*)
    log_every: int = 10  # metrics.jsonl: means over windows of N steps (see refine.window)
    trackers: list[str] = field(default_factory=list)  # --tracker: mimcli.trackers
    resume: bool = False
    force_unlock: bool = False  # take RUN/.mimcli.lock from another run (mimcli.runlock)
    seed: int = 0
    device: str = "auto"
    num_workers: int | str = "auto"
    image_column: str | None = None
    label_column: str | None = None
    augment_on: str = "cpu"  # cpu: views made in the DataLoader workers; device: batched there
    data_lanes: int | None = None  # a stream's workers per rank, recorded (its order needs them)
    knn_backend: str = "auto"
    grad_clip: float | None = None
    grad_checkpointing: bool = False
    shard: str = "auto"  # FSDP2 under torchrun: auto | on | off (mimcli.refine.sharding)
    compile: bool = False  # torch.compile of the blocks and heads (refine.compiling)
    probe_train: str | Path | None = None
    probe_val: str | Path | None = None
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


@dataclass
class RefineStart:
    """What a run is about to do, once it is set up (the CLI's banner)."""

    objective: str
    summary: str  # what the objective built (heads, teachers, decoder...)
    uses_blocks: bool
    blocks: list[int]
    blocks_reason: str
    steps: dict[str, int]
    steps_per_epoch: int
    lr: float
    head_lr: float
    views: str  # how many views of which size each image gives
    device: str
    precision: str
    world_size: int
    shard: str = ""  # how several processes train: DDP or FSDP2, and why
    ignored_flags: list[str] = field(default_factory=list)  # set but unused by the objective
    planned: str = ""  # the wall time RUN/plan.json gives this GPU, when it has one


# Options that shape a run; --resume must be given the same values.
RESUME_KEYS = (
    "objective", "batch_size", "seed", "blocks", "head_width", "head_input", "queue_size", "topk",
    "temperature", "local_crops", "global_scale", "local_scale", "photometric", "freeze_blocks",
    "teacher", "mask_ratio", "momentum", "image_weight", "mimic_weight", "reconstruction",
    "decoder", "lr", "head_lr", "layer_decay", "weight_decay", "head_weight_decay", "ema",
    "pos_embed_resize",
)  # fmt: skip
