"""One resolver for every MODEL argument: timm names, ``hf-hub:`` repos, local folders,
checkpoint files and URLs. Every command loads models through ``load_model``.

Accepted forms:
1. ``vit_large_patch16_224.mae`` — a timm name with a pretrained tag (pulled through timm).
2. ``hf-hub:owner/repo`` — a timm layout (config.json + model.safetensors) or a transformers
   data2vec-vision repo (converted onto timm's BEiT).
3. a folder with either layout (or ``local-dir:/path``).
4. a checkpoint file: official MAE ``.pth``, data2vec 2.0 ``.pt``, MIM-Refiner/MAE-CT ``.th``, or a
   timm state dict in ``.safetensors``.
5. an ``http(s)://`` URL of a file in (4), cached after the first download.
6. ``mim-refiner:NAME`` — a model the MIM-Refiner paper released (``models.released``), downloaded
   like (5) and checked against its published architecture.
"""

from __future__ import annotations

import difflib
import json
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
from mimcli.models.build import ConvertedCheckpoint, build_model, load_weights
from mimcli.models.checkpoints import PICKLE_SUFFIXES, read_checkpoint, tensors_only
from mimcli.models.converters import (
    convert_refiner,
    convert_timm_vit,
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

CHECKPOINT_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}


@dataclass
class LoadedModel:
    """An encoder ready for feature extraction, with what is needed to rebuild and describe it.

    Attributes:
        model: timm encoder (``num_classes=0``), eval mode, on CPU.
        arch / model_args: ``timm.create_model(arch, num_classes=0, **model_args)`` rebuilds it.
        pretrained_cfg: input size, mean/std, crop and interpolation for evaluation.
        source: the MODEL argument as given; ``source_kind`` says how it was read.
        format: checkpoint format (``timm``, ``mae``, ``data2vec2``, ``data2vec-vision``, ...).
        decoder: MAE decoder weights when the source carried them (an MAE ``_full`` checkpoint,
            or ``decoder.safetensors`` beside the weights of a folder), else None.
        decoder_metadata: that ``decoder.safetensors``'s metadata (``decoder_num_heads``,
            ``layer_norm_eps``, ``norm_pix_loss``, ``patch_size``), else None.
        notes: how the source was read where a reader would not guess it (one sentence each),
            e.g. a data2vec-vision model loaded with no final norm.
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


def _finish(converted: ConvertedCheckpoint, source: str, kind: str) -> LoadedModel:
    model = build_model(converted.arch, converted.model_args)
    load_weights(model, converted.state_dict, source)
    cfg = dict(model.pretrained_cfg)
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
    )


def convert_checkpoint(path: Path, source: str) -> ConvertedCheckpoint:
    """Recognise a checkpoint file's format from its keys and convert it."""
    top = read_checkpoint(path)
    metadata = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
    if isinstance(top.get("state_dict"), dict) and looks_like_refiner(top["state_dict"]):
        return convert_refiner(tensors_only(top["state_dict"]))
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
        fmt = "mae" if inner is not None and "model" in top else "timm"
        cfg = None
        if metadata and "pretrained_cfg" in metadata:
            cfg = json.loads(metadata["pretrained_cfg"])
        return convert_timm_vit(
            weights, fmt=fmt, model_args=model_args_from_metadata(metadata), pretrained_cfg=cfg
        )
    sample = ", ".join(list(weights)[:4]) or "no tensors"
    raise MimcliError(
        f"{source}: unsupported checkpoint (found keys like {sample}); expected an MAE .pth "
        "('model' with patch_embed.proj.*, blocks.<i>.*), a data2vec 2.0 .pt "
        "(modality_encoders.IMAGE.*), a MIM-Refiner/MAE-CT .th (state_dict with cls_tokens.tokens, "
        "pos_embed.embed) or a timm ViT state dict in .safetensors"
    )


