"""Datasets in their standard on-disk formats, yielding ``(image [C, H, W] in [0, 1], label)``.

- ``fashion_mnist``: the four IDX ``.gz`` files (``train-images-idx3-ubyte.gz`` ...); default root
  ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``).
  Images ``[1, 28, 28]``, 10 classes.
- ``cifar10``: the python-pickle folder ``cifar-10-batches-py`` (``data_batch_1..5``,
  ``test_batch``); root may be that folder or its parent. Images ``[3, 32, 32]``, 10 classes.
- ``imagenet``: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``; class index = rank
  of the wnid in sorted order (the official synset order). Training uses the official augmentation,
  evaluation shortest edge 256 + centre crop 224 (:mod:`featdenoise.data.transforms`).

Unreadable (corrupt, truncated) image files are skipped by default: the sample comes back as a zero
image with label ``-1`` (so the default collate still works), :func:`drop_skipped` removes such
samples from a batch, and the training loop counts and reports them. ``strict=True`` raises a
``ValueError`` naming the file instead. Grayscale, palette, CMYK, 16-bit and alpha images are
converted to 8-bit RGB (alpha dropped).
"""

from __future__ import annotations

import gzip
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from featdenoise.data import transforms as T
from featdenoise.runtime.safeio import restricted_pickle_load
from featdenoise.runtime.seeds import generator

DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "data/cifar-10-batches-py",
    "imagenet": "data/imagenet",
}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "imagenet": 1000}
IN_CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "imagenet": 3}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
SKIPPED_LABEL = -1


# ---------------------------------------------------------------------------------------------
# In-memory datasets (Fashion-MNIST, CIFAR-10)


class ArrayDataset(Dataset):
    """uint8 images ``[N, C, H, W]`` and int64 labels ``[N]`` with a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = sorted(set(labels.tolist()))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        x = self.transform(x) if self.transform is not None else x.float().div_(255)
        return x, int(self.labels[i])


def _read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, "
                         f"found {data.size}")
    return data.reshape(tuple(dims))


def _find(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {root}; install the Debian/Ubuntu package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.root")


def fashion_mnist(root: str, split: str, augment: bool) -> ArrayDataset:
    """Fashion-MNIST from its four IDX files; images ``[1, 28, 28]``."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))  # [N, 28, 28]
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))  # [N]
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {root}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, 28, 28]
    y = torch.from_numpy(labels.astype(np.int64))
    tf = T.small_train(28, padding=2, flip=True) if augment else T.small_eval()
    return ArrayDataset(x, y, tf)


def cifar10(root: str, split: str, augment: bool) -> ArrayDataset:
    """CIFAR-10 from the python-pickle folder; images ``[3, 32, 32]``."""
    folder = root
    if not os.path.isfile(os.path.join(folder, "test_batch")):
        folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-10 file {name} not found in {folder}; point data.root "
                                    f"at the extracted cifar-10-batches-py folder")
        batch = restricted_pickle_load(path)  # plain data only: never runs code from the file
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{path} is not a CIFAR-10 batch (no data/labels entries)")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs))  # [N, 3, 32, 32]
    y = torch.from_numpy(np.concatenate(ys))
    tf = T.small_train(32, padding=4, flip=True) if augment else T.small_eval()
    return ArrayDataset(x, y, tf)


# ---------------------------------------------------------------------------------------------
# Image folders (ImageNet)


def _open(path: str) -> Image.Image:
    """``Image.open(path)`` (the header only) of an image within Pillow's pixel limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M by default): a small compressed file can declare a
    huge image (a decompression bomb); it is one ``ValueError`` naming the file, never decoded."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:  # above twice the limit: Pillow refuses to open
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
    else:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is None or img.size[0] * img.size[1] <= limit:
            return img
        size = f"{img.size[0]}x{img.size[1]} = {img.size[0] * img.size[1]} pixels"
        img.close()
    raise ValueError(f"{path} declares {size}, above Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                     "(a decompression bomb?); shrink or remove it, or raise "
                     "PIL.Image.MAX_IMAGE_PIXELS")


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (nothing decoded); ``ValueError``
    naming the file when it is unreadable or above Pillow's pixel limit."""
    try:
        with _open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ValueError(f"unreadable image {path} ({err}); remove or replace the file") from None


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB: grayscale/palette/CMYK converted, 16-bit scaled to 8 bits,
    alpha dropped. Raises ``OSError``/``ValueError`` for unreadable files and for images above
    Pillow's pixel limit (:func:`image_size`)."""
    with _open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """``<root>/<split>/<wnid>/<file>`` images; see the module docstring for skipping rules."""

    def __init__(self, root: str, split: str, transform, image_size: int, strict: bool = False):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"image folder {split_dir} not found; expected "
                                    f"{root}/{{train,val}}/<wnid>/*.JPEG (set data.root)")
        class_dir = os.path.join(root, "train")
        if not os.path.isdir(class_dir):
            class_dir = split_dir
        self.classes = sorted(d.name for d in os.scandir(class_dir) if d.is_dir())
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for wnid in sorted(d.name for d in os.scandir(split_dir) if d.is_dir()):
            if wnid not in index:
                raise ValueError(f"class folder {os.path.join(split_dir, wnid)} has no "
                                 f"counterpart in {class_dir}")
            folder = os.path.join(split_dir, wnid)
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    self.samples.append((os.path.join(folder, name), index[wnid]))
        if not self.samples:
            raise FileNotFoundError(f"no images found under {split_dir}/<wnid>/")
        self.transform, self.image_size, self.strict = transform, image_size, strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = load_rgb(path)
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as err:
            if self.strict:
                raise ValueError(f"unreadable image {path} ({err}); remove it or set "
                                 f"data.strict=false to skip it") from None
            warnings.warn(f"skipping unreadable image {path} ({err})", stacklevel=2)
            return torch.zeros(3, self.image_size, self.image_size), SKIPPED_LABEL
        return self.transform(img), label


