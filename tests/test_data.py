import numpy as np
import pytest
import torch
from PIL import Image

from mimcli.data import scan_folder, subsample
from mimcli.errors import MimcliError
from mimcli.features import extract_features
from tests.conftest import write_image_folder


def test_scan_imagefolder(tmp_path):
    root = write_image_folder(tmp_path / "d", per_class=3, classes=2)
    (root / "class_1" / "notes.txt").write_text("ignored")
    images = scan_folder(root)
    assert images.classes == ["class_0", "class_1"]
    assert len(images) == 6 and images.labels == [0, 0, 0, 1, 1, 1]


def test_flat_folder_only_when_labels_not_needed(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
    flat = scan_folder(tmp_path, labelled=False)
    assert len(flat) == 3 and flat.labels == [-1, -1, -1] and not flat.labelled
    with pytest.raises(MimcliError, match="no class sub-folders"):
        scan_folder(tmp_path, what="--train")


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(MimcliError, match="no images found"):
        scan_folder(tmp_path)
    with pytest.raises(MimcliError, match="no such folder"):
        scan_folder(tmp_path / "nope", what="--val")


def test_subsample_is_balanced_and_seeded(tmp_path):
    images = scan_folder(write_image_folder(tmp_path / "d", per_class=10, classes=3))
    a = subsample(images, 9, seed=1)
    b = subsample(images, 9, seed=1)
    assert a.paths == b.paths
    assert np.bincount(a.labels).tolist() == [3, 3, 3]
    assert subsample(images, 9, seed=2).paths != a.paths
    assert subsample(images, None) is images


def test_corrupt_images_skip_or_fail(tmp_path, tiny_vit):
    root = write_image_folder(tmp_path / "d", per_class=4, classes=2)
    (root / "class_0" / "bad.png").write_bytes(b"definitely not a png")
    images = scan_folder(root)
    from timm.data import create_transform

    transform = create_transform(input_size=(3, 32, 32), crop_pct=1.0)
    feats = extract_features(
        tiny_vit, images, transform, [4], torch.device("cpu"), batch_size=3, num_workers=0
    )
    try:
        assert len(feats) == 8 and feats.skipped == [str(root / "class_0" / "bad.png")]
        assert feats.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        assert str(root / "class_0" / "bad.png") not in feats.paths
    finally:
        feats.close()
    import glob
    import tempfile

    before = set(glob.glob(f"{tempfile.gettempdir()}/mimcli-features-*"))
    with pytest.raises(MimcliError, match="bad.png"):
        extract_features(
            tiny_vit,
            images,
            transform,
            [4],
            torch.device("cpu"),
            batch_size=3,
            num_workers=0,
            on_bad_image="fail",
        )
    assert set(glob.glob(f"{tempfile.gettempdir()}/mimcli-features-*")) == before


def test_features_match_direct_forward_and_memory_maps(tmp_path, tiny_vit):
    root = write_image_folder(tmp_path / "d", per_class=5, classes=2)
    images = scan_folder(root)
    from timm.data import create_transform

    transform = create_transform(input_size=(3, 32, 32), crop_pct=1.0)
    feats = extract_features(
        tiny_vit,
        images,
        transform,
        [1, 2, 3, 4],
        torch.device("cpu"),
        batch_size=4,
        num_workers=2,
        dtype="float32",
        directory=tmp_path / "feats",
    )
    assert isinstance(feats.cls, np.memmap) or isinstance(feats.cls.base, np.memmap)
    assert (tmp_path / "feats" / "cls.npy").is_file()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images.paths])
    with torch.no_grad():
        out = tiny_vit.forward_features(x)
    np.testing.assert_allclose(feats.block(4, "cls_norm"), out[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(feats.block(4, "patch_norm"), out[:, 1:].mean(1).numpy(), atol=1e-5)
    assert feats.cls.shape == (4, 10, 32)
