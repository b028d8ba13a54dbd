"""Device-side multi-crop views (mimcli.augment) against the CPU path (mimcli.views) and
torchvision's functional ops applied image by image."""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from mimcli import augment
from mimcli.augment import (
    JITTER,
    CanvasDecoder,
    DeviceMultiCrop,
    ViewParams,
    canvas_side,
    sample_params,
)
from mimcli.views import MultiCropTransform, ViewConfig, default_view_config

PAPER = default_view_config({}, 16)  # 2 x 224 + 10 x 96
SMALL = ViewConfig(global_size=64, local_size=32, local_crops=4)  # canvas 192 x 192: fast


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small images: one torch thread is fastest, and on shared cores a second one waits for
    its peer (10x slower here while another job ran)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]  # 640 x 427 each


def canvases(cfg: ViewConfig, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    decoded = [CanvasDecoder(cfg)(img) for img in images]
    return torch.stack([c for c, _ in decoded]), torch.stack([v for _, v in decoded])


def unnormalise(x: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean)[:, None, None]
    return x * torch.tensor(cfg.std)[:, None, None] + mean


def kind_views(views: list[torch.Tensor], kind: int) -> torch.Tensor:
    """All views of one kind, rows view-major as in ViewParams."""
    return torch.cat(views[:2] if kind == 0 else views[2:])


def without_photometric(params: list[ViewParams]) -> list[ViewParams]:
    plain = copy.deepcopy(params)
    for p in plain:
        for mask in (p.jitter, p.gray, p.blur, p.solarize):
            mask.zero_()
    return plain


# --- worker side ------------------------------------------------------------------------------


def test_canvas_side_rule():
    assert canvas_side(PAPER) == 598  # 224 / sqrt(0.25) = 448, * 4 / 3
    assert canvas_side(default_view_config({}, 14)) == 598  # 98 / sqrt(0.05) = 438.3 < 448
    assert canvas_side(SMALL) == 192  # the locals decide: 32 / sqrt(0.05) = 143.1 -> 144
    assert canvas_side(ViewConfig(64, 32, local_crops=0)) == 171  # 128 * 4 / 3


@pytest.mark.parametrize(
    "size, fitted",
    [
        ((300, 200), (300, 200)),  # small: never enlarged
        ((500, 500), (500, 500)),  # fits the canvas: kept as it is
        ((1000, 800), (598, 478)),  # longer side to L
        ((640, 427), (598, 399)),
        ((2000, 600), (598, 179)),
        ((600, 2000), (179, 598)),
    ],
)
def test_worker_keeps_aspect_and_pads(size, fitted):
    w, h = size
    ramp = np.add.outer(np.arange(h) * 3 % 251, np.arange(w) * 7 % 253).astype(np.uint8)
    img = Image.fromarray(np.stack([ramp, ramp // 2, 255 - ramp], -1))
    canvas, valid = CanvasDecoder(PAPER, draft=False)(img)
    assert canvas.shape == (3, 598, 598) and canvas.dtype == torch.uint8
    assert valid.tolist() == [fitted[1], fitted[0]]
    expected = np.asarray(img if fitted == size else img.resize(fitted, Image.Resampling.BICUBIC))
    assert torch.equal(
        canvas[:, : fitted[1], : fitted[0]], torch.from_numpy(expected.copy()).permute(2, 0, 1)
    )
    padding = canvas.clone()
    padding[:, : fitted[1], : fitted[0]] = 0
    assert padding.abs().sum() == 0


def test_worker_target_sizes_keep_the_ratio():
    decoder = CanvasDecoder(PAPER)
    rng = np.random.default_rng(0)
    for width, height in rng.integers(20, 5000, size=(300, 2)).tolist():
        w, h = decoder.target_size(width, height)
        assert abs(w * height - h * width) <= 0.5 * (width + height)  # rounding of each side
        assert max(w, h) <= 598
        assert (w, h) == (width, height) or max(w, h) == 598  # kept, or fitted to the canvas


def test_worker_draft_decodes_smaller_without_distortion(photos, tmp_path):
    path = tmp_path / "big.jpg"
    photos[0].resize((1600, 1068), Image.Resampling.BICUBIC).save(path, quality=90)
    with Image.open(path) as img:
        fast, valid = CanvasDecoder(PAPER)(img)
        assert img.size == (800, 534)  # decoded at 1/2 scale in the DCT domain
    with Image.open(path) as img:
        full, valid_full = CanvasDecoder(PAPER, draft=False)(img)
        assert img.size == (1600, 1068)
    assert valid.tolist() == valid_full.tolist() == [399, 598]
    h, w = valid.tolist()
    a, b = fast[:, :h, :w].float(), full[:, :h, :w].float()
    diff = (a - b).abs().mean()
    shifted = (a[:, :, 1:] - b[:, :, :-1]).abs().mean()  # what a 1-pixel misalignment costs
    assert diff < 2.5 and diff < shifted / 4, (diff, shifted)  # uint8 levels


def test_worker_reads_grayscale_files_and_pickles(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(path)
    decoder = pickle.loads(pickle.dumps(CanvasDecoder(SMALL)))
    canvas, valid = decoder(path)
    assert valid.tolist() == [48, 64]
    assert torch.equal(canvas[0], canvas[1]) and torch.equal(canvas[1], canvas[2])
    assert canvas[0, :48, :64].float().std() > 20  # the picture, not zeros


# --- parameter sampling -----------------------------------------------------------------------


def _sample(cfg: ViewConfig, n: int, hw: tuple[int, int], seed: int = 0) -> list[ViewParams]:
    return sample_params(cfg, seed, [(i, 3) for i in range(n)], torch.tensor([hw] * n))


def _area_and_ratio(boxes: torch.Tensor, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    w = (boxes[:, 2] - boxes[:, 0]).double()
    h = (boxes[:, 3] - boxes[:, 1]).double()
    return (w * h / (hw[0] * hw[1])).numpy(), torch.log(w / h).numpy()


def _torchvision_boxes(hw: tuple[int, int], scale: tuple[float, float], n: int) -> torch.Tensor:
    torch.manual_seed(0)
    img = torch.empty(3, *hw)
    out = []
    for _ in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
        out.append([j, i, j + w, i + h])
    return torch.tensor(out)


@pytest.mark.parametrize("hw", [(375, 500), (90, 600)])  # ImageNet-like; mostly fallback
def test_crop_boxes_match_torchvision(hw):
    n = 2000
    params = _sample(PAPER, n, hw)
    for p, scale in ((params[0], PAPER.global_scale), (params[1], PAPER.local_scale)):
        ours, ref = p.box[:n], _torchvision_boxes(hw, scale, n)
        assert (
            (ours[:, :2] >= 0).all() and (ours[:, 2] <= hw[1]).all() and (ours[:, 3] <= hw[0]).all()
        )
        assert (ours[:, 2] > ours[:, 0]).all() and (ours[:, 3] > ours[:, 1]).all()
        (area, ratio), (area_ref, ratio_ref) = _area_and_ratio(ours, hw), _area_and_ratio(ref, hw)
        assert stats.ks_2samp(area, area_ref).pvalue > 1e-3
        assert stats.ks_2samp(ratio, ratio_ref).pvalue > 1e-3
        # left edges relative to the room left: uniform in both
        room = (hw[1] - (ours[:, 2] - ours[:, 0])).clamp(min=1)
        room_ref = (hw[1] - (ref[:, 2] - ref[:, 0])).clamp(min=1)
        assert stats.ks_2samp(ours[:, 0] / room, ref[:, 0] / room_ref).pvalue > 1e-3
    if hw == (90, 600):  # no global try fits: torchvision's centred 4:3 fallback every time
        assert params[0].box.unique(dim=0).tolist() == [[240, 0, 360, 90]]
        tall = _sample(PAPER, 50, (600, 90))[0].box  # and 3:4 for a tall one
        assert tall.unique(dim=0).tolist() == [[0, 240, 90, 360]]
    # the test has power: a narrower area range is told apart
    other = ViewConfig(224, 96, global_scale=(0.35, 1.0))
    area_other, _ = _area_and_ratio(_sample(other, n, (375, 500))[0].box[:n], (375, 500))
    area_ref, _ = _area_and_ratio(_torchvision_boxes((375, 500), PAPER.global_scale, n), (375, 500))
    assert stats.ks_2samp(area_other, area_ref).pvalue < 1e-6


def _rate_ok(mask: torch.Tensor, p: float) -> bool:
    n = mask.numel()
    return abs(mask.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_random_rates_and_ranges_follow_the_cpu_path():
    n = 2000
    g, loc = _sample(PAPER, n, (375, 500))
    views = {"global0": slice(0, n), "global1": slice(n, 2 * n)}
    blur = {"global0": 1.0, "global1": 0.1}
    sol = {"global0": 0.0, "global1": 0.2}
    for name, rows in views.items():
        assert _rate_ok(g.flip[rows], 0.5) and _rate_ok(g.jitter[rows], 0.8)
        assert _rate_ok(g.gray[rows], 0.2)
        assert _rate_ok(g.blur[rows], blur[name]) and _rate_ok(g.solarize[rows], sol[name])
    assert _rate_ok(loc.flip, 0.5) and _rate_ok(loc.jitter, 0.8) and _rate_ok(loc.gray, 0.2)
    assert _rate_ok(loc.blur, 0.5) and _rate_ok(loc.solarize, 0.0)
    assert (g.kernel, loc.kernel) == (23, 9)  # views._blur: ~10% of the crop, odd
    for p in (g, loc):
        for col, (lo, hi) in enumerate(JITTER):
            f = p.factors[:, col].double().numpy()
            assert lo <= f.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < f.max() <= hi
            assert stats.kstest(f, "uniform", args=(lo, hi - lo)).pvalue > 1e-3
        assert stats.kstest(p.sigma.double().numpy(), "uniform", args=(0.1, 1.9)).pvalue > 1e-3
        # the jitter order: a uniform random permutation of the 4 ops
        perms = [tuple(r) for r in p.order.tolist()]
        counts = [perms.count(q) for q in itertools.permutations(range(4))]
        assert stats.chisquare(counts).pvalue > 1e-3
        # every random choice is drawn independently (no draw reused for two parameters)
        width = p.box[:, 2] - p.box[:, 0]
        area = width * (p.box[:, 3] - p.box[:, 1])
        place = p.box[:, 0] / (500 - width).clamp(min=1)  # where in the room left
        cols = [p.flip, p.jitter, p.gray, p.blur, p.sigma, *p.factors.T, area, place]
        corr = np.corrcoef(torch.stack([c.double() for c in cols]).numpy())
        off = corr[~np.eye(len(cols), dtype=bool)]
        off = off[np.isfinite(off)]
        assert np.abs(off[np.abs(off) < 0.99]).max() < 4 / math.sqrt(len(p.flip))
    # photometric off: crop and flip only
    plain = _sample(ViewConfig(224, 96, photometric=False), 500, (375, 500))
    for p in plain:
        assert not (p.jitter.any() or p.gray.any() or p.blur.any() or p.solarize.any())
        assert _rate_ok(p.flip, 0.5)


def test_parameters_depend_on_the_key_only():
    keys = [(5, 0), (9, 0), (5, 1), (5, 0)]
    valid = torch.tensor([[375, 500], [200, 300], [375, 500], [375, 500]])
    a = sample_params(PAPER, 7, keys, valid)
    alone = sample_params(PAPER, 7, [(5, 0)], valid[:1])
    for p, q in zip(a, alone, strict=True):
        rows = torch.arange(len(p.image)).view(-1, 4)  # view-major: (views, batch)
        for field in ("box", "flip", "factors", "order", "sigma", "gray", "blur", "solarize"):
            x, y = getattr(p, field), getattr(q, field)
            assert torch.equal(x[rows[:, 0]], y) and torch.equal(x[rows[:, 3]], y), field
            if field in ("box", "factors", "sigma"):  # another epoch key: other draws
                assert not torch.equal(x[rows[:, 0]], x[rows[:, 2]]), field
    other_seed = sample_params(PAPER, 8, [(5, 0)], valid[:1])
    assert not torch.equal(other_seed[0].box, alone[0].box)


# --- batched ops against torchvision, image by image --------------------------------------------


@pytest.fixture(scope="module")
def crops(photos) -> torch.Tensor:
    """Six 40 x 48 crops of the photos in [0, 1], with their uint8 quantisation (ties)."""
    out = []
    for k in range(6):
        img = TF.pil_to_tensor(photos[k % 2]).float() / 255
        out.append(img[:, 60 * k : 60 * k + 40, 90 * k : 90 * k + 48])
    return torch.stack(out)


REFERENCE = {
    "brightness": (augment.adjust_brightness, TF.adjust_brightness, 0),
    "contrast": (augment.adjust_contrast, TF.adjust_contrast, 1),
    "saturation": (augment.adjust_saturation, TF.adjust_saturation, 2),
    "hue": (augment.adjust_hue, TF.adjust_hue, 3),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_jitter_ops_match_torchvision(crops, name):
    ours, ref, col = REFERENCE[name]
    lo, hi = JITTER[col]
    factors = torch.linspace(lo, hi, len(crops))
    out = ours(crops.clone(), factors)
    expected = torch.stack([ref(x, float(f)) for x, f in zip(crops, factors, strict=True)])
    assert (out - expected).abs().max() < 2e-6
    assert (out - crops).abs().mean() > 5e-3  # the op did something


def test_grayscale_blur_solarize_match_torchvision(crops):
    gray = augment.grayscale(crops).expand_as(crops)
    assert torch.allclose(gray, TF.rgb_to_grayscale(crops, num_output_channels=3), atol=1e-7)
    sigma = torch.tensor([0.1, 0.5, 0.9, 1.3, 1.7, 2.0])
    for kernel in (9, 23):
        out = augment.gaussian_blur(crops, sigma, kernel)
        expected = torch.stack(
            [
                TF.gaussian_blur(x, [kernel] * 2, [float(s)] * 2)
                for x, s in zip(crops, sigma, strict=True)
            ]
        )
        assert (out - expected).abs().max() < 2e-6
    mask = torch.tensor([True, False] * 3)
    out = augment.solarize(crops, mask)
    for x, y, m in zip(crops, out, mask, strict=True):
        assert torch.equal(y, TF.solarize(x, 128 / 255) if m else x)


@pytest.fixture(scope="module")
def batch(photos):
    """The two photos and a 100 x 160 crop of one (enlarged when cropped), small config."""
    images = [photos[0], photos[1], photos[0].crop((300, 100, 460, 200))]
    return canvases(SMALL, images)


def test_views_layout_dtype_and_normalisation(batch):
    images, valid = batch
    views = DeviceMultiCrop(SMALL, seed=0)(images, valid, [(0, 0), (1, 0), (2, 0)])
    assert [tuple(v.shape) for v in views] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 4
    assert all(v.dtype == torch.float32 for v in views)
    pixels = torch.cat([unnormalise(v, SMALL).flatten() for v in views])
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    empty = DeviceMultiCrop(SMALL, seed=0)(images[:0], valid[:0], [])  # all images unreadable
    assert [tuple(v.shape) for v in empty] == [(0, 3, 64, 64)] * 2 + [(0, 3, 32, 32)] * 4


def test_crop_and_resize_match_torchvision_resized_crop(batch):
    """roi_align averages bilinear samples over each output pixel's footprint; torchvision's
    antialiased bilinear resize weighs them with a triangle of the same width. On these photos
    the two differ by < 0.02 (5 levels of 255) per view on average, while the same crop moved
    by 2 pixels differs by 2.5x-30x as much, so a wrong box or scale fails this test."""
    images, valid = batch
    aug = DeviceMultiCrop(SMALL, seed=0)
    keys = [(i, 0) for i in range(3)]
    params = without_photometric(aug.sample(keys, valid))
    for p in params:
        p.flip.zero_()
    views = aug.render(images, valid, params)
    for kind, p in enumerate(params):
        out = unnormalise(kind_views(views, kind), SMALL)
        for r in range(len(p.image)):
            left, top, right, bottom = p.box[r].long().tolist()
            img = images[p.image[r]].float() / 255
            size = [p.size] * 2
            ref = TF.resized_crop(img, top, left, bottom - top, right - left, size, antialias=True)
            moved = TF.resized_crop(
                img, top + 2, left + 2, bottom - top, right - left, size, antialias=True
            )
            err = (out[r] - ref).abs().mean().item()
            assert err < 0.02 and err < 0.4 * (out[r] - moved).abs().mean().item(), (kind, r)
    flipped = copy.deepcopy(params)
    for p in flipped:
        p.flip[::2] = True
    for v, (plain, mirrored) in enumerate(
        zip(views, aug.render(images, valid, flipped), strict=True)
    ):
        rows = (torch.arange(3) + v * 3) if v < 2 else (torch.arange(3) + (v - 2) * 3)
        flip = (rows % 2 == 0)[:, None, None, None]
        assert torch.equal(mirrored, torch.where(flip, plain.flip(-1), plain))


def test_photometric_pipeline_matches_torchvision_per_image(batch):
    """Each view: jitter ops in its own order, grayscale, blur, solarize, normalise, applied
    with torchvision's functional ops to the same crop."""
    images, valid = batch
    aug = DeviceMultiCrop(SMALL, seed=0)
    params = aug.sample([(i, 4) for i in range(3)], valid)
    for p in params:
        rows = torch.arange(len(p.image))
        p.jitter.fill_(True)
        p.gray.copy_(rows % 5 == 1)
        p.blur.copy_(rows % 2 == 0)
        p.solarize.copy_(rows % 3 == 0)
    plain = aug.render(images, valid, without_photometric(params))
    views = aug.render(images, valid, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    orders = set()
    for kind, p in enumerate(params):
        base = unnormalise(kind_views(plain, kind), SMALL)
        out = kind_views(views, kind)
        for r in range(len(p.image)):
            x = base[r]
            for op in p.order[r].tolist():
                x = ops[op](x, float(p.factors[r, op]))
            orders.add(tuple(p.order[r].tolist()))
            if p.gray[r]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if p.blur[r]:
                x = TF.gaussian_blur(x, [p.kernel] * 2, [float(p.sigma[r])] * 2)
            if p.solarize[r]:
                x = TF.solarize(x, 128 / 255)
            expected = TF.normalize(x, SMALL.mean, SMALL.std)
            # a pixel within float error of the solarize threshold may land on either side
            close = (out[r] - expected).abs() < 1e-4
            assert close.float().mean() > 0.999, (kind, r)
    assert len(orders) > 6  # many different jitter orders were checked


def test_padding_never_leaks_into_views():
    """Constant green images in magenta padding: every view is one flat colour, green when the
    photometric augmentations are off. Tiny and wide images make crops that are enlarged and
    that touch the image's right and bottom edges."""
    green = (0, 200, 0)
    shapes = [(40, 60), (20, 190), (144, 192), (190, 30), (1, 1)]
    images = torch.zeros(len(shapes), 3, 192, 192, dtype=torch.uint8)
    images[:, 0], images[:, 2] = 255, 255
    for b, (h, w) in enumerate(shapes):
        images[b, :, :h, :w] = torch.tensor(green)[:, None, None]
    valid = torch.tensor(shapes)
    keys = [(b, e) for e in range(4) for b in range(len(shapes))]
    images, valid = images.repeat(4, 1, 1, 1), valid.repeat(4, 1)
    plain = ViewConfig(64, 32, local_crops=4, photometric=False)
    aug = DeviceMultiCrop(plain, seed=0)
    params = aug.sample(keys, valid)
    edge = torch.cat([p.box[:, 2] == valid[p.image, 1] for p in params])
    assert edge.float().mean() > 0.2  # many crops end at the last column
    for v in aug.render(images, valid, params):
        expected = torch.tensor(green, dtype=torch.float32)[:, None, None] / 255
        assert (unnormalise(v, plain) - expected).abs().max() < 1e-5
    for v in DeviceMultiCrop(SMALL, seed=0)(images, valid, keys):
        assert v.std((2, 3)).max() < 1e-4  # jittered, still flat


def test_same_key_same_views_whatever_the_batch(batch):
    images, valid = batch
    aug = DeviceMultiCrop(SMALL, seed=3)
    keys = [(10, 1), (11, 1), (12, 1)]
    views = aug(images, valid, keys)
    order = [2, 0, 1]
    shuffled = aug(images[order], valid[order], [keys[i] for i in order])
    for a, b in zip(views, shuffled, strict=True):
        assert torch.equal(a[order], b)
    alone = aug(images[1:2], valid[1:2], keys[1:2])
    for a, b in zip(views, alone, strict=True):
        assert torch.equal(a[1:2], b)
    next_epoch = aug(images, valid, [(10, 2), (11, 2), (12, 2)])
    for a, b in zip(views, next_epoch, strict=True):
        assert (a - b).abs().mean() > 0.1


def test_view_statistics_match_the_cpu_path(photos):
    """Per-view brightness, contrast, colourfulness and the share of gray views of one real
    photo: the device path's and the CPU path's (PIL, bicubic, uint8 at every step) agree
    within 4 standard errors of their difference."""
    cfg = ViewConfig(global_size=112, local_size=48, local_crops=4)
    n = 128
    cpu = MultiCropTransform(cfg)
    cpu_views = []
    for i in range(n):  # seeded as views.MultiCropDataset seeds each image
        s = hash((0, 0, i)) % (2**31)
        random.seed(s)
        torch.manual_seed(s)
        cpu_views.append(cpu(photos[0]))
    images, valid = canvases(cfg, [photos[0]])
    aug = DeviceMultiCrop(cfg, seed=1)
    keys = [(i, 0) for i in range(n)]
    dev_views = aug(images.expand(n, -1, -1, -1), valid.expand(n, -1), keys)

    def measures(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = unnormalise(x, cfg)
        chroma = x.amax(1) - x.amin(1)
        return {
            "brightness": x.mean((1, 2, 3)),
            "contrast": x.std((1, 2, 3)),
            "colour": chroma.mean((1, 2)),
            "gray": (chroma.amax((1, 2)) < 1e-3).float(),
        }

    for name, views in (("global0", [0]), ("global1", [1]), ("local", list(range(2, 6)))):
        a = measures(torch.cat([torch.stack([v[i] for v in cpu_views]) for i in views]))
        b = measures(torch.cat([dev_views[i] for i in views]))
        for key in a:
            se = math.sqrt(a[key].var() / len(a[key]) + b[key].var() / len(b[key]))
            diff = abs(a[key].mean() - b[key].mean())
            assert diff < 4 * se, (name, key, diff, se)
        ratio = b["brightness"].std() / a["brightness"].std()
        assert 0.75 < ratio < 1.33, (name, ratio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_under_autocast_without_host_syncs(batch):
    images, valid = batch
    aug = DeviceMultiCrop(SMALL, seed=0)
    keys = [(i, 0) for i in range(3)]
    expected = aug(images, valid, keys)
    cuda_images = images.cuda()
    aug(cuda_images, valid, keys)  # warm-up: pinned-memory pool, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            views = aug(cuda_images, valid, keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(expected, views, strict=True):
        assert b.dtype == torch.float32
        assert (a - b.cpu()).abs().mean() < 1e-4
