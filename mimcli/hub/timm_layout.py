"""timm's Hugging Face folder layout, ``model.safetensors`` + ``config.json``, as ``mimcli push``
writes it: the encoder's weights checked against its architecture, then written with a
byte-for-byte reproducible header beside timm's hub config (architecture, model_args,
preprocessing), so ``timm.create_model("hf-hub:...", pretrained=True)`` loads them strictly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mimcli.errors import MimcliError
from mimcli.fileio import write_bytes, write_json

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# torch dtype name -> safetensors dtype tag
_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def encoder_weights(folder: Path, arch: str, model_args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors``, checked to be exactly the state dict of
    ``arch`` built with ``model_args`` (same keys, same shapes), in its key order."""
    from safetensors.torch import load_file

    from mimcli.models.build import build_model

    tensors = load_file(str(folder / WEIGHTS_FILE))
    expected = build_model(arch, model_args).state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise MimcliError(
            f"{folder}: weights do not match {arch}: missing {missing[:3]}, unexpected "
            f"{extra[:3]}, wrong shape {wrong[:3]}; re-export the run with `mimcli refine --resume`"
        )
    return {k: tensors[k].contiguous() for k in expected}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a byte-for-byte reproducible header (keys sorted), so pushing the
    same weights twice uploads nothing new. (The safetensors writer orders metadata by a hash map
    seeded per process.)"""
    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = _DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise MimcliError(f"cannot publish tensor {name} of dtype {t.dtype}")
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def timm_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """timm's hub config from an export's ``config.json``: architecture, num_classes,
    num_features, global_pool, model_args and the preprocessing (``pretrained_cfg`` with timm's
    defaults for crop and interpolation; input size, mean and std are required)."""
    out = {
        k: cfg[k]
        for k in ("architecture", "num_classes", "num_features", "global_pool", "model_args")
        if k in cfg
    }
    pretrained = dict(cfg.get("pretrained_cfg", {}))
    for key, default in (("crop_pct", 1.0), ("crop_mode", "center"), ("interpolation", "bicubic")):
        pretrained.setdefault(key, default)
    missing = [k for k in ("input_size", "mean", "std") if k not in pretrained]
    if missing:
        raise MimcliError(f"export config.json lacks pretrained_cfg {missing}; re-export the run")
    out["pretrained_cfg"] = pretrained
    return out


def write_timm_folder(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    cfg: dict[str, Any],
) -> None:
    """Write ``folder/model.safetensors`` (``tensors`` with ``metadata``, reproducible bytes) and
    ``folder/config.json`` (:func:`timm_config` of ``cfg``), each atomically."""
    write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(tensors, metadata))
    write_json(folder / CONFIG_FILE, timm_config(cfg))
