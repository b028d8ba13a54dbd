"""The MAE decoder (He et al., 2022, arXiv 2111.06377) under the official ``_full`` checkpoint key
names, for MR-MAE's reconstruction loss: built from a state dict's shapes or fresh for an encoder,
plus ``patchify`` and the norm-pixel reconstruction loss.

Keys (METHOD §1.6): ``decoder_embed.*`` (D -> Dd), ``mask_token`` (1, 1, Dd), ``decoder_pos_embed``
(1, 1 + N, Dd; fixed 2-D sin-cos with a zero CLS slot, not trained), ``decoder_blocks.{i}.*``
(timm ``Block``), ``decoder_norm.*``, ``decoder_pred.*`` (Dd -> p * p * 3).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimcli.errors import MimcliError
from mimcli.models.build import count_blocks, guess_num_heads
from mimcli.models.checkpoints import read_checkpoint, tensors_only
from mimcli.models.converters import split_decoder, strip_prefixes

LAYER_NORM_EPS = 1e-6  # MAE's LayerNorm(eps=1e-6)
OFFICIAL_WIDTH, OFFICIAL_DEPTH, OFFICIAL_HEADS = 512, 8, 16  # every released MAE decoder
REQUIRED_KEYS = (
    "decoder_embed.weight",
    "mask_token",
    "decoder_pos_embed",
    "decoder_norm.weight",
    "decoder_pred.weight",
)


@dataclass
class DecoderSpec:
    """Everything that fixes a decoder's shapes (recorded in ``config.json``).

    Attributes:
        encoder_dim: width D of the encoder tokens it reads.
        width: decoder width Dd.
        depth: number of decoder blocks.
        num_heads: attention heads per block (not recoverable from weights; metadata or a guess).
        num_patches: N, the patches of the image it reconstructs.
        patch_size: p; it predicts ``p * p * 3`` values per patch.
        mlp_ratio / qkv_bias / layer_norm_eps: block details.
        norm_pix_loss: whether it was trained on per-patch normalised pixels.
    """

    encoder_dim: int
    width: int
    depth: int
    num_heads: int
    num_patches: int
    patch_size: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = LAYER_NORM_EPS
    norm_pix_loss: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sincos_table(dim: int, grid: tuple[int, int], cls_slot: bool = True) -> Tensor:
    """MAE's fixed 2-D sin-cos position table.

    The first half of the channels encodes the column, the second half the row, each as
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``.

    Args:
        dim: channels, divisible by 4.
        grid: (rows, cols).
        cls_slot: prepend an all-zero row for the CLS token.

    Returns:
        ``(1, rows * cols (+ 1), dim)`` float32.
    """
    if dim % 4:
        raise ValueError(f"a sin-cos table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )
    halves = []
    for pos in (cols, rows):
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        halves.append(torch.cat([angles.sin(), angles.cos()], dim=1))
    table = torch.cat(halves, dim=1)
    if cls_slot:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


class MaeDecoder(nn.Module):
    """The MAE decoder; attribute names are the official ``_full`` checkpoint keys."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        side = math.isqrt(spec.num_patches)
        grid = (side, side) if side * side == spec.num_patches else (1, spec.num_patches)
        norm = partial(nn.LayerNorm, eps=spec.layer_norm_eps)
        self.decoder_embed = nn.Linear(spec.encoder_dim, spec.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.decoder_pos_embed = nn.Parameter(
            sincos_table(spec.width, grid, cls_slot=True), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(
                spec.width,
                spec.num_heads,
                mlp_ratio=spec.mlp_ratio,
                qkv_bias=spec.qkv_bias,
                norm_layer=norm,
            )
            for _ in range(spec.depth)
        )
        self.decoder_norm = norm(spec.width)
        self.decoder_pred = nn.Linear(spec.width, spec.patch_size**2 * 3)

    def initialise(self, generator: torch.Generator | None = None) -> MaeDecoder:
        """MAE's initialisation: xavier-uniform linears with zero biases, unit LayerNorms, the
        mask token from normal(0, 0.02); the position table stays the fixed sin-cos."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                    m.weight.uniform_(-bound, bound, generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            self.mask_token.normal_(0.0, 0.02, generator=generator)
        return self

    def forward(self, latent: Tensor, keep: Tensor) -> Tensor:
        """Pixel predictions for every patch.

        Args:
            latent: ``(B, 1 + K, D)`` encoder output: the CLS token, then the K visible patches.
            keep: ``(B, K)`` int64 patch positions of the visible tokens, in ``latent``'s order.

        Returns:
            ``(B, N, p * p * 3)`` predictions (in the target space the decoder was trained on).
        """
        x = self.decoder_embed(latent)
        b, k = keep.shape
        if x.shape[1] != 1 + k:
            raise ValueError(f"latent has {x.shape[1]} tokens, expected 1 + {k}")
        n = self.decoder_pos_embed.shape[1] - 1
        patches = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        index = keep.to(x.device)[..., None].expand(-1, -1, x.shape[-1])
        patches = patches.scatter(1, index, x[:, 1:])
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


# --- sizes -----------------------------------------------------------------------------------


def fresh_spec(encoder_dim: int, grid: tuple[int, int], patch_size: int) -> DecoderSpec:
    """Sizes of a decoder trained from scratch for an encoder of width ``encoder_dim``.

    ViT-B and wider: MAE's released decoder, 512 wide, 8 blocks, 16 heads. ViT-S (384-767):
    256 wide, 4 blocks, 8 heads (unverified). Narrower: half the encoder width (a multiple of 16,
    at least 32), 2 blocks, 16-dim heads: the shape of the shipped fmnist-mae-tiny decoder
    (128 -> 64 wide, 2 blocks, 4 heads).
    """
    if encoder_dim >= 768:
        width, depth, heads = OFFICIAL_WIDTH, OFFICIAL_DEPTH, OFFICIAL_HEADS
    elif encoder_dim >= 384:
        width, depth, heads = 256, 4, 8
    else:
        width = max(32, encoder_dim // 2 // 16 * 16)
        depth, heads = 2, width // 16
    return DecoderSpec(
        encoder_dim=encoder_dim,
        width=width,
        depth=depth,
        num_heads=heads,
        num_patches=grid[0] * grid[1],
        patch_size=patch_size,
    )


def _guess_decoder_heads(width: int) -> int:
    """MAE's decoders use 32-dim heads (512 wide, 16 heads)."""
    return width // 32 if width % 32 == 0 else guess_num_heads(width)


def spec_from_state_dict(
    state: dict[str, Tensor], metadata: dict[str, str] | None, source: str
) -> DecoderSpec:
    """Read the decoder's shapes off its weights; heads, LayerNorm eps and the target kind come
    from safetensors metadata (``decoder_num_heads``, ``layer_norm_eps``, ``norm_pix_loss``,
    ``patch_size``) when present, else 32-dim heads, eps 1e-6 and norm-pixel targets (the
    official ``_full`` checkpoints)."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise MimcliError(
            f"{source}: not an MAE decoder (missing {', '.join(missing)}); expected the official "
            "_full names decoder_embed.*, mask_token, decoder_pos_embed, decoder_blocks.<i>.*, "
            "decoder_norm.*, decoder_pred.*"
        )
    meta = metadata or {}
    width, encoder_dim = (int(s) for s in state["decoder_embed.weight"].shape)
    depth = count_blocks(state, "decoder_blocks.")
    fc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / width if fc1 is not None else 4.0
    pixels = int(state["decoder_pred.weight"].shape[0])
    patch = int(meta["patch_size"]) if "patch_size" in meta else math.isqrt(pixels // 3)
    if patch * patch * 3 != pixels:
        raise MimcliError(
            f"{source}: decoder_pred predicts {pixels} values per patch, not 3 * {patch}^2"
        )
    try:
        heads = int(meta.get("decoder_num_heads", 0)) or _guess_decoder_heads(width)
        if "decoder_num_heads" not in meta:
            warnings.warn(
                f"the decoder's attention head count is not recorded in its file; guessed "
                f"{heads} for width {width} (a wrong guess raises the reconstruction loss; "
                "write decoder_num_heads into the safetensors metadata)",
                stacklevel=2,
            )
        eps = float(meta.get("layer_norm_eps", LAYER_NORM_EPS))
    except ValueError as exc:
        raise MimcliError(f"{source}: unreadable decoder metadata ({exc})") from None
    return DecoderSpec(
        encoder_dim=encoder_dim,
        width=width,
        depth=depth,
        num_heads=heads,
        num_patches=int(state["decoder_pos_embed"].shape[1]) - 1,
        patch_size=patch,
        mlp_ratio=mlp_ratio,
        qkv_bias="decoder_blocks.0.attn.qkv.bias" in state,
        layer_norm_eps=eps,
        norm_pix_loss=meta.get("norm_pix_loss", "true").lower() != "false",
    )


def load_decoder(
    state: dict[str, Tensor], metadata: dict[str, str] | None, source: str
) -> MaeDecoder:
    """A decoder built from ``state``'s shapes and loaded strictly.

    Raises:
        MimcliError: naming missing, unexpected or mis-shaped keys.
    """
    decoder = MaeDecoder(spec_from_state_dict(state, metadata, source))
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}")
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes[:3])}")
    if problems:
        raise MimcliError(
            f"{source}: decoder weights do not fit an MAE decoder: " + "; ".join(problems)
        )
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return decoder


def read_decoder_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """Decoder weights (and safetensors metadata) from a ``decoder.safetensors`` or an MAE
    ``_full`` ``.pth`` (its ``model`` entry; encoder keys are dropped); a folder stands for the
    ``decoder.safetensors`` in it."""
    if path.is_dir():
        if not (path / "decoder.safetensors").is_file():
            raise MimcliError(
                f"--decoder {path}: the folder holds no decoder.safetensors; pass the file, a "
                "folder holding one, or an MAE _full .pth checkpoint"
            )
        path = path / "decoder.safetensors"
    if not path.is_file():
        raise MimcliError(
            f"--decoder {path}: no such file; pass a decoder.safetensors, a folder holding one, "
            "or an MAE _full .pth checkpoint"
        )
    try:
        top = read_checkpoint(path)
    except MimcliError as exc:
        raise MimcliError(f"--decoder {path}: {exc}") from None
    metadata = None
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
    inner = top.get("model") if isinstance(top.get("model"), dict) else top
    _, decoder = split_decoder(strip_prefixes(tensors_only(inner)))
    if decoder is None:
        raise MimcliError(
            f"--decoder {path}: no MAE decoder weights in it (no decoder_* or mask_token keys); "
            "pass a decoder.safetensors or an MAE _full .pth checkpoint"
        )
    return decoder, metadata


def check_decoder_fits(
    spec: DecoderSpec, encoder_dim: int, grid: tuple[int, int], patch_size: int, origin: str
) -> None:
    """One-line error when the decoder cannot read this encoder or rebuild this view size."""
    n = grid[0] * grid[1]
    if spec.encoder_dim != encoder_dim:
        raise MimcliError(
            f"decoder ({origin}) reads {spec.encoder_dim}-wide tokens but the encoder is "
            f"{encoder_dim} wide; pass a matching --decoder or --no-reconstruction"
        )
    if spec.num_patches != n or spec.patch_size != patch_size:
        raise MimcliError(
            f"decoder ({origin}) rebuilds {spec.num_patches} patches of {spec.patch_size} px but "
            f"the student makes {grid[0]}x{grid[1]} = {n} patches of {patch_size} px at the "
            "training view size; pass a matching --decoder or --no-reconstruction"
        )


# --- targets and loss ------------------------------------------------------------------------


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p * p * C)``, patches row-major, pixels ordered (row, col,
    channel) as in MAE."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a whole number of {p}-px patches")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p * p * C)`` -> ``(B, C, H, W)``."""
    b, _, d = patches.shape
    p = patch_size
    c = d // (p * p)
    x = patches.reshape(b, grid[0], grid[1], p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, grid[0] * p, grid[1] * p)


def pixel_targets(images: Tensor, patch_size: int, norm_pix: bool = True) -> Tensor:
    """``(B, N, p * p * 3)`` targets: patch pixels, each patch normalised by its own mean and
    (unbiased) variance + 1e-6 when ``norm_pix`` (MAE's ``norm_pix_loss``)."""
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def reconstruction_loss(
    pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = True
) -> Tensor:
    """MAE's loss: per-patch mean squared error, averaged over the masked patches only.

    Args:
        pred: ``(B, N, p * p * 3)`` decoder output.
        images: ``(B, 3, H, W)`` the (normalised) images the encoder saw.
        mask: ``(B, N)`` bool, True = masked (hidden from the encoder).
        patch_size: p.
        norm_pix: per-patch normalised targets.

    Returns:
        Scalar float32 loss.
    """
    target = pixel_targets(images, patch_size, norm_pix)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    weights = mask.to(per_patch.device, per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)
