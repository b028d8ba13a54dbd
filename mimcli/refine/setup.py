"""A run's settings before any work starts: checks on the options (one clear line each), the
objective's defaults for options left unset, the options a resumed run takes from its folder
and must keep, the stage lengths, and the trainable encoder."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, replace
from typing import TYPE_CHECKING, Any

from mimcli import distributed as dist
from mimcli.datasources import data_spec
from mimcli.errors import MimcliError
from mimcli.models import posembed
from mimcli.models.spec import MAX_HEADS
from mimcli.objectives import check_option_values, objective_defaults, objective_info
from mimcli.refine.config import RESUME_KEYS, RefineConfig
from mimcli.runs import RunFolder
from mimcli.trackers import check_trackers

if TYPE_CHECKING:
    from torch import nn

    from mimcli.models.sources import LoadedModel

# RefineConfig fields that hold paths or tuples (config.json stores them as strings / lists)
PATH_OPTIONS = ("data", "out", "probe", "val", "probe_train", "probe_val", "decoder")
TUPLE_OPTIONS = ("global_scale", "local_scale")
AUGMENT_CHOICES = ("cpu", "device")


def validate(cfg: RefineConfig, world_size: int, run: RunFolder) -> None:
    """Every check that needs neither the model nor the data; the first failure is one line."""
    objective_info(cfg.objective)  # a known name
    if cfg.batch_size < 2:
        raise MimcliError("--batch-size must be at least 2 (in-batch negatives)")
    if cfg.batch_size % world_size:
        raise MimcliError("--batch-size must be divisible by the number of processes")
    if cfg.export not in ("ema", "raw"):
        raise MimcliError("--export must be ema or raw")
    if cfg.augment_on not in AUGMENT_CHOICES:
        raise MimcliError(f"--augment-on must be one of {', '.join(AUGMENT_CHOICES)}")
    if cfg.head_input not in (None, "cls", "patch"):
        raise MimcliError("--head-input must be cls or patch")
    if not 0 <= cfg.ema < 1:
        raise MimcliError("--ema must lie in [0, 1)")
    if cfg.topk < 1:
        raise MimcliError("--topk must be at least 1")
    check_run_lengths(cfg)
    if cfg.shard not in ("auto", "on", "off"):
        raise MimcliError(f"--shard must be auto, on or off, got {cfg.shard!r}")
    check_option_values(asdict(cfg))
    check_trackers(cfg.trackers)
    if cfg.pos_embed_resize is not None and cfg.pos_embed_resize not in posembed.RULES:
        raise MimcliError(
            f"--pos-embed-resize {cfg.pos_embed_resize!r}: choose one of "
            f"{', '.join(posembed.RULES)}"
        )
    found = run.has_checkpoint()
    if len(set(dist.gather_objects(found))) > 1:  # every rank must take the same path
        raise MimcliError(
            f"{cfg.out} holds a checkpoint for some processes only: with several nodes, --out "
            "must be on a filesystem every node sees"
        )
    if cfg.resume and not found:
        raise MimcliError(
            f"--resume: no checkpoint in {cfg.out} (a run stopped before its first checkpoint "
            "has nothing to continue from); start it again without --resume"
        )
    if not cfg.resume and found:
        raise MimcliError(
            f"{cfg.out} already holds a run; add --resume to continue it or choose another --out"
        )


def check_run_lengths(cfg: RefineConfig) -> None:
    """Stage lengths and rates as the command line bounds them, for configs that do not come
    through it (the API, a resumed run's config.json): finite, epochs > 0, steps >= 0."""
    for name in ("epochs", "head_epochs", "lr", "head_lr", "warmup", "head_warmup"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise MimcliError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    for name in ("epochs", "head_epochs"):
        steps = getattr(cfg, name.replace("epochs", "steps"))
        if steps is None and getattr(cfg, name) <= 0:
            raise MimcliError(
                f"--{name.replace('_', '-')} must be above 0 (to skip a stage, give "
                f"--{name.replace('epochs', 'steps').replace('_', '-')} 0)"
            )
    for name in ("steps", "head_steps"):
        if (getattr(cfg, name) or 0) < 0:
            raise MimcliError(f"--{name.replace('_', '-')} must be 0 or more")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _recorded_type_ok(annotation: str, value: Any) -> bool:
    """Whether a value read from config.json fits a RefineConfig annotation such as
    ``int | None``, ``str | Path``, ``list[str]`` or ``tuple[float, float]``."""
    simple = {"int": int, "float": (int, float), "str": str, "Path": str, "bool": bool}
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if part.startswith(("list[", "tuple[")) and isinstance(value, list):
            inner = part[part.index("[") + 1 : -1].split(",")[0].strip()
            if part.startswith("tuple[") and len(value) != part.count(",") + 1:
                continue
            if all(_recorded_type_ok(inner, v) for v in value):
                return True
        elif part in simple and isinstance(value, simple[part]):
            if part == "bool" or not isinstance(value, bool):
                return True
    return False


def settle_resize_rule(cfg: RefineConfig, run: RunFolder) -> RefineConfig:
    """``pos_embed_resize`` left unset: the official rule for a new run; on ``--resume``, the
    rule the run recorded, or timm's antialiased one for runs recorded before the rule was (so a
    run resumes as it started)."""
    if cfg.pos_embed_resize is not None:
        return cfg
    rule = posembed.OFFICIAL
    if cfg.resume:
        rule = (run.saved_options() or {}).get("pos_embed_resize") or posembed.TIMM
    return replace(cfg, pos_embed_resize=rule)


def fill_defaults(cfg: RefineConfig, depth: int, embed_dim: int) -> RefineConfig:
    """A copy of ``cfg`` with options left at None set from the objective's defaults, then NNA's."""
    defaults = objective_defaults(cfg.objective, depth, embed_dim)
    filled = {k: v for k, v in defaults.items() if getattr(cfg, k, None) is None}
    return replace(cfg, **filled)


def with_saved_options(cfg: RefineConfig, given: set[str] | None) -> RefineConfig:
    """On ``--resume``: options not in ``given`` (the ones the user set) take the run's recorded
    values from ``RUN_DIR/config.json``, so ``refine MODEL --data DIR --out RUN --resume`` is
    enough. ``given=None`` keeps ``cfg`` as it is."""
    if given is None or not cfg.resume:
        return cfg
    saved = RunFolder(cfg.out).saved_options()
    if saved is None:
        return cfg  # the run's own checks say what is wrong
    updates: dict[str, Any] = {}
    for f in fields(cfg):
        name = f.name
        if name in ("resume", "out", "force_unlock") or name not in saved or name in given:
            continue
        value = saved[name]
        if not _recorded_type_ok(str(f.type), value):
            raise MimcliError(
                f"--resume: {cfg.out}/config.json records {name} as {_shown(value)}, not a "
                f"{f.type}; give --{name.replace('_', '-')} or fix the file"
            )
        if name in PATH_OPTIONS and value is not None:
            value = data_spec(value)
        elif name in TUPLE_OPTIONS and value is not None:
            value = tuple(value)
        elif name in ("teacher", "trackers"):
            value = list(value or [])
        updates[name] = value
    return replace(cfg, **updates)


def resume_num_heads(cfg: RefineConfig, run: RunFolder) -> int | None:
    """The head count to read MODEL with: ``--num-heads`` when given; on ``--resume``, else the
    count the run recorded (so a MODEL given again without its ``#heads=`` suffix loads as it
    did; a suffix still wins, and a file's own count must agree)."""
    if cfg.num_heads is not None or not cfg.resume:
        return cfg.num_heads
    try:
        resolved = run.read_config().get("resolved")
    except MimcliError:
        return None
    heads = resolved.get("num_heads") if isinstance(resolved, dict) else None
    if not heads:
        return None
    if not isinstance(heads, int) or isinstance(heads, bool) or not 1 <= heads <= MAX_HEADS:
        raise MimcliError(
            f"--resume: {cfg.out}/config.json records {_shown(heads)} attention heads; give "
            "--num-heads or fix the file"
        )
    return heads


def check_resume(cfg: RefineConfig, run: RunFolder, num_heads: int | None = None) -> None:
    """``--resume`` continues the run only with its objective, the options that shape it and
    the attention-head count its MODEL was read with (``num_heads``: the one loaded now; a MODEL
    given again without its ``#heads=`` suffix could load with another count)."""
    record = run.read_config()
    config, resolved = record.get("config", {}), record.get("resolved", {})
    if not isinstance(config, dict) or not isinstance(resolved, dict):
        raise MimcliError(f"--resume: {cfg.out}/config.json is not a refine run's record")
    # runs recorded before the resize rule was resized the timm way
    saved = {"pos_embed_resize": posembed.TIMM, **config}
    was_heads = resolved.get("num_heads")
    if was_heads is not None and num_heads is not None and was_heads != num_heads:
        raise MimcliError(
            f"--resume: {cfg.out} refined MODEL read with {was_heads} attention heads, it now "
            f"loads with {num_heads}; resume with the run's MODEL ({saved.get('model', '?')})"
        )
    was = saved.get("objective", "nna")
    if was != cfg.objective:
        raise MimcliError(
            f"--resume: {cfg.out} is a --objective {was} run; resume it with --objective {was}"
        )
    now = json.loads(json.dumps(asdict(cfg), default=str))
    changed = [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}"
        for k in RESUME_KEYS
        if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise MimcliError(
            f"--resume: options differ from the run in {cfg.out} ({'; '.join(changed)}); "
            "resume with the run's options (see its config.json)"
        )


def stage_steps(epochs: float, steps: int | None, steps_per_epoch: int) -> int:
    """Steps of one stage: ``steps`` when given, else ``epochs`` worth (rounded up)."""
    if steps is not None:
        if steps < 0:
            raise MimcliError("step counts must be 0 or more")
        return steps
    return int(math.ceil(epochs * steps_per_epoch))


def trainable_encoder(
    loaded: LoadedModel, freeze_blocks: int, resize_rule: str = posembed.OFFICIAL
) -> nn.Module:
    """The encoder rebuilt with ``dynamic_img_size`` (local crops are smaller than the input
    size) and its position table resized by ``resize_rule`` (:mod:`mimcli.models.posembed`),
    the fixed position table frozen, and the stem plus ``freeze_blocks`` blocks frozen."""
    encoder = trainable_architecture(loaded.arch, loaded.model_args, resize_rule)
    encoder.load_state_dict(loaded.model.state_dict())
    encoder.pretrained_cfg = loaded.pretrained_cfg
    return freeze_parameters(encoder, freeze_blocks)


def trainable_architecture(
    arch: str, model_args: dict[str, Any], resize_rule: str = posembed.OFFICIAL
) -> nn.Module:
    """The architecture refinement trains (fresh weights; built on the current default device,
    e.g. ``meta`` for ``--plan``): ``dynamic_img_size`` where timm offers it (local crops are
    smaller than the input size; BEiT has none) and the position table resized by
    ``resize_rule``."""
    from mimcli.models.build import build_model

    args = dict(model_args)
    if "beit" not in arch:
        args["dynamic_img_size"] = True
    return posembed.apply_resize_rule(build_model(arch, args), resize_rule)


def freeze_parameters(encoder: nn.Module, freeze_blocks: int) -> nn.Module:
    """Freeze the fixed position table, and with ``freeze_blocks`` the stem and that many
    blocks; returned for convenience."""
    depth = len(encoder.blocks)  # type: ignore[arg-type]
    if not 0 <= freeze_blocks <= depth:
        raise MimcliError(f"--freeze-blocks must lie in 0..{depth}")
    for name, param in encoder.named_parameters():
        frozen = name == "pos_embed"
        if freeze_blocks:
            frozen |= not name.startswith(("blocks.", "norm.", "fc_norm."))
            frozen |= name.startswith("blocks.") and int(name.split(".")[1]) < freeze_blocks
        param.requires_grad_(not frozen)
    return encoder
