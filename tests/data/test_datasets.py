"""Datasets in their standard formats (tiny folders made here) and the official preprocessing."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import write_idx
from PIL import Image

from featdenoise.data import transforms as T
from featdenoise.data.datasets import (
    SeededDataset,
    build_dataset,
    drop_skipped,
    load_rgb,
    subset_indices,
)

FMNIST = "/usr/share/datasets/fashion-mnist"


def write_idx_folder(folder, n_train=20, n_val=8, seed=0):
    """Write the four Fashion-MNIST IDX .gz files with random content; return the arrays."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), x)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), y)
        out[prefix] = (x, y)
    return out


def test_fashion_mnist_idx_folder(tmp_path):
    arrays = write_idx_folder(tmp_path)
    ds = build_dataset("fashion_mnist", str(tmp_path), "train")
    ds_val = build_dataset("fashion_mnist", str(tmp_path), "val")
    assert len(ds) == 20 and len(ds_val) == 8
    x, y = ds_val[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    # Independent check: bytes / 255 in row-major order, label as written.
    np.testing.assert_allclose(x[0].numpy(), arrays["t10k"][0][3] / 255.0, atol=1e-6)
    assert y == int(arrays["t10k"][1][3])


def test_fashion_mnist_missing_files_name_folder_and_package(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("fashion_mnist", str(tmp_path), "train")
    msg = str(err.value)
    assert str(tmp_path) in msg and "dataset-fashion-mnist" in msg and "\n" not in msg


def test_truncated_idx_file_is_reported(tmp_path):
    write_idx_folder(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        build_dataset("fashion_mnist", str(tmp_path), "val")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_if_installed():
    ds = build_dataset("fashion_mnist", split="val", subset=50)
    assert len(ds) == 50
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10 and 0 <= x.min() and x.max() <= 1


def test_cifar10_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    train = build_dataset("cifar10", str(tmp_path), "train", augment=False)  # parent folder
    val = build_dataset("cifar10", str(folder), "val")  # and the folder itself
    assert len(train) == 15 and len(val) == 3
    x, y = val[1]
    assert x.shape == (3, 32, 32)
    data, labels = batches["test_batch"]
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32.
    np.testing.assert_allclose(x[1, 0, :5].numpy(), data[1, 1024:1029] / 255.0, atol=1e-6)
    assert y == labels[1]
    x5, y5 = train[14]
    np.testing.assert_allclose(x5[2, 31, 31].item(), batches["data_batch_5"][0][2, 3071] / 255,
                               atol=1e-6)


def _imagenet_folder(root, corrupt=True):
    """train/ and val/ with two classes and images in awkward modes."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            os.makedirs(root / split / wnid)
    rgb = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "train/n01440764/a.JPEG")
    Image.fromarray(rgb[:, :, 0]).save(root / "train/n01440764/gray.JPEG")
    Image.fromarray(rgb).convert("CMYK").save(root / "train/n01443537/cmyk.JPEG")
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(root / "train/n01443537/alpha.png")
    sixteen = (rng.integers(0, 65536, size=(30, 50))).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "val/n01443537/deep.png")
    Image.fromarray(rgb).convert("P").save(root / "val/n01440764/palette.png")
    if corrupt:
        good = (root / "train/n01440764/a.JPEG").read_bytes()
        (root / "train/n01440764/broken.JPEG").write_bytes(good[: len(good) // 3])
        (root / "val/n01440764/junk.JPEG").write_bytes(b"not an image at all")
    return rgb, sixteen


def test_imagenet_folder_modes_skipping_and_strict(tmp_path):
    _imagenet_folder(tmp_path)
    train = build_dataset("imagenet", str(tmp_path), "train", image_size=32)
    val = build_dataset("imagenet", str(tmp_path), "val", image_size=32)
    assert train.classes == ["n01440764", "n01443537"]
    assert len(train) == 5 and len(val) == 3
    with pytest.warns(UserWarning, match="junk.JPEG"):
        items = [val[i] for i in range(len(val))]
    for x, _ in items:
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
    labels = torch.tensor([y for _, y in items])
    assert sorted(labels.tolist()) == [-1, 0, 1]
    x, y, n_bad = drop_skipped(torch.stack([x for x, _ in items]), labels)
    assert n_bad == 1 and len(y) == 2 and (y >= 0).all()
    with pytest.warns(UserWarning, match="broken.JPEG"):
        train_labels = [train[i][1] for i in range(len(train))]
    assert train_labels.count(-1) == 1

    strict = build_dataset("imagenet", str(tmp_path), "val", image_size=32, strict=True)
    bad = [i for i, (p, _) in enumerate(strict.samples) if p.endswith("junk.JPEG")][0]
    with pytest.raises(ValueError) as err:
        strict[bad]
    assert "junk.JPEG" in str(err.value) and "data.strict" in str(err.value)


def test_load_rgb_converts_gray_cmyk_16bit_alpha(tmp_path):
    rgb, sixteen = _imagenet_folder(tmp_path, corrupt=False)
    for rel in ("train/n01440764/gray.JPEG", "train/n01443537/cmyk.JPEG",
                "train/n01443537/alpha.png", "val/n01443537/deep.png",
                "val/n01440764/palette.png"):
        img = load_rgb(str(tmp_path / rel))
        assert img.mode == "RGB", rel
    deep = np.asarray(load_rgb(str(tmp_path / "val/n01443537/deep.png")), dtype=np.float64)
    # 16-bit values scaled to 8 bits (independent rounding of v / 65535 * 255).
    np.testing.assert_allclose(deep[:, :, 0], np.round(sixteen / 65535 * 255), atol=1)
    alpha = np.asarray(load_rgb(str(tmp_path / "train/n01443537/alpha.png")))
    np.testing.assert_array_equal(alpha, rgb)


def _odd_image(h, w, channels=3, seed=0):
    """Smooth-plus-noise uint8 image (so bicubic overshoots and saturation are exercised)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127.5 + 127.5 * np.sin(xx / 3.0 + yy / 5.0)
    shape = (h, w, channels) if channels > 1 else (h, w)
    noisy = (base if channels == 1 else base[:, :, None]) + rng.normal(0, 60, shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("hw,out", [((37, 53), (224, 224)), ((301, 251), (224, 224)),
                                    ((9, 7), (5, 11))])
def test_resize_uint8_is_cv2_inter_cubic_on_the_uint8_pixels(hw, out):
    cv2 = pytest.importorskip("cv2")
    rgb = _odd_image(*hw)
    ref = cv2.resize(rgb, out, interpolation=cv2.INTER_CUBIC)  # (width, height)
    got = T.resize_uint8(rgb, *out)
    assert got.dtype == np.uint8 and got.shape == (out[1], out[0], 3)
    np.testing.assert_array_equal(got, ref)
    # the official BGR input, flipped back, gives the same pixels (channels are independent)
    bgr = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), out, interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(got, bgr[:, :, ::-1])
    grey = _odd_image(*hw, channels=1)
    np.testing.assert_array_equal(T.resize_uint8(grey, *out),
                                  cv2.resize(grey, out, interpolation=cv2.INTER_CUBIC))
    pil = np.asarray(Image.fromarray(rgb).resize(out, Image.BICUBIC))
    np.testing.assert_array_equal(T.resize_uint8(rgb, *out, method="pil"), pil)
    with pytest.raises(ValueError, match="cv2, pil"):
        T.resize_uint8(rgb, *out, method="area")


@pytest.mark.parametrize("method", ["cv2", "pil"])
def test_load_image_resizes_as_cv2_or_pil(tmp_path, method):
    import cv2

    from featdenoise.data.files import load_image

    rgb = _odd_image(41, 29, seed=1)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    x = load_image(str(tmp_path / "a.png"), size=224, resize_method=method)
    if method == "cv2":
        ref = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_CUBIC)
    else:
        ref = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BICUBIC))
    np.testing.assert_array_equal((x * 255).round().byte().permute(1, 2, 0).numpy(), ref)
    assert torch.equal(x, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255)