def imagenet(root: str, split: str, augment: bool, image_size: int = 224,
             strict: bool = False) -> ImageFolderDataset:
    """ImageNet folders with the official train augmentation / eval preprocessing."""
    tf = T.imagenet_train(image_size) if augment else T.imagenet_eval(image_size)
    return ImageFolderDataset(root, split, tf, image_size, strict)


# ---------------------------------------------------------------------------------------------
# Helpers used by the loaders


class SeededDataset(Dataset):
    """Makes a dataset's random augmentation a function of ``(seed, epoch, index)``.

    Each ``__getitem__`` runs in a forked torch RNG seeded from those three numbers, so the same
    image gets the same augmentation whatever the number of workers or where a run was resumed.
    Call :meth:`set_epoch` before each epoch (before creating the loader iterator).
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # Dataset does not declare __len__

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 100_000_007 + int(i))
            return self.dataset[i]


def drop_skipped(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Remove samples marked unreadable (label -1) from a batch -> ``(x, y, number removed)``."""
    keep = y != SKIPPED_LABEL
    n_bad = int((~keep).sum())
    if n_bad == 0:
        return x, y, 0
    return x[keep], y[keep], n_bad


def subset_indices(n: int, k: int | None, seed: int = 0) -> list[int]:
    """The fixed random subset of ``k`` of ``n`` image indices, sorted; all for k None, 0 or >= n.

    The one subset rule of the library: training's ``data.train_subset`` / ``val_subset``,
    ``eval --limit``, ``blackbox --limit`` and the sanity checks all call it, so the same ``k``
    and seed pick the same images everywhere. Random rather than the first ``k`` because
    ImageNet's validation folder is sorted by class; depends only on ``(n, k, seed)``.
    """
    if k is not None and k < 0:
        raise ValueError(f"a subset size must be positive, got {k}")
    if not k or k >= n:
        return list(range(n))
    g = generator(seed, "subset", n, k)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def build_dataset(name: str, root: str | None = None, split: str = "train",
                  augment: bool | None = None, image_size: int = 224, strict: bool = False,
                  subset: int = 0, subset_seed: int = 0) -> Dataset:
    """Build a dataset by name ("fashion_mnist", "cifar10", "imagenet").

    Args:
        root: folder in the standard layout (default: ``DEFAULT_ROOTS[name]``).
        split: "train" or "val" ("test" is an alias of "val").
        augment: random training augmentation; default True for "train", False otherwise.
        image_size: ImageNet crop size (224); ignored by the small datasets.
        strict: raise on an unreadable image file instead of skipping it.
        subset: keep a fixed random subset of this many images (0: all), drawn with
            ``subset_seed``.

    Returns:
        A Dataset yielding ``(image [C, H, W] float32 in [0, 1], label int)``, with ``.classes``.
    """
    if name not in NUM_CLASSES:
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(NUM_CLASSES)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split '{split}'; use train or val")
    split = "val" if split == "test" else split
    root = root or DEFAULT_ROOTS[name]
    augment = (split == "train") if augment is None else augment
    ds: ArrayDataset | ImageFolderDataset
    if name == "fashion_mnist":
        ds = fashion_mnist(root, split, augment)
    elif name == "cifar10":
        ds = cifar10(root, split, augment)
    else:
        ds = imagenet(root, split, augment, image_size, strict)
    if not subset:
        return ds
    picked = Subset(ds, subset_indices(len(ds), subset, subset_seed))
    picked.classes = ds.classes  # type: ignore[attr-defined]  # the subset keeps the names
    return picked
