"""Flat folders of image files matched by file name (CAAD / official ``--eval-directory`` format).

Black-box attackers in the CAAD competitions (paper Sec. 6.2) deliver their adversarial images as a
folder of files named like the clean images; defenders answer with a ``filename,label`` CSV. This
module reads such folders into the library's pixel convention (float RGB in [0, 1], ``[C, H, W]``),
reads and writes label CSVs, and matches adversarial files to clean images by name.

Names are matched on the file *stem* (the name without its extension), so ``cat.jpg`` matches an
adversarial ``cat.png``; an image without a file (an index of a built-in dataset) is called by its
index, so ``00042.png`` or ``42.png`` matches image 42.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from featdenoise.data.datasets import image_size, load_rgb
from featdenoise.data.transforms import check_resize_method, resize_uint8
from featdenoise.runtime.atomic import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def list_images(folder: str) -> list[str]:
    """Sorted file names (not paths) of the images directly inside ``folder`` (no recursion)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist; pass an existing folder")
    names = sorted(
        n for n in os.listdir(folder)
        if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))
    )
    if not names:
        raise FileNotFoundError(
            f"image folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "check the path")
    return names


def check_size(size: int | None, what: str = "size") -> int | None:
    """``size`` if it is None or a positive int (pixels); else one ``ValueError`` naming it."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"{what} must be a positive number of pixels, got {size!r}")
    return size


def check_image_sizes(folder: str, names: Sequence[str], same: bool = True) -> None:
    """Read each image's header (nothing decoded): one ``ValueError`` naming the file when one is
    unreadable or above Pillow's pixel limit (a decompression bomb), and with ``same`` naming
    two files when the images are not all of one size (they are batched as they are)."""
    first: tuple[str, tuple[int, int]] | None = None
    for n in names:
        size = image_size(os.path.join(folder, n))
        if first is None:
            first = (n, size)
        elif same and size != first[1]:
            raise ValueError(
                f"images of {folder} differ in size ({first[0]}: {first[1][0]}x{first[1][1]}, "
                f"{n}: {size[0]}x{size[1]}); resize them to one size (predict: --size N)")


def load_image(path: str, size: int | None = None, channels: int = 3,
               resize_method: str = "cv2") -> torch.Tensor:
    """Read one image file as float pixels in [0, 1], shape ``[channels, H, W]``.

    Args:
        path: image file (any format Pillow reads), decoded to 8 bits by Pillow.
        size: if given, a plain bicubic resize of the 8-bit image to ``size x size`` (no crop,
            aspect ratio not kept) as the official ``--eval-directory`` does; None keeps the
            file's own size.
        channels: 3 for RGB, 1 for grey (Fashion-MNIST nets).
        resize_method: ``"cv2"`` (default): ``cv2.resize(img, (size, size),
            interpolation=cv2.INTER_CUBIC)`` on the uint8 pixels, the official code's resize
            bit for bit; ``"pil"``: Pillow bicubic (antialiased when shrinking). See
            :func:`featdenoise.data.transforms.resize_uint8`.
    """
    check_resize_method(resize_method)
    check_size(size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")

    try:
        img = load_rgb(path)  # grayscale, palette, CMYK, 16-bit, alpha -> 8-bit RGB
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"unreadable image {path} ({err}); remove or replace the file") from None
    if channels == 1:
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3] or [H, W]
    if size is not None:
        arr = resize_uint8(arr, int(size), int(size), resize_method)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # [H, W] -> [H, W, 1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # [H, W, C] -> [C, H, W]


def save_image(x: torch.Tensor, path: str) -> None:
    """Write ``x`` (``[C, H, W]`` in [0, 1], C = 1 or 3) as an 8-bit image (PNG: lossless)."""
    pixels = (x.detach().clamp(0, 1).cpu() * 255).round().to(torch.uint8)  # [C, H, W]
    arr = pixels.permute(1, 2, 0).numpy()  # [C, H, W] -> [H, W, C]
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)


def stem(name: str) -> str:
    """File name without folder and extension: ``"a/cat.JPEG" -> "cat"``."""
    return os.path.splitext(os.path.basename(str(name)))[0]


def read_labels_csv(path: str) -> dict[str, int]:
    """Read ``filename,label`` lines (a header line is allowed) into ``{stem: label}``.

    Extra columns are ignored; file names may carry folders (the official predictions file writes
    full paths), only the stem is kept. A label must be a class index (an integer >= 0). The same
    image listed twice with the same label is accepted; with two different labels it is refused,
    naming both lines.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line ``path:line: ...`` for a short row, a label that is not an integer
            >= 0, or conflicting rows for one image.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"labels file {path!r} does not exist; expected 'filename,label' lines")
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'filename,label', got {row!r}")
            try:
                label = int(row[1])
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise ValueError(
                    f"{path}:{lineno}: label {row[1]!r} is not an integer class index") from None
            if label < 0:
                raise ValueError(f"{path}:{lineno}: label {label} is not a class index (class "
                                 "indices start at 0); fix the row")
            key = stem(row[0].strip())
            if key in labels and labels[key] != label:
                raise ValueError(f"{path}: image {key!r} has label {labels[key]} on line "
                                 f"{first_line[key]} and label {label} on line {lineno}; keep "
                                 "one of them")
            labels[key] = label
            first_line.setdefault(key, lineno)
    return labels


PREDICTIONS_HEADER = ("filename", "featdenoise_prediction")
"""The first row of every predictions file :func:`write_labels_csv` writes (by default): how a
later run knows the file for one of its own, which it may replace. ``read_labels_csv`` skips it."""