def test_imagenet_eval_is_the_official_shortest_edge_and_centre_crop():
    cv2 = pytest.importorskip("cv2")
    rgb = _odd_image(301, 403, seed=2)
    out = T.imagenet_eval(224)(Image.fromarray(rgb))
    # tensorpack ResizeShortestEdge(256, INTER_CUBIC): 403 * 256 / 301 + 0.5 -> 343 wide;
    # CenterCrop(224): offsets int((256 - 224) * 0.5) = 16, int((343 - 224) * 0.5) = 59.
    ref = cv2.resize(rgb, (343, 256), interpolation=cv2.INTER_CUBIC)[16:240, 59:283]
    assert out.shape == (3, 224, 224)
    np.testing.assert_array_equal((out * 255).round().byte().permute(1, 2, 0).numpy(), ref)


def test_googlenet_crop_resizes_with_cv2_inter_cubic():
    cv2 = pytest.importorskip("cv2")
    rgb = _odd_image(37, 37, seed=3)
    # area and aspect fixed to 1: the crop is the whole image, then resized to 24 x 24
    crop = T.GoogleNetResize(24, area=(1.0, 1.0), ratio=(1.0, 1.0))(Image.fromarray(rgb))
    np.testing.assert_array_equal(np.asarray(crop),
                                  cv2.resize(rgb, (24, 24), interpolation=cv2.INTER_CUBIC))
    # a 400 x 5 image has no valid crop: fallback, shortest edge to 32 (2560 x 32), centre crop
    thin = _odd_image(400, 5, seed=4)
    out = T.GoogleNetResize(32)(Image.fromarray(thin))
    ref = cv2.resize(thin, (32, 2560), interpolation=cv2.INTER_CUBIC)[1264:1296]
    np.testing.assert_array_equal(np.asarray(out), ref)
    pil = T.GoogleNetResize(24, area=(1.0, 1.0), ratio=(1.0, 1.0), resize_method="pil")
    np.testing.assert_array_equal(np.asarray(pil(Image.fromarray(rgb))),
                                  np.asarray(Image.fromarray(rgb).resize((24, 24), Image.BICUBIC)))


