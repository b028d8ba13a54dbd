"""Multi-crop views made on the training device (``--augment-on device``): DataLoader workers only
decode each image into a fixed-size uint8 canvas; crops, flips and the BYOL photometric
augmentations of :mod:`mimcli.views` then run as batched tensor ops with per-image parameters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from mimcli.views import ViewConfig

# torchvision's defaults behind views.MultiCropTransform: RandomResizedCrop's aspect ratios,
# ColorJitter(0.4, 0.4, 0.2, 0.1) ranges (brightness, contrast, saturation, hue), GaussianBlur's
# sigma range, RandomSolarize(128) on uint8 pixels.
RATIO = (3 / 4, 4 / 3)
JITTER = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
FLIP_P, JITTER_P, GRAY_P = 0.5, 0.8, 0.2
SIGMA = (0.1, 2.0)
SOLARIZE_AT = 128 / 255
# (blur p, solarize p) of global view 0, global view 1 and the local views, as in views.py
GLOBAL0, GLOBAL1, LOCAL = (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)
TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
# Columns of one view's uniform draws (a fixed layout, so every parameter of an image depends on
# its seed only): crop areas, log ratios, top, left, flip, jitter, 4 factors, 4 order keys,
# grayscale, blur, sigma, solarize.
_AREA, _RATIO, _TOP = 0, TRIES, 2 * TRIES
_LEFT, _FLIP, _JITTER, _FACTORS, _ORDER = _TOP + 1, _TOP + 2, _TOP + 3, _TOP + 4, _TOP + 8
_GRAY, _BLUR, _SIGMA, _SOLARIZE, _DRAWS = _TOP + 12, _TOP + 13, _TOP + 14, _TOP + 15, _TOP + 16


def canvas_side(cfg: ViewConfig) -> int:
    """``L``: workers shrink an image (never enlarge it) until it fits an ``L × L`` canvas.

    ``L = S·4/3``, with ``S`` the smallest shorter side at which the smallest crop of either kind
    still has as many source pixels as output pixels: a crop of area fraction ``a`` of a square
    image has side ``sqrt(a)·S``, so ``S = max(global / sqrt(global_scale[0]),
    local / sqrt(local_scale[0]))``: 448 for the paper's 224 px from 25–100% (locals: 96 px from
    5%, 430). A 4:3 image (ImageNet's usual 500 × 375 and wider photos) thus keeps a shorter side
    of ``S``; smaller would enlarge the small crops from fewer pixels (lost resolution). Images
    that already fit are kept as they are (the canvas costs the same): ImageNet's usual files,
    at most 500 px a side, are not resized. At 224 px: 598 × 598 × 3 bytes = 1.07 MB per image,
    275 MB per batch of 256 (uint8; the device side's float32 copy is 4×).
    """
    short = cfg.global_size / math.sqrt(cfg.global_scale[0])
    if cfg.local_crops:
        short = max(short, cfg.local_size / math.sqrt(cfg.local_scale[0]))
    return math.ceil(math.ceil(short - 1e-9) * RATIO[1] - 1e-9)


class CanvasDecoder:
    """Worker side: an image file -> ``(canvas, valid)``; picklable, for DataLoader workers.

    The image is decoded, converted to RGB if it is not, shrunk (bicubic, aspect ratio kept,
    never enlarged) until its longer side is at most ``L`` (:func:`canvas_side`), and pasted at
    the top-left corner of a zero ``L × L`` canvas. A JPEG at least twice the target size is
    decoded at 1/2, 1/4 or 1/8 scale in the DCT domain first (PIL's ``Image.draft``, several
    times faster; ``draft=False`` turns it off).

    Returns:
        canvas: ``(3, L, L)`` uint8.
        valid: ``(2,)`` int64, the image's ``(h, w)`` in the canvas.
    """

    decodes = True  # give it images opened, not decoded (data.ImageDataset, views.StreamSample)

    def __init__(self, cfg: ViewConfig, draft: bool = True) -> None:
        self.side = canvas_side(cfg)
        self.draft = draft

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` an image of ``width × height`` is shrunk to."""
        scale = min(1.0, self.side / max(width, height))
        w = min(self.side, max(1, round(width * scale)))
        return w, min(self.side, max(1, round(height * scale)))

    def __call__(self, source: str | os.PathLike[str] | Image.Image) -> tuple[Tensor, Tensor]:
        if isinstance(source, Image.Image):
            return self.fit(source)
        with Image.open(source) as img:
            return self.fit(img)

    def fit(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        """Shrink and pad an opened image (``draft`` only helps while it is not loaded yet)."""
        size = self.target_size(*img.size)
        if self.draft and size != img.size:
            img.draft("RGB", size)  # no-op unless a JPEG that is still >= size at a DCT scale
        img.load()
        if img.mode != "RGB":  # convert() copies even an RGB image (~8 ms at 1600 x 1067)
            img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        w, h = size
        canvas = torch.zeros(3, self.side, self.side, dtype=torch.uint8)
        planes = canvas.numpy()
        for c, band in enumerate(img.split()):  # PIL's planar split beats a strided transpose
            planes[c, :h, :w] = np.asarray(band)
        return canvas, torch.tensor([h, w])


@dataclass
class ViewParams:
    """Random parameters of one view kind (the globals or the locals) for a batch, on the CPU.

    Rows are view-major: row ``v * B + b`` is view ``v`` of that kind for batch image ``b``.
    """

    size: int  # output side in pixels
    kernel: int  # Gaussian blur kernel size (views._blur's rule)
    views: int  # V: views of this kind per image (K = V * B rows)
    image: Tensor  # (K,) int64 batch position
    box: Tensor  # (K, 4) float32 left, top, right, bottom in canvas pixels (integers)
    flip: Tensor  # (K,) bool
    jitter: Tensor  # (K,) bool
    factors: Tensor  # (K, 4) float32 brightness, contrast, saturation, hue shift
    order: Tensor  # (K, 4) int64: jitter op of each step (0 brightness ... 3 hue)
    gray: Tensor  # (K,) bool
    blur: Tensor  # (K,) bool
    sigma: Tensor  # (K,) float32
    solarize: Tensor  # (K,) bool


def sample_seed(seed: int, index: int, epoch_key: int) -> int:
    """The per-image seed, as ``views.MultiCropDataset`` derives it."""
    return hash((seed, epoch_key, index)) % (2**31)


def crop_boxes(u: Tensor, height: Tensor, width: Tensor, scale: tuple[float, float]) -> Tensor:
    """torchvision's RandomResizedCrop box sampling, vectorised over rows.

    Args:
        u: ``(K, 22)`` uniform draws: 10 area fractions, 10 log ratios, top, left.
        height, width: ``(K,)`` image sizes.
        scale: area fraction range.

    Returns:
        ``(K, 4)`` float64 integer boxes ``left, top, right, bottom``.
    """
    height, width = height.double(), width.double()
    target = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA:_RATIO])
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, _RATIO:_TOP])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    # fallback: the whole image, trimmed to the ratio range, centred
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > RATIO[1], torch.round(height * RATIO[1]), width)
    fallback_h = torch.where(in_ratio < RATIO[0], torch.round(width / RATIO[0]), height)
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    top = torch.where(found, torch.floor(u[:, _TOP] * (height - h + 1)), (height - h) // 2)
    left = torch.where(found, torch.floor(u[:, _LEFT] * (width - w + 1)), (width - w) // 2)
    return torch.stack([left, top, left + w, top + h], 1)


def _kind_params(
    u: Tensor,
    valid: Tensor,
    size: int,
    scale: tuple[float, float],
    probs: Sequence[tuple[float, float]],
    photometric: bool,
) -> ViewParams:
    """``u``: ``(V, B, _DRAWS)`` draws of this kind's V views; ``probs``: (blur, solarize) p per
    view."""
    views, batch = u.shape[:2]
    u = u.reshape(views * batch, _DRAWS)
    height, width = valid[:, 0].repeat(views), valid[:, 1].repeat(views)
    per_view = torch.tensor(probs, dtype=u.dtype).repeat_interleave(batch, 0)  # (K, 2)
    lows = torch.tensor([r[0] for r in JITTER], dtype=u.dtype)
    spans = torch.tensor([r[1] - r[0] for r in JITTER], dtype=u.dtype)
    return ViewParams(
        size=size,
        kernel=max(3, int(size * 0.1) // 2 * 2 + 1),
        views=views,
        image=torch.arange(batch).repeat(views),
        box=crop_boxes(u, height, width, scale).float(),
        flip=u[:, _FLIP] < FLIP_P,
        jitter=(u[:, _JITTER] < JITTER_P) & photometric,
        factors=(lows + spans * u[:, _FACTORS:_ORDER]).float(),
        order=torch.argsort(u[:, _ORDER:_GRAY], dim=1),  # a uniform random permutation
        gray=(u[:, _GRAY] < GRAY_P) & photometric,
        blur=(u[:, _BLUR] < per_view[:, 0]) & photometric,
        sigma=(SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u[:, _SIGMA]).float(),
        solarize=(u[:, _SOLARIZE] < per_view[:, 1]) & photometric,
    )


def sample_params(
    cfg: ViewConfig, seed: int, keys: Sequence[tuple[int, int]], valid: Tensor
) -> list[ViewParams]:
    """Every random parameter of a batch's views, drawn on the CPU from one generator per image.

    Args:
        cfg: the views to make.
        seed: the run's seed.
        keys: ``(dataset_index, epoch_key)`` per batch image (what ``views.KeyedDataset`` gets).
        valid: ``(B, 2)`` int64 ``(h, w)`` of each image in its canvas (CPU).

    Returns:
        ``[globals]`` or ``[globals, locals]``: each image's parameters depend on its key only,
        not on the batch it is in.
    """
    valid = valid.cpu().long()
    draws = []
    for index, epoch_key in keys:
        gen = torch.Generator().manual_seed(sample_seed(seed, int(index), int(epoch_key)))
        draws.append(torch.rand(cfg.num_views, _DRAWS, generator=gen, dtype=torch.float64))
    u = torch.stack(draws, 1) if draws else torch.empty(cfg.num_views, 0, _DRAWS).double()
    kinds = [
        _kind_params(
            u[:2], valid, cfg.global_size, cfg.global_scale, [GLOBAL0, GLOBAL1], cfg.photometric
        )
    ]
    if cfg.local_crops:
        probs = [LOCAL] * cfg.local_crops
        kinds.append(
            _kind_params(u[2:], valid, cfg.local_size, cfg.local_scale, probs, cfg.photometric)
        )
    return kinds


# --- batched ops on (n, 3, h, w) float images in [0, 1]; factors (n,) ---------------------------


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, as torchvision's ``rgb_to_grayscale``: ``(n, 1, h, w)``."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, 0.0, factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` turns (HSV), keeping saturation and value."""
    r, g, b = x.unbind(1)
    value, low = x.amax(1), x.amin(1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, 1.0)
    sixths = torch.where(  # hue in sixths of a turn, from whichever channel is the largest
        value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe)
    )
    hue6 = ((sixths / 6 + shift[:, None, None]) % 1.0) * 6
    # HSV -> RGB: channel n (5 red, 3 green, 1 blue) = value - chroma * clamp(min(k, 4 - k), 0, 1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (hue6 + n) % 6
        out.append(value - chroma * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Per-image Gaussian blur (reflect padding, as torchvision's) by grouped separable conv."""
    n, c, h, w = x.shape
    half = (kernel - 1) / 2
    t = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, k)
    y = F.pad(x.reshape(1, n * c, h, w), [kernel // 2] * 4, mode="reflect")
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)
    y = F.conv2d(y, weights[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def solarize(x: Tensor, mask: Tensor) -> Tensor:
    """Invert pixels at or above 128/255 in the images where ``mask`` is set."""
    return torch.where(mask[:, None, None, None] & (x >= SOLARIZE_AT), 1 - x, x)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass
class _DeviceRows:
    """One kind's parameters on the device; row groups are index tensors whose lengths the host
    knows, so applying them never waits for the device."""

    boxes: Tensor  # (K, 5): image, left, top, right, bottom
    flip: Tensor  # (K,) bool
    gray: Tensor
    solarize: Tensor
    factors: Tensor  # (K, 4)
    sigma: Tensor  # (K,)
    steps: list[list[Tensor]]  # steps[t][op]: rows applying jitter op ``op`` at step t
    blurred: Tensor  # rows to blur


def _upload(p: ViewParams, device: torch.device) -> _DeviceRows:
    masks = torch.stack([p.flip, p.gray, p.solarize], 1).float()
    floats = torch.cat([p.image[:, None].float(), p.box, masks, p.factors, p.sigma[:, None]], 1)
    groups = [
        torch.nonzero(p.jitter & (p.order[:, t] == op))[:, 0] for t in range(4) for op in range(4)
    ]
    groups.append(torch.nonzero(p.blur)[:, 0])
    rows = torch.cat(groups)
    if device.type == "cuda":  # pinned, so the copies are truly asynchronous
        floats, rows = floats.pin_memory(), rows.pin_memory()
    floats = floats.to(device, non_blocking=True)
    rows = rows.to(device, non_blocking=True)
    parts = list(rows.split([len(g) for g in groups]))
    return _DeviceRows(
        boxes=floats[:, :5],
        flip=floats[:, 5] > 0,
        gray=floats[:, 6] > 0,
        solarize=floats[:, 7] > 0,
        factors=floats[:, 8:12],
        sigma=floats[:, 12],
        steps=[parts[t * 4 : t * 4 + 4] for t in range(4)],
        blurred=parts[16],
    )


def _replicate_edges(canvas: Tensor, valid: Tensor) -> None:
    """Copy each image's last column and row into the padding next to it, in place: bilinear
    samples near the image's edge then read the edge pixel instead of padding."""
    side_h, side_w = canvas.shape[-2:]
    h, w = valid[:, 0], valid[:, 1]
    batch = torch.arange(canvas.shape[0], device=canvas.device)
    col, row = w.clamp(max=side_w - 1), h.clamp(max=side_h - 1)
    canvas[batch, :, :, col] = canvas[batch, :, :, torch.where(w < side_w, w - 1, col)]
    canvas[batch, :, row, :] = canvas[batch, :, torch.where(h < side_h, h - 1, row), :]


class DeviceMultiCrop:
    """Device side: a batch of canvases -> the views of ``views.MultiCropTransform``.

    Same parameter distributions as the CPU path (RandomResizedCrop's box sampling relative to
    each image's valid box, flip, colour jitter in a random order per view, grayscale, blur,
    solarize), drawn per image by :func:`sample_params`. Crops are resized by ``roi_align``
    (bilinear samples averaged over each output pixel's footprint, an area filter when
    shrinking) whatever ``cfg.interpolation`` says; everything runs in float32, also under
    autocast. The host uploads the parameters (asynchronously from pinned memory on CUDA) and
    never waits for the device.
    """

    def __init__(self, cfg: ViewConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed

    def sample(self, keys: Sequence[tuple[int, int]], valid: Tensor) -> list[ViewParams]:
        return sample_params(self.cfg, self.seed, keys, valid)

    def __call__(
        self, images: Tensor, valid: Tensor, keys: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """Args:
            images: ``(B, 3, L, L)`` uint8 canvases on the training device.
            valid: ``(B, 2)`` int64 ``(h, w)`` per canvas, on the CPU (as the loader gives it).
            keys: ``(dataset_index, epoch_key)`` per image.

        Returns:
            ``[global0, global1, local0, ...]``, each ``(B, 3, size, size)`` float32, normalised.
        """
        return self.render(images, valid, self.sample(keys, valid))

    def render(self, images: Tensor, valid: Tensor, params: Sequence[ViewParams]) -> list[Tensor]:
        """The views for given parameters (see :meth:`__call__`)."""
        device = images.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            edges = valid.long()
            if device.type == "cuda":
                edges = edges.pin_memory()
            canvas = images.float()
            _replicate_edges(canvas, edges.to(device, non_blocking=True))
            views: list[Tensor] = []
            for p in params:
                x = self._render_kind(canvas, _upload(p, device), p.size, p.kernel)
                views.extend(x.unflatten(0, (p.views, images.shape[0])).unbind(0))
            return views

    def _render_kind(self, canvas: Tensor, rows: _DeviceRows, size: int, kernel: int) -> Tensor:
        # crop + resize: one roi_align for all views of this kind; canvases hold 0..255
        x = roi_align(canvas, rows.boxes, (size, size), sampling_ratio=-1, aligned=True) / 255
        x = torch.where(rows.flip[:, None, None, None], x.flip(-1), x)
        # colour jitter: each row applies its four ops in its own order
        for ops in rows.steps:
            for op, idx in enumerate(ops):
                if len(idx):
                    factor = rows.factors.index_select(0, idx)[:, op]
                    x.index_copy_(0, idx, JITTER_OPS[op](x.index_select(0, idx), factor))
        x = torch.where(rows.gray[:, None, None, None], grayscale(x).expand_as(x), x)
        if len(rows.blurred):
            sigma = rows.sigma.index_select(0, rows.blurred)
            blurred = gaussian_blur(x.index_select(0, rows.blurred), sigma, kernel)
            x.index_copy_(0, rows.blurred, blurred)
        x = solarize(x, rows.solarize)
        for c, (mean, std) in enumerate(zip(self.cfg.mean, self.cfg.std, strict=True)):
            x[:, c].sub_(mean).div_(std)
        return x
