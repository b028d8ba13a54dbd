"""One resolver for every MODEL argument: timm names, ``hf-hub:`` repos, local folders,
checkpoint files and URLs. Every command loads models through ``load_model``.

Accepted forms:
1. ``vit_large_patch16_224.mae`` — a timm name with a pretrained tag (pulled through timm).
2. ``hf-hub:owner/repo`` — a timm layout (config.json + model.safetensors) or a transformers
   data2vec-vision repo (converted onto timm's BEiT).
3. a folder with either layout (or ``local-dir:/path``).
4. a checkpoint file: official MAE ``.pth`` (also ``main_pretrain.py``'s training checkpoints),
   data2vec 2.0 ``.pt``, MIM-Refiner ``.th`` (``cls_tokens.tokens``), MAE-CT ``.th`` (timm names,
   positions without a CLS slot), or a timm state dict (register tokens included).
5. an ``http(s)://`` URL of a file in (4), cached after the first download.
6. ``mim-refiner:NAME`` — a model the MIM-Refiner paper released (``models.released``), downloaded
   like (5) and checked against its published architecture.

Any form takes a ``#heads=N`` suffix (``models.spec``) for checkpoints that do not record their
attention-head count; ``load_model(..., num_heads=N)`` (the commands' ``--num-heads``) does the same
for a MODEL without the suffix. A count the file records is never overridden (a different one
given is an error). Every load logs one note (``LoadedModel.note``) on the ``mimcli`` logger:
format, architecture, where the head count came from, what was left out.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from torch import nn

from mimcli.errors import MimcliError
from mimcli.hub.download import (
    download_url,
    hub_access,
    hub_errors_to_mimcli,
    hub_file,
    hub_file_exists,
)
from mimcli.models.build import (
    HEADS_FLAG,
    ConvertedCheckpoint,
    build_model,
    load_weights,
    model_num_heads,
    recorded_num_heads,
    settle_num_heads,
)
from mimcli.models.checkpoints import PICKLE_SUFFIXES, read_checkpoint, tensors_only
from mimcli.models.converters import (
    convert_maect,
    convert_refiner,
    convert_timm_vit,
    looks_like_maect,
    looks_like_refiner,
    model_args_from_metadata,
    strip_prefixes,
)
from mimcli.models.data2vec import (
    NO_FINAL_NORM_NOTE,
    convert_data2vec2,
    convert_data2vec_vision,
    looks_like_data2vec2,
    looks_like_data2vec_vision,
)
from mimcli.models.postnorm import BEIT_NO_FINAL_NORM_ARCH, POSTNORM_ARCH
from mimcli.models.released import is_released_spec, released_model
from mimcli.models.spec import HEADS_SUFFIX, parse_model_spec

CHECKPOINT_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """An encoder ready for feature extraction, with what is needed to rebuild and describe it.

    Attributes:
        model: timm encoder (``num_classes=0``), eval mode, on CPU.
        arch / model_args: ``timm.create_model(arch, num_classes=0, **model_args)`` rebuilds it.
        pretrained_cfg: input size, mean/std, crop and interpolation for evaluation.
        source: the MODEL argument as given (with any ``#heads=`` suffix); ``source_kind`` says
            how it was read.
        format: checkpoint format (``timm``, ``mae``, ``MAE-CT``, ``refiner``, ``data2vec2``,
            ``data2vec-vision``).
        decoder: MAE decoder weights when the source carried them (an MAE ``_full`` checkpoint,
            or ``decoder.safetensors`` beside the weights of a folder), else None.
        decoder_metadata: that ``decoder.safetensors``'s metadata (``decoder_num_heads``,
            ``layer_norm_eps``, ``norm_pix_loss``, ``patch_size``), else None.
        notes: the load note's parts: format and architecture, where the attention-head count
            came from, what was left out (decoder, EMA teacher, classifier), and anything a
            reader would not guess (e.g. a data2vec-vision model loaded with no final norm).
    """

    model: nn.Module
    arch: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    source: str
    source_kind: str
    format: str
    decoder: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    decoder_metadata: dict[str, str] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)  # type: ignore[arg-type]

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)  # type: ignore[arg-type]

    @property
    def num_heads(self) -> int | None:
        return model_num_heads(self.model)

    @property
    def note(self) -> str:
        """One line: ``SOURCE: <format> read as <arch>; N attention heads (from ...); ...``."""
        return f"{self.source}: {'; '.join(self.notes)}"


@dataclass(frozen=True)
class _Heads:
    """The head count the user gave for one MODEL, and how (for messages and the note)."""

    count: int | None = None
    given_by: str = HEADS_FLAG


def _describe(
    fmt: str, arch: str, model: nn.Module, heads_note: str, dropped: list[str]
) -> list[str]:
    shape = []
    if hasattr(model, "embed_dim"):
        shape.append(f"width {model.embed_dim}")
    if hasattr(model, "blocks"):
        shape.append(f"{len(model.blocks)} blocks")  # type: ignore[arg-type]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        shape.append("patch " + "x".join(str(p) for p in dict.fromkeys(patch)))
    reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    if reg:
        shape.append(f"{reg} register tokens")
    notes = [f"{fmt} read as {arch} ({', '.join(shape)})", heads_note]
    if dropped:
        notes.append(f"left out: {', '.join(dropped)}")
    return notes


FOREIGN_CFG_KEYS = frozenset(
    {"tag", "license", "hf_hub_id", "hf_hub_filename", "url", "file", "origin_url", "paper_ids",
     "paper_name", "notes", "source"}
)  # fmt: skip


# What a checkpoint whose keys name one format but whose tensors do not fit it raises inside the
# converters and timm (a 0-d patch projection, a string where a count belongs...).
MALFORMED = (
    IndexError, KeyError, ValueError, TypeError, AttributeError, ZeroDivisionError,
    OverflowError, RuntimeError,
)  # fmt: skip


def _malformed(source: str, exc: BaseException) -> MimcliError:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return MimcliError(
        f"{source}: its tensors do not fit the checkpoint format their names suggest "
        f"({type(exc).__name__}: {first}); convert it to a timm state dict"
    )


# Line breaks a key name from a file may carry into a message (what str.splitlines splits on).
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")


def _one_line(exc: MimcliError) -> MimcliError:
    """``exc`` itself, or a copy on one line when key names from the file broke its message."""
    text = str(exc)
    return exc if not _LINE_BREAKS.search(text) else MimcliError(_LINE_BREAKS.sub(" ", text))


def _convert(path: Path, source: str) -> ConvertedCheckpoint:
    """:func:`convert_checkpoint` for a file from outside: a malformed one is one line."""
    try:
        return convert_checkpoint(path, source)
    except MimcliError as exc:
        raise _one_line(exc) from exc.__cause__
    except MALFORMED as exc:
        raise _malformed(source, exc) from exc


def _fits(converted: ConvertedCheckpoint, source: str) -> None:
    """The architecture a checkpoint implies, built on the meta device (no memory), must not be
    much larger than the tensors it holds (the load below is strict), so odd shapes or block
    numbers cannot make timm allocate a giant model first."""
    if converted.model_args.get("depth", 0) > MAX_DEPTH:
        raise MimcliError(f"{source}: {converted.model_args['depth']} blocks; at most {MAX_DEPTH}")
    with torch.device("meta"):
        shape = build_model(converted.arch, converted.model_args)
    params = sum(p.numel() for p in shape.parameters())
    held = sum(v.numel() for v in converted.state_dict.values() if isinstance(v, torch.Tensor))
    if params > 2 * held + 2**20:
        raise MimcliError(
            f"{source}: its weights ({held:,} numbers) are far fewer than the {params:,} "
            f"parameters of the {converted.arch} they describe"
        )


def _finish(converted: ConvertedCheckpoint, source: str, kind: str, heads: _Heads) -> LoadedModel:
    try:
        heads_note = settle_num_heads(converted, heads.count, heads.given_by, source)
        _fits(converted, source)
        model = build_model(converted.arch, converted.model_args)
        load_weights(model, converted.state_dict, source)
    except MimcliError as exc:
        raise _one_line(exc) from exc.__cause__
    except MALFORMED as exc:
        raise _malformed(source, exc) from exc
    # timm's default cfg of the architecture name describes timm's own weights (their tag,
    # licence, Hub id): a converted checkpoint keeps only its preprocessing
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in FOREIGN_CFG_KEYS}
    cfg.update(converted.pretrained_cfg)
    cfg["architecture"] = converted.arch
    model.pretrained_cfg = cfg
    model.eval()
    return LoadedModel(
        model=model,
        arch=converted.arch,
        model_args=converted.model_args,
        pretrained_cfg=cfg,
        source=source,
        source_kind=kind,
        format=converted.format,
        decoder=converted.decoder,
        notes=_describe(converted.format, converted.arch, model, heads_note, converted.dropped),
    )


def convert_checkpoint(path: Path, source: str) -> ConvertedCheckpoint:
    """Recognise a checkpoint file's format from its keys and convert it."""
    top = read_checkpoint(path)
    metadata = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
    if isinstance(top.get("state_dict"), dict) and looks_like_refiner(top["state_dict"]):
        sd = tensors_only(top["state_dict"])
        dim = next((int(v.shape[-1]) for k, v in sd.items() if k.endswith("cls_tokens.tokens")), 0)
        return convert_refiner(sd, heads=recorded_num_heads(top, dim))
    if looks_like_data2vec2(top):
        return convert_data2vec2(top)
    inner = top.get("model") if isinstance(top.get("model"), dict) else None
    if inner is None and isinstance(top.get("state_dict"), dict):
        inner = top["state_dict"]
    weights = tensors_only(inner if inner is not None else top)
    weights = strip_prefixes(weights)
    if looks_like_refiner(weights):
        return convert_refiner(weights)
    if "patch_embed.proj.weight" in weights:
        if looks_like_maect(top, weights):
            return convert_maect(top, weights)
        fmt = "mae" if inner is not None and "model" in top else "timm"
        cfg = None
        if metadata and "pretrained_cfg" in metadata:
            cfg = json.loads(metadata["pretrained_cfg"])
        dim = int(weights["patch_embed.proj.weight"].shape[0])
        return convert_timm_vit(
            weights,
            fmt=fmt,
            model_args=model_args_from_metadata(metadata),
            pretrained_cfg=cfg,
            heads=recorded_num_heads(top, dim),
        )
    sample = ", ".join(list(weights)[:4]) or "no tensors"
    raise MimcliError(
        f"{source}: unsupported checkpoint (found keys like {sample}); expected an MAE .pth "
        "('model' with patch_embed.proj.*, blocks.<i>.*), a data2vec 2.0 .pt "
        "(modality_encoders.IMAGE.*), a MIM-Refiner .th (state_dict with cls_tokens.tokens, "
        "pos_embed.embed), an MAE-CT .th (state_dict with cls_token, pos_embed without a CLS "
        "slot, blocks.<i>.*) or a timm ViT state dict in .safetensors"
    )