def test_imagenet_eval_pil_matches_resize_then_centre_crop():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    out = T.imagenet_eval(224, resize_method="pil")(img)
    assert out.shape == (3, 224, 224)
    # Reference with PIL only: shortest edge 256 bicubic (400 x 300 -> 341 x 256), centre crop.
    ref = img.resize((341, 256), Image.BICUBIC)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1 / 255 + 1e-6)


def test_imagenet_train_augmentation_shapes_and_range():
    img = Image.fromarray(np.full((100, 80, 3), 128, dtype=np.uint8))
    tf = T.imagenet_train(64)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(5)]
    for x in outs:
        assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # random colour changes
    thin = Image.fromarray(np.zeros((400, 5, 3), dtype=np.uint8))  # crop impossible: fallback
    assert T.GoogleNetResize(32)(thin).size == (32, 32)


def test_colour_augmentors_against_hand_formulas():
    x = torch.rand(3, 4, 5)
    torch.manual_seed(7)
    r = 0.6 + 0.8 * torch.rand(()).item()
    torch.manual_seed(7)
    y = T.Contrast()(x)
    mean = x.mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(y, (x - mean) * r + mean)

    torch.manual_seed(8)
    a = 1 + (-0.4 + 0.8 * torch.rand(()).item())
    torch.manual_seed(8)
    y = T.Saturation()(x)
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    torch.testing.assert_close(y, x * a + grey * (1 - a))

    torch.manual_seed(9)
    alpha = torch.randn(3) * 0.1
    torch.manual_seed(9)
    y = T.Lighting()(x)
    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])
    inc = eigvec @ (alpha.numpy() * eigval)
    torch.testing.assert_close(y - x, torch.tensor(inc, dtype=torch.float32).view(3, 1, 1)
                               .expand(3, 4, 5), atol=1e-6, rtol=0)


def test_seeded_dataset_repeats_augmentation_per_epoch_and_index(tmp_path):
    write_idx_folder(tmp_path)
    ds = SeededDataset(build_dataset("fashion_mnist", str(tmp_path), "train", augment=True),
                       seed=5)
    ds.set_epoch(1)
    a = ds[3][0]
    torch.rand(100)  # the global stream does not matter
    assert torch.equal(ds[3][0], a)
    ds.set_epoch(2)
    others = [ds[3][0] for _ in range(1)]
    ds.set_epoch(3)
    others.append(ds[3][0])
    assert not all(torch.equal(a, o) for o in others)


def test_subset_is_fixed_and_sized():
    assert subset_indices(100, 10, 0) == subset_indices(100, 10, 0)
    assert len(set(subset_indices(100, 10, 0))) == 10
    assert subset_indices(5, 0) == list(range(5)) and subset_indices(5, 9) == list(range(5))


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("cifar10", split="dev")