def _load_timm(spec: str, name: str, kind: str) -> LoadedModel:
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
    return LoadedModel(
        model=model,
        arch=arch,
        model_args=model_args,
        pretrained_cfg=cfg,
        source=spec,
        source_kind=kind,
        format="timm",
    )


def _read_layout_config(spec: str, kind: str) -> dict[str, Any]:
    if kind == "folder":
        path = _folder_of(spec) / "config.json"
    else:
        path = hub_file(spec[len("hf-hub:") :], "config.json", spec)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MimcliError(f"{spec}: config.json is missing or not valid JSON ({exc})") from exc


def _folder_of(spec: str) -> Path:
    return Path(spec[len("local-dir:") :] if spec.startswith("local-dir:") else spec).expanduser()


def _load_data2vec_vision(
    spec: str, config: dict[str, Any], files: dict[str, Path | None], kind: str
) -> LoadedModel:
    weights_path = files.get("model.safetensors") or files.get("pytorch_model.bin")
    if weights_path is None:
        raise MimcliError(
            f"{spec}: data2vec-vision layout without model.safetensors or pytorch_model.bin"
        )
    state = tensors_only(read_checkpoint(weights_path))
    loaded = _finish(convert_data2vec_vision(state, config), spec, kind)
    if loaded.arch == BEIT_NO_FINAL_NORM_ARCH:
        loaded.notes.append(NO_FINAL_NORM_NOTE)
    return loaded


def _load_layout(spec: str, kind: str) -> LoadedModel:
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
        return _load_data2vec_vision(spec, config, files, kind)
    if "architecture" not in config:
        raise MimcliError(
            f"{spec}: config.json has neither timm's 'architecture' nor transformers' "
            "model_type 'data2vec-vision'; expected a timm layout (config.json + model.safetensors)"
        )
    if kind == "folder":
        folder = _folder_of(spec).resolve()
        if (
            not (folder / "model.safetensors").is_file()
            and not (folder / "pytorch_model.bin").is_file()
        ):
            raise MimcliError(f"{spec}: timm layout folder without model.safetensors")
        loaded = _load_timm(spec, f"local-dir:{folder}", kind)
        _attach_folder_decoder(loaded, folder)
        return loaded
    return _load_timm(spec, spec, kind)


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


def _load_released(spec: str) -> LoadedModel:
    """``mim-refiner:NAME``: the paper's file through the URL cache, with its published head
    count (heads cannot be read off weights) and its architecture checked."""
    release = released_model(spec)
    path = download_url(release.url, label=spec)
    converted = convert_checkpoint(path, spec)
    converted.model_args["num_heads"] = release.num_heads
    problem = release.mismatch(converted.model_args, converted.arch == POSTNORM_ARCH)
    if problem:
        raise MimcliError(
            f"{spec}: {path} (from {release.url}) is not the published {release.describe()}: "
            f"{problem}; delete it to download again"
        )
    loaded = _finish(converted, spec, "mim-refiner")
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


def load_model(spec: str) -> LoadedModel:
    """Resolve a MODEL argument to an encoder in eval mode on CPU (see the module docstring)."""
    spec = spec.strip()
    if not spec:
        raise MimcliError("empty MODEL argument")
    if is_released_spec(spec):
        return _load_released(spec)
    if spec.startswith(("http://", "https://")):
        path = download_url(spec)
        return _finish(convert_checkpoint(path, spec), spec, "url")
    if spec.startswith("hf-hub:"):
        return _load_layout(spec, "hf-hub")
    path = _folder_of(spec)
    if spec.startswith("local-dir:") or path.is_dir():
        if not path.is_dir():
            raise MimcliError(f"{spec}: no such folder")
        return _load_layout(spec, "folder")
    if path.is_file():
        return _finish(convert_checkpoint(path, spec), spec, "file")
    if _looks_like_path(spec):
        raise MimcliError(f"{spec}: no such file or folder")
    if not timm.list_pretrained(spec) and not timm.list_pretrained(spec + ".*"):
        raise _timm_name_error(spec)
    return _load_timm(spec, spec, "timm")
