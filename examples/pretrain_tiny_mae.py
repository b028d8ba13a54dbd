"""Pre-train a tiny ViT on Fashion-MNIST with MAE (He et al., 2022) on the CPU.

Produces a small MIM checkpoint for mimcli's examples and tests: the encoder in timm's Hugging Face
layout (loads with `timm.create_model("local-dir:...", pretrained=True)`) and the MAE decoder in the
official MAE `_full` key naming (`decoder.safetensors`), which the MR-MAE objective reuses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist_idx import (  # noqa: E402
    DEFAULT_IDX_DIR,
    FMNIST_MEAN,
    FMNIST_STD,
    DataError,
    load_idx_split,
)

IMG_SIZE = 28
PATCH_SIZE = 4
GRID = IMG_SIZE // PATCH_SIZE  # 7x7 = 49 patches
ENCODER_ARGS = dict(
    img_size=IMG_SIZE,
    patch_size=PATCH_SIZE,
    embed_dim=128,
    depth=8,
    num_heads=4,
    mlp_ratio=4.0,
    qkv_bias=True,
    global_pool="token",
)
DECODER_DIM, DECODER_DEPTH, DECODER_HEADS = 64, 2, 4
LN_EPS = 1e-6  # MAE and timm ViTs use LayerNorm(eps=1e-6)
DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "fmnist-mae-tiny"

EXAMPLE = """example:
  .venv/bin/python examples/pretrain_tiny_mae.py --epochs 10 --threads 1
  .venv/bin/python examples/pretrain_tiny_mae.py --benchmark-steps 20   # measure images/s only
"""


# ----------------------------------------------------------------------------- position embeddings
def sincos_2d(dim: int, grid: int, cls_slot: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding as in MAE.

    The first half of the channels encodes the column, the second half the row; each half is
    `[sin(pos * w_k), cos(pos * w_k)]` with `w_k = 10000 ** (-k / (dim / 4))`.

    Returns:
        `(1, grid*grid (+1), dim)` float32, with an all-zero first row when `cls_slot`.
    """
    if dim % 4:
        raise ValueError("sin-cos embedding needs dim divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_slot:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


# ----------------------------------------------------------------------------- model
class MaeDecoder(nn.Module):
    """MAE decoder; attribute names give the official `_full` checkpoint keys."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_pixels: int) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_dim, DECODER_DIM)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DECODER_DIM))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(DECODER_DIM, int(math.isqrt(num_patches)), cls_slot=True),
            requires_grad=False,
        )
        self.decoder_blocks = nn.ModuleList(
            Block(
                DECODER_DIM,
                DECODER_HEADS,
                mlp_ratio=4.0,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=LN_EPS),
            )
            for _ in range(DECODER_DEPTH)
        )
        self.decoder_norm = nn.LayerNorm(DECODER_DIM, eps=LN_EPS)
        self.decoder_pred = nn.Linear(DECODER_DIM, patch_pixels)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predict pixels of every patch.

        Args:
            latent: `(B, 1 + K, D)` encoder output (CLS first, then the K visible patches).
            restore: `(B, N)` indices that undo the shuffle used for masking.

        Returns:
            `(B, N, p*p*3)` predicted (normalised) patch pixels.
        """
        x = self.decoder_embed(latent)
        B, N = restore.shape
        masked = self.mask_token.expand(B, N - (x.shape[1] - 1), -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def create_encoder() -> nn.Module:
    """The tiny timm ViT (7x7 patches + CLS) with a frozen sin-cos `pos_embed`."""
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, **ENCODER_ARGS
    )
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(model.embed_dim, GRID, cls_slot=True))
    model.pos_embed.requires_grad_(False)
    return model