def _load_timm(spec: str, name: str, kind: str, heads: _Heads) -> LoadedModel:
    """Through timm's own loader (timm names, ``hf-hub:`` and ``local-dir:`` timm layouts)."""
    try:
        if kind == "folder":
            model = timm.create_model(name, pretrained=True, num_classes=0)
        else:
            with hub_access():
                model = timm.create_model(name, pretrained=True, num_classes=0)
    except MimcliError:
        raise
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise MimcliError(f"{spec}: unknown timm architecture ({exc})") from exc
        raise MimcliError(f"{spec}: cannot load: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:
        raise hub_errors_to_mimcli(spec, exc) from exc
    model.eval()
    cfg = dict(model.pretrained_cfg)
    arch = cfg.get("architecture") or name
    model_args: dict[str, Any] = {}
    if kind in ("hf-hub", "folder"):
        model_args = dict(_read_layout_config(spec, kind).get("model_args") or {})
    count = model_num_heads(model)
    where = "config.json" if kind in ("hf-hub", "folder") else f"timm's {arch}"
    if heads.count is not None and count is not None and heads.count != count:
        raise MimcliError(
            f"{spec}: its {where} gives {count} attention heads, not {heads.count}; leave out "
            f"{heads.given_by} for this MODEL"
        )
    heads_note = f"{count} attention heads (from {where})" if count else "no attention blocks"
    return LoadedModel(
        model=model,
        arch=arch,
        model_args=model_args,
        pretrained_cfg=cfg,
        source=spec,
        source_kind=kind,
        format="timm",
        notes=_describe("timm layout" if kind != "timm" else "timm", arch, model, heads_note, []),
    )


def _read_layout_config(spec: str, kind: str) -> dict[str, Any]:
    if kind == "folder":
        path = _folder_of(spec) / "config.json"
    else:
        path = hub_file(spec[len("hf-hub:") :], "config.json", spec)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8
        raise MimcliError(f"{spec}: config.json is missing or not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise MimcliError(f"{spec}: config.json holds no JSON object")
    return config


MAX_DEPTH = 1024  # blocks of a model read from a file (as --blocks counts them)

# Largest integer a timm config.json's model_args may give (widths, sizes); a ViT's depth and
# head count are bounded like --blocks and #heads=N.
MAX_MODEL_ARG = 2**16


def check_layout_size(spec: str, config: dict[str, Any], weights: Path) -> None:
    """A timm folder's config.json checked against its weights before timm builds the model:
    ``architecture`` a string, ``model_args`` a dict of sane numbers, and the model it
    describes (built on the meta device, no memory) no larger than the weights file (at least
    one byte per parameter), so a config claiming a giant model fails in one line instead of
    allocating it."""
    from mimcli.blocks import MAX_BLOCK
    from mimcli.models.spec import MAX_HEADS

    arch, args = config.get("architecture"), config.get("model_args") or {}
    if not isinstance(arch, str) or not isinstance(args, dict):
        raise MimcliError(
            f"{spec}: config.json needs 'architecture' (a timm name) and a dict of 'model_args'"
        )
    limits = {"depth": MAX_BLOCK, "num_heads": MAX_HEADS}
    for key, value in args.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not abs(value) <= limits.get(key, MAX_MODEL_ARG):
                raise MimcliError(f"{spec}: config.json model_args {key}={value} is out of range")
    try:
        with torch.device("meta"):
            shape = timm.create_model(arch, pretrained=False, **{**args, "num_classes": 0})
    except Exception as exc:  # timm/torch raise many types for arguments a model does not take
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MimcliError(f"{spec}: config.json does not describe a timm model ({first})") from exc
    params = sum(p.numel() for p in shape.parameters())
    size = weights.stat().st_size
    if params > size:
        raise MimcliError(
            f"{spec}: config.json describes {params:,} parameters but {weights.name} holds only "
            f"{size:,} bytes; the config does not belong to these weights"
        )


def _folder_of(spec: str) -> Path:
    return Path(spec[len("local-dir:") :] if spec.startswith("local-dir:") else spec).expanduser()


def _load_data2vec_vision(
    spec: str, config: dict[str, Any], files: dict[str, Path | None], kind: str, heads: _Heads
) -> LoadedModel:
    weights_path = files.get("model.safetensors") or files.get("pytorch_model.bin")
    if weights_path is None:
        raise MimcliError(
            f"{spec}: data2vec-vision layout without model.safetensors or pytorch_model.bin"
        )
    state = tensors_only(read_checkpoint(weights_path))
    loaded = _finish(convert_data2vec_vision(state, config), spec, kind, heads)
    if loaded.arch == BEIT_NO_FINAL_NORM_ARCH:
        loaded.notes.append(NO_FINAL_NORM_NOTE)
    return loaded


def _load_layout(spec: str, kind: str, heads: _Heads) -> LoadedModel:
    """A folder or Hub repo: timm layout, or transformers data2vec-vision layout."""
    config = _read_layout_config(spec, kind)
    if looks_like_data2vec_vision(config):
        files: dict[str, Path | None] = {}
        for name in ("model.safetensors", "pytorch_model.bin"):
            if kind == "folder":
                path = _folder_of(spec) / name
                files[name] = path if path.is_file() else None
            else:
                repo = spec[len("hf-hub:") :]
                files[name] = (
                    hub_file(repo, name, spec) if hub_file_exists(repo, name, spec) else None
                )
            if files[name] is not None:
                break
        return _load_data2vec_vision(spec, config, files, kind, heads)
    if "architecture" not in config:
        raise MimcliError(
            f"{spec}: config.json has neither timm's 'architecture' nor transformers' "
            "model_type 'data2vec-vision'; expected a timm layout (config.json + model.safetensors)"
        )
    if kind == "folder":
        folder = _folder_of(spec).resolve()
        weights = [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin")]
        weights = [p for p in weights if p.is_file()]
        if not weights:
            raise MimcliError(f"{spec}: timm layout folder without model.safetensors")
        check_layout_size(spec, config, weights[0])
        loaded = _load_timm(spec, f"local-dir:{folder}", kind, heads)
        _attach_folder_decoder(loaded, folder)
        return loaded
    return _load_timm(spec, spec, kind, heads)


DECODER_FILE = "decoder.safetensors"


def _attach_folder_decoder(loaded: LoadedModel, folder: Path) -> None:
    """An MAE decoder saved beside the encoder (``decoder.safetensors``, official ``_full`` key
    names, e.g. examples/models/fmnist-mae-tiny) fills ``loaded.decoder`` for MR-MAE."""
    path = folder / DECODER_FILE
    if not path.is_file():
        return
    loaded.decoder = tensors_only(read_checkpoint(path))
    with safe_open(str(path), framework="pt") as fh:
        loaded.decoder_metadata = fh.metadata()


def _load_released(spec: str, heads: _Heads) -> LoadedModel:
    """``mim-refiner:NAME``: the paper's file through the URL cache, with its published head
    count (heads cannot be read off weights; a different count given is refused) and its
    architecture checked."""
    release = released_model(spec)
    path = download_url(release.url, label=spec)
    converted = _convert(path, spec)
    converted.model_args["num_heads"] = release.num_heads
    converted.heads_from = "published release"
    problem = release.mismatch(converted.model_args, converted.arch == POSTNORM_ARCH)
    if problem:
        raise MimcliError(
            f"{spec}: {path} (from {release.url}) is not the published {release.describe()}: "
            f"{problem}; delete it to download again"
        )
    loaded = _finish(converted, spec, "mim-refiner", heads)
    loaded.notes.append(f"MIM-Refiner's {release.name}: {release.describe()}, from {release.url}")
    return loaded


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.startswith((".", "~")) or Path(spec).suffix in CHECKPOINT_SUFFIXES


def _timm_name_error(spec: str) -> MimcliError:
    names = timm.list_pretrained()
    close = difflib.get_close_matches(spec, names, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else (
            "; see `timm.list_pretrained('*mae*')`, or pass a checkpoint file, folder, "
            "hf-hub:owner/repo or URL"
        )
    )
    return MimcliError(f"unknown model {spec!r}: not a file, folder or timm pretrained name{hint}")


def load_model(spec: str, num_heads: int | None = None) -> LoadedModel:
    """Resolve a MODEL argument to an encoder in eval mode on CPU (see the module docstring).

    Args:
        spec: the MODEL argument, optionally ending in ``#heads=N``.
        num_heads: attention heads for a checkpoint that does not record them (``--num-heads``);
            the MODEL's own ``#heads=`` suffix wins over it.

    Returns:
        The loaded model; its one-line ``note`` is also logged (logger ``mimcli``, INFO).
    """
    parsed = parse_model_spec(spec)
    if parsed.num_heads is not None:
        heads = _Heads(parsed.num_heads, HEADS_SUFFIX + str(parsed.num_heads))
    elif num_heads is not None:
        if num_heads < 1:
            raise MimcliError(f"{HEADS_FLAG} must be at least 1, got {num_heads}")
        heads = _Heads(num_heads, f"{HEADS_FLAG} {num_heads}")
    else:
        heads = _Heads()
    loaded = _resolve(parsed.source, heads)
    loaded.source = spec.strip()
    log.info(loaded.note)
    return loaded


def _resolve(spec: str, heads: _Heads) -> LoadedModel:
    if not spec:
        raise MimcliError("empty MODEL argument")
    if is_released_spec(spec):
        return _load_released(spec, heads)
    if spec.startswith(("http://", "https://")):
        path = download_url(spec)
        return _finish(_convert(path, spec), spec, "url", heads)
    if spec.startswith("hf-hub:"):
        return _load_layout(spec, "hf-hub", heads)
    path = _folder_of(spec)
    if spec.startswith("local-dir:") or path.is_dir():
        if not path.is_dir():
            raise MimcliError(f"{spec}: no such folder")
        return _load_layout(spec, "folder", heads)
    if path.is_file():
        return _finish(_convert(path, spec), spec, "file", heads)
    if _looks_like_path(spec):
        raise MimcliError(f"{spec}: no such file or folder")
    if not timm.list_pretrained(spec) and not timm.list_pretrained(spec + ".*"):
        raise _timm_name_error(spec)
    return _load_timm(spec, spec, "timm", heads)