def is_predictions_csv(path: str) -> bool:
    """True if ``path`` is a predictions file featdenoise wrote: the :data:`PREDICTIONS_HEADER`
    row, then ``name,integer`` rows. Anything else (a labels file, a headerless file, another
    program's CSV) is not, and is never replaced."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            if tuple(next(rows, ())) != PREDICTIONS_HEADER:
                return False
            for row in rows:
                if len(row) != 2:
                    return False
                int(row[1])
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return False
    return True


def write_labels_csv(path: str, names: Sequence[str], labels: Sequence[int], *,
                     header: bool = True) -> None:
    """Write ``filename,label`` rows atomically, after the :data:`PREDICTIONS_HEADER` row
    (``header=False``: no header, the official ``--prediction-file`` form, which cannot be told
    from a user's labels file: it is then written only where no file exists yet).

    An existing file at ``path`` is replaced only if it is a predictions file of ours
    (:func:`is_predictions_csv`); anything else is refused (``ValueError``, one line)."""
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names but {len(labels)} labels")
    with atomic_write(path, newline="", ours=is_predictions_csv) as f:
        w = csv.writer(f, lineterminator="\n")
        if header:
            w.writerow(PREDICTIONS_HEADER)
        for n, y in zip(names, labels, strict=True):
            w.writerow([n, int(y)])


class ImageFiles(Dataset):
    """A flat folder of images as a Dataset yielding ``(image [C, H, W] in [0, 1], label int)``.

    ``names`` holds the file names in order (sorted), so results can be written per file.
    Labels come from ``labels`` (``{stem: label}``, e.g. :func:`read_labels_csv`); images without a
    label get -1 (allowed for prediction only; evaluation refuses them).

    Args:
        folder: the folder.
        names: file names to use (default: every image in the folder, sorted).
        labels: optional ``{stem: label}``.
        size: optional bicubic resize to ``size x size`` (see :func:`load_image`); without it
            the images must all have one size.
        channels: 3 (RGB) or 1 (grey).

    Every image's header is read first (:func:`check_image_sizes`): an unreadable file, one
    above Pillow's pixel limit, or (without ``size``) images of two sizes are one ``ValueError``
    naming the files, before any pixel is decoded.
        resize_method: ``"cv2"`` (official ``INTER_CUBIC``, default) or ``"pil"``.
    """

    def __init__(self, folder: str, names: Sequence[str] | None = None,
                 labels: dict[str, int] | None = None, size: int | None = None,
                 channels: int = 3, resize_method: str = "cv2") -> None:
        self.folder = folder
        self.names = list(names) if names is not None else list_images(folder)
        self.size = check_size(size)
        check_image_sizes(folder, self.names, same=size is None)
        self.channels = channels
        self.resize_method = check_resize_method(resize_method)
        self.labels = [int(labels.get(stem(n), -1)) if labels else -1 for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = load_image(os.path.join(self.folder, self.names[i]), self.size, self.channels,
                       self.resize_method)
        return x, self.labels[i]

    def image_id(self, i: int) -> str:
        """The id under which image ``i`` is recorded and matched: its file stem."""
        return stem(self.names[i])


def labelled_folder(folder: str, labels_csv: str, channels: int = 3) -> ImageFiles:
    """The images of ``folder`` with their labels from ``labels_csv`` (``filename,label``), for
    evaluation: every image must have a label and all must have one size (one ``ValueError``
    naming the file and an example otherwise)."""
    ds = ImageFiles(folder, labels=read_labels_csv(labels_csv), channels=channels)
    missing = [n for n, y in zip(ds.names, ds.labels, strict=True) if y < 0]
    if missing:
        raise ValueError(f"{labels_csv} has no label for {len(missing)} images of {folder} "
                         f"(e.g. {missing[0]}); add them")
    return ds


def dataset_image_ids(dataset: Dataset) -> list[str]:
    """One id per image of ``dataset``: file stems if the dataset knows its files, else indices.

    Understands :class:`ImageFiles` (``names``), torchvision folder datasets (``samples`` /
    ``imgs``), and ``torch.utils.data.Subset`` of those.
    """
    if isinstance(dataset, Subset):
        inner = dataset_image_ids(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    if isinstance(dataset, ImageFiles):
        return [stem(n) for n in dataset.names]
    n = len(dataset)  # type: ignore[arg-type]  # torch's Dataset type does not declare __len__
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if isinstance(samples, (list, tuple)) and len(samples) == n:
        first = samples[0] if samples else None
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], str):
            ids = [stem(s[0]) for s in samples]
            if len(set(ids)) == len(ids):
                return ids
    return [str(i) for i in range(n)]


def match_files(ids: Sequence[str], folder: str) -> dict[str, str]:
    """Match image ids to the files of ``folder`` by stem; ``{id: file name}`` for those found.

    A numeric id also matches a zero-padded file stem (``"42"`` matches ``00042.png``).
    Raises ValueError if two files in the folder share a stem (``a.png`` and ``a.jpg``).
    """
    by_stem: dict[str, str] = {}
    for n in list_images(folder):
        s = stem(n)
        if s in by_stem:
            raise ValueError(
                f"{folder!r} holds two files for image {s!r} ({by_stem[s]}, {n}); keep one")
        by_stem[s] = n
        if s.isdigit():
            by_stem.setdefault(str(int(s)), n)
    return {i: by_stem[i] for i in ids if i in by_stem}