def init_like_mae(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears (patch conv as a linear), unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def encode_visible(
    encoder: nn.Module, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking, then the encoder on CLS + visible patches.

    Returns:
        latent `(B, 1 + K, D)` after the final norm, mask `(B, N)` (1 = masked, in patch order)
        and restore indices `(B, N)`.
    """
    x = encoder.patch_embed(imgs) + encoder.pos_embed[:, 1:]
    B, N, D = x.shape
    keep = int(round(N * (1 - mask_ratio)))
    noise = torch.rand(B, N, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    visible = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(B, -1, -1)
    x = encoder.norm_pre(torch.cat([cls, visible], dim=1))
    x = encoder.blocks(x)
    return encoder.norm(x), mask, restore


def patchify(imgs: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` → `(B, N, p*p*3)`, pixels ordered (row, col, channel) as in MAE."""
    B, C, H, W = imgs.shape
    p = PATCH_SIZE
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE on masked patches against per-patch normalised pixels (norm_pix_loss)."""
    target = patchify(imgs)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------- data
def augment(gray: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched random-resized-crop (scale 0.6-1, ratio 3/4-4/3) + horizontal flip.

    One affine grid per sample, so the whole batch is a single `grid_sample` call.

    Args:
        gray: `(B, 1, 28, 28)` float in [0, 1].
    """
    B = gray.shape[0]
    area = torch.empty(B).uniform_(0.6, 1.0, generator=generator)
    log_ratio = torch.empty(B).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    # Crop width/height as fractions of the image; torchvision retries crops that do not fit,
    # clamping to 1 is the batched equivalent (it only trims the few extreme area/ratio draws).
    w = (area * ratio).sqrt().clamp(max=1.0)
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * torch.rand(B, generator=generator) + w / 2
    cy = (1 - h) * torch.rand(B, generator=generator) + h / 2
    flip = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, list(gray.shape), align_corners=False)
    return F.grid_sample(gray, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_model_input(gray: torch.Tensor) -> torch.Tensor:
    """`(B, 1, H, W)` in [0, 1] → normalised `(B, 3, H, W)` (grey replicated to RGB)."""
    return ((gray - FMNIST_MEAN) / FMNIST_STD).expand(-1, 3, -1, -1).contiguous()


# ----------------------------------------------------------------------------- schedule/optimiser
def learning_rate(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then half-cosine down to `floor`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on biases, norms and tokens (MAE's rule)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            is_token = name.endswith(("cls_token", "mask_token", "pos_embed"))
            (no_decay if p.ndim <= 1 or is_token else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------- export
def pretrained_cfg() -> dict:
    mean, std = (round(FMNIST_MEAN, 3),) * 3, (round(FMNIST_STD, 3),) * 3
    return dict(
        architecture="vit_base_patch16_224",
        input_size=(3, IMG_SIZE, IMG_SIZE),
        fixed_input_size=True,
        mean=mean,
        std=std,
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bilinear",
        num_classes=0,
        first_conv="patch_embed.proj",
        classifier="head",
    )


def save_outputs(
    encoder: nn.Module, decoder: MaeDecoder, out: Path, training: dict, probe: torch.Tensor
) -> None:
    """Write the whole folder to a sibling temp dir, then swap it in with renames."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.pretrained_cfg = pretrained_cfg()
    cfg = encoder.pretrained_cfg
    timm.models.save_for_hf(
        encoder,
        str(tmp),
        model_args=dict(ENCODER_ARGS),
        safe_serialization=True,
        data_config=dict(
            input_size=cfg["input_size"],
            mean=cfg["mean"],
            std=cfg["std"],
            crop_pct=cfg["crop_pct"],
            interpolation=cfg["interpolation"],
        ),
    )
    decoder_state = {k: v.detach().contiguous() for k, v in decoder.state_dict().items()}
    safetensors.torch.save_file(
        decoder_state,
        str(tmp / "decoder.safetensors"),
        metadata={
            "format": "mae-decoder",
            "norm_pix_loss": "true",
            "decoder_num_heads": str(DECODER_HEADS),
            "patch_size": str(PATCH_SIZE),
            "layer_norm_eps": str(LN_EPS),
        },
    )
    (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    torch.save(probe, tmp / ".probe.pt")  # removed by verify(); lets it compare outputs
    for path in tmp.iterdir():
        path.chmod(0o644)  # safetensors writes 0600 files; the checkpoint is meant to be shared
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def verify(encoder: nn.Module, decoder: MaeDecoder, out: Path) -> bool:
    """Reload the folder the way users will and check outputs match the trained modules exactly."""
    probe_path = out / ".probe.pt"
    probe = torch.load(probe_path, weights_only=True)
    probe_path.unlink()
    loaded = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
    encoder.eval()
    same_features = torch.equal(loaded.forward_features(probe), encoder.forward_features(probe))
    same_pooled = torch.equal(loaded(probe), encoder(probe))
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    cfg_ok = (
        tuple(data_cfg["input_size"]) == (3, IMG_SIZE, IMG_SIZE)
        and np.allclose(data_cfg["mean"], [FMNIST_MEAN] * 3, atol=1e-3)
        and np.allclose(data_cfg["std"], [FMNIST_STD] * 3, atol=1e-3)
        and data_cfg["crop_pct"] == 1.0
        and data_cfg["interpolation"] == "bilinear"
        and loaded.num_classes == 0
    )

    fresh = MaeDecoder(encoder.embed_dim, GRID * GRID, PATCH_SIZE**2 * 3)
    missing, unexpected = fresh.load_state_dict(
        safetensors.torch.load_file(str(out / "decoder.safetensors")), strict=True
    )
    decoder.eval()
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    lat_a, mask_a, res_a = encode_visible(encoder, probe, 0.75, gen_a)
    lat_b, mask_b, res_b = encode_visible(loaded, probe, 0.75, gen_b)
    loss_a = mae_loss(decoder(lat_a, res_a), probe, mask_a)
    loss_b = mae_loss(fresh(lat_b, res_b), probe, mask_b)
    same_decoder = torch.equal(loss_a, loss_b)

    ok = same_features and same_pooled and cfg_ok and same_decoder
    print(
        f"reload check (local-dir:{out.resolve()}): features {'same' if same_features else 'DIFF'}"
        f", pooled {'same' if same_pooled else 'DIFF'}, data config {'ok' if cfg_ok else 'BAD'}"
        f", decoder loss {loss_b.item():.4f} {'same' if same_decoder else 'DIFF'}"
        f" -> {'OK' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


# ----------------------------------------------------------------------------- main
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the example epilog as written and show every default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=10, help="passes over the train set")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--idx-dir", type=Path, default=DEFAULT_IDX_DIR, help="folder of Fashion-MNIST IDX files"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per step")
    parser.add_argument(
        "--blr", type=float, default=1.5e-4, help="base lr; lr = blr * batch/256 * --lr-boost"
    )
    parser.add_argument(
        "--lr-boost",
        type=float,
        default=10.0,
        help="extra lr factor for the tiny model (10: peak lr 1.5e-3 at batch 256)",
    )
    parser.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW, matrices only")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="masked patch fraction")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, masks, order, crops")
    parser.add_argument("--limit-train", type=int, default=0, help="use the first N images")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    parser.add_argument(
        "--benchmark-steps",
        type=int,
        default=0,
        help="only time this many steps (after 3 warm-up steps), print images/s, save nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        images, _ = load_idx_split(args.idx_dir, "train")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit_train:
        images = images[: args.limit_train]
    data = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255)  # (N, 1, 28, 28)

    encoder = create_encoder()
    decoder = MaeDecoder(encoder.embed_dim, GRID * GRID, PATCH_SIZE**2 * 3)
    for module in (encoder, decoder):
        init_like_mae(module)
    # Tokens as in MAE: normal(0.02); position embeddings stay the fixed sin-cos.
    nn.init.normal_(encoder.cls_token, std=0.02)
    nn.init.normal_(decoder.mask_token, std=0.02)
    encoder.train()
    decoder.train()

    steps_per_epoch = len(data) // args.batch_size  # drop the last partial batch
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    peak_lr = args.blr * args.batch_size / 256 * args.lr_boost
    optimizer = torch.optim.AdamW(
        param_groups([encoder, decoder], args.weight_decay), lr=peak_lr, betas=(0.9, 0.95)
    )
    generator = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in encoder.parameters())
    print(
        f"encoder {n_params / 1e6:.2f}M params, decoder "
        f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M; {len(data)} images, "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, peak lr {peak_lr:.2e}, "
        f"warm-up {warmup_steps} steps, {args.threads} thread(s)",
        flush=True,
    )

    def train_step(step: int, batch: torch.Tensor) -> float:
        # schedule
        lr = learning_rate(step, total_steps, warmup_steps, peak_lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # forward
        imgs = to_model_input(augment(batch, generator))
        latent, mask, restore = encode_visible(encoder, imgs, args.mask_ratio, generator)
        loss = mae_loss(decoder(latent, restore), imgs, mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr-boost")
        # backward/step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    if args.benchmark_steps:
        for step in range(3 + args.benchmark_steps):
            if step == 3:
                start = time.perf_counter()
            idx = torch.randint(len(data), (args.batch_size,), generator=generator)
            train_step(step, data[idx])
        rate = args.benchmark_steps * args.batch_size / (time.perf_counter() - start)
        print(
            f"benchmark: {rate:.0f} images/s with {args.threads} thread(s); one epoch of "
            f"{steps_per_epoch * args.batch_size} images ~ "
            f"{steps_per_epoch * args.batch_size / rate / 60:.1f} min",
            flush=True,
        )
        return 0

    history: list[dict] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(data), generator=generator)
        epoch_start, loss_sum = time.perf_counter(), 0.0
        for i in range(steps_per_epoch):
            batch = data[order[i * args.batch_size : (i + 1) * args.batch_size]]
            loss = train_step(step, batch)
            loss_sum += loss
            step += 1
            if args.log_every and (i + 1) % args.log_every == 0:
                print(
                    f"  epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {loss:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.2e}",
                    flush=True,
                )
        # log
        seconds = time.perf_counter() - epoch_start
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / steps_per_epoch,
            "images_per_s": steps_per_epoch * args.batch_size / seconds,
            "elapsed_s": time.perf_counter() - start,
        }
        history.append(record)
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {record['loss']:.4f} "
            f"{record['images_per_s']:.0f} img/s elapsed {record['elapsed_s'] / 60:.1f} min",
            flush=True,
        )
    wall = time.perf_counter() - start

    training = {
        "script": "examples/pretrain_tiny_mae.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "encoder": {
            "timm_name": "vit_base_patch16_224",
            **ENCODER_ARGS,
            "pos_embed": "fixed 2-D sin-cos, zero CLS slot, frozen",
            "layer_norm_eps": LN_EPS,
        },
        "decoder": {
            "embed_dim": DECODER_DIM,
            "depth": DECODER_DEPTH,
            "num_heads": DECODER_HEADS,
            "mlp_ratio": 4.0,
            "qkv_bias": True,
            "layer_norm_eps": LN_EPS,
        },
        "data": {
            "dataset": "Fashion-MNIST train",
            "images": len(data),
            "mean": FMNIST_MEAN,
            "std": FMNIST_STD,
            "channels": "grey replicated to 3",
            "augment": "random resized crop scale (0.6, 1), ratio (3/4, 4/3), to 28; hflip",
        },
        "optimizer": {
            "name": "AdamW",
            "betas": [0.9, 0.95],
            "peak_lr": peak_lr,
            "min_lr": args.min_lr,
            "warmup_steps": warmup_steps,
            "weight_decay": args.weight_decay,
            "schedule": "linear warm-up, cosine",
            "no_weight_decay": "biases, norms, cls_token, mask_token",
        },
        "loss": "MSE on masked patches, per-patch normalised pixel targets (norm_pix_loss)",
        "epochs": args.epochs,
        "steps": total_steps,
        "seed": args.seed,
        "threads": args.threads,
        "final_loss": history[-1]["loss"] if history else None,
        "first_epoch_loss": history[0]["loss"] if history else None,
        "wall_time_s": wall,
        "images_per_s": total_steps * args.batch_size / wall if wall > 0 else None,
        "history": history,
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
    }
    probe = to_model_input(data[:16])
    save_outputs(encoder, decoder, args.out, training, probe)
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB) in {wall / 60:.1f} min of training", flush=True)
    return 0 if verify(encoder, decoder, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
