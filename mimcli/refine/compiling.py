"""``refine --compile``: ``torch.compile`` of what a refine step runs, applied in place.

The objectives never call ``encoder.forward()``: they run ``forward_intermediates``,
``patch_embed`` and the blocks one by one (:mod:`mimcli.models.taps`, :mod:`mimcli.models.masked`)
and their heads on their own, so compiling the encoder as a whole would compile nothing they
use. The unit compiled is therefore each transformer block, and each head:

- every block of the encoder, of a momentum encoder (ConMIM) and of an MAE decoder (MR-MAE);
- every head MLP of the objective: an ``IDHead`` (projector + predictor, NNA/NNCLR), the EMA
  target projectors (NNCLR), token projectors (ConMIM), feature heads (MimCo). A bare
  ``nn.Linear`` (MR-MAE's mimic heads) is left as it is: there is nothing to fuse.

Compiled in place with ``nn.Module.compile`` semantics: the module's call is compiled, its
``state_dict`` keys, checkpoints, exports and FSDP2's per-block ``fully_shard`` stay as without.
Blocks of one class share their compiled code: torch inlines built-in modules, so parameters
are graph inputs and a new graph is built only per input shape, grad mode, train/eval mode and
frozen/trainable parameters (e.g. globals and locals: two). ``dynamic=False``: every shape is
fixed in a run, so each is specialised. Backward is compiled with the forward
(AOTAutograd), and ``--grad-checkpointing`` recomputes the compiled block.

Left eager, on purpose:

- frozen teachers (``--teacher``): forward only, under ``no_grad``, loaded per run;
- copies made by ``copy.deepcopy`` (the encoder EMA): torch drops the compiled call from a copy;
- anything run under ``torch.inference_mode`` (the k-NN monitor, feature extraction): its batch
  sizes vary, and each size would be another compile;
- heads with synchronised BatchNorm (several processes): their all-reduces and host reads
  would split the graph at every layer;
- the stem, final norms, losses and queue look-ups (small, or data-dependent).

The first steps of each shape are slow (the compile: ~30-45 s per shape for the tiny ViT on a
CPU core, minutes for ViT-L); inductor caches what it built in ``TORCHINDUCTOR_CACHE_DIR``
(default ``/tmp/torchinductor_$USER``), so a second run of the same shapes starts faster.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

import torch
from torch import nn

from mimcli.errors import MimcliError
from mimcli.heads import IDHead, SyncBatchNorm1d

# Every variant of a block class (shape x grad mode x train/eval x frozen) is one entry of
# dynamo's cache for that class's forward; its default limit (8) is reached by a run with
# local crops, frozen blocks, a momentum encoder and a decoder of the same class.
RECOMPILE_LIMIT = 64
BLOCK_LISTS = ("blocks", "decoder_blocks")


def check_compilable(device: torch.device) -> None:
    """One line when this machine cannot compile for ``device`` (inductor needs a C++ compiler
    on CPU and Triton on CUDA; dynamo does not run on every Python)."""
    from torch._dynamo.eval_frame import check_if_dynamo_supported

    try:
        check_if_dynamo_supported()
    except RuntimeError as exc:
        raise MimcliError(f"--compile: {exc}; run without --compile") from None
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise MimcliError(
            "--compile on CUDA needs Triton (pip install triton); run without --compile"
        )
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise MimcliError(
            "--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or "
            "run without --compile"
        )
    if device.type not in ("cpu", "cuda"):
        raise MimcliError(f"--compile supports cpu and cuda devices, not {device.type}")


def compile_module(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile ``module``'s call in place (what ``nn.Module.compile`` does), except under
    ``torch.inference_mode``, where it runs eager. Returns ``module``."""
    compiled = torch.compile(module._call_impl, dynamic=False, backend=backend)
    eager = module._call_impl

    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    # nn.Module.__getstate__ drops this attribute, so deep copies (the EMA) run eager
    module._compiled_call_impl = call
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _block_lists(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks ``module`` holds directly (``blocks``, ``decoder_blocks``)."""
    found: list[nn.Module] = []
    for name in BLOCK_LISTS:
        stack = getattr(module, name, None)
        if isinstance(stack, (nn.ModuleList, nn.Sequential)):
            found += list(stack)
    return found


def _synced(module: nn.Module) -> bool:
    return any(isinstance(m, (SyncBatchNorm1d, nn.SyncBatchNorm)) for m in module.modules())


def compile_targets(
    encoder: nn.Module, objective: nn.Module
) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(blocks, heads)`` that :func:`compile_step` compiles (see the module docstring)."""
    blocks = _block_lists(encoder)
    heads: list[nn.Module] = []
    done: list[str] = []  # prefixes already handled (a head, or an encoder/decoder)
    for name, module in objective.named_modules():
        if not name or any(name.startswith(p + ".") for p in done):
            continue
        stacks = _block_lists(module)
        if stacks:  # a momentum encoder or a decoder: its blocks, not the whole
            blocks += stacks
            done.append(name)
        elif isinstance(module, (IDHead, nn.Sequential)):
            done.append(name)
            if not _synced(module):
                heads.append(module)
    return blocks, heads


def compile_step(
    encoder: nn.Module,
    objective: nn.Module,
    device: torch.device,
    backend: str = "inductor",
) -> dict[str, int]:
    """Compile, in place, the blocks and heads a refine step runs (``refine --compile``).

    Call it once everything the step uses is built (the objective's momentum copies included)
    and after the encoder EMA is copied: compiled calls do not survive ``copy.deepcopy``.

    Args:
        encoder: the trainable encoder (timm ViT layout: ``blocks``).
        objective: the objective (heads, projectors, momentum encoders, decoders).
        device: where the step runs (checked for a compiler).
        backend: ``torch.compile``'s backend (``"eager"`` traces without generating code:
            quick checks of the wiring).

    Returns:
        ``{"blocks": n, "heads": m}`` compiled.

    Raises:
        MimcliError: when this machine cannot compile for ``device``, or the encoder has no
            ``blocks`` to compile.
    """
    if backend == "inductor":
        check_compilable(device)
    blocks, heads = compile_targets(encoder, objective)
    if not _block_lists(encoder):
        raise MimcliError(
            f"--compile needs an encoder with a list of blocks; {type(encoder).__name__} has none"
        )
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    for module in (*blocks, *heads):
        compile_module(module, backend)
    return {"blocks": len(blocks), "heads": len(heads)}
