"""Image preprocessing: the official ImageNet augmentation and evaluation, and small-image ones.

All transforms end in float RGB tensors ``[3, H, W]`` (or ``[1, H, W]`` for Fashion-MNIST) in
``[0, 1]``; normalisation is a layer of each model. Randomness comes from ``torch``'s global
generator, which :class:`featdenoise.data.datasets.SeededDataset` seeds per (epoch, index) so that a
resumed run sees exactly the same augmented images.

ImageNet training (official ``third_party/imagenet_utils.py`` ``fbresnet_augmentor``, after
fb.resnet.torch): GoogLeNet random-resized crop (8%-100% area, aspect 3/4-4/3, bicubic to 224),
then brightness x U(0.6, 1.4), contrast x U(0.6, 1.4) about the per-channel mean, saturation
1 + U(-0.4, 0.4) towards the grey image, and PCA lighting with std 0.1, in random order, each
saturating to [0, 1] (the official augmentors get uint8 images, so each one clips to 0-255), then
a horizontal flip. Evaluation: shortest edge to 256 (bicubic), centre crop 224.

Resizing (``resize_method``): ``"cv2"`` (default) is the official code's own resize,
``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` on the 8-bit image, for the training crop
(``GoogleNetRandomCropAndResize(interp=cv2.INTER_CUBIC)``, its fallback and the evaluation
``ResizeShortestEdge(256, cv2.INTER_CUBIC)``): bicubic with ``a = -0.75``, no antialiasing, the
result rounded and saturated to 0-255 by OpenCV, pixel for pixel what the official model was fed
(channels are resized independently, so RGB gives the official BGR pixels in the other order).
``"pil"`` uses Pillow / torchvision bicubic instead (``a = -0.5`` and antialiased when shrinking:
a low-pass filter the official pipeline does not have).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torchvision.transforms import InterpolationMode

# ImageNet PCA of RGB pixels in [0, 1] (fb.resnet.torch; the official code flips them for BGR).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# ITU-R 601 luma, as OpenCV's RGB2GRAY used by the official saturation augmentor.
_LUMA = (0.299, 0.587, 0.114)


RESIZE_METHODS = ("cv2", "pil")
"""``"cv2"``: OpenCV ``INTER_CUBIC`` as the official code; ``"pil"``: Pillow bicubic."""


def check_resize_method(method: str) -> str:
    """``method`` if it is one of :data:`RESIZE_METHODS`, else a ValueError naming them."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; choose one of "
                         f"{', '.join(RESIZE_METHODS)}")
    return method


def resize_uint8(arr: np.ndarray, width: int, height: int, method: str = "cv2") -> np.ndarray:
    """Bicubic resize of an 8-bit image ``[H, W]`` or ``[H, W, C]`` to ``[height, width(, C)]``.

    ``"cv2"``: ``cv2.resize(arr, (width, height), interpolation=cv2.INTER_CUBIC)`` on the uint8
    array itself, as the official code (a = -0.75, no antialiasing, OpenCV's rounding and
    saturation to 0-255); ``"pil"``: Pillow ``BICUBIC`` (a = -0.5, antialiased when shrinking).
    Returns uint8.
    """
    check_resize_method(method)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if method == "cv2":
        out = cv2.resize(arr, (int(width), int(height)), interpolation=cv2.INTER_CUBIC)
        return out.reshape(int(height), int(width), *arr.shape[2:])  # cv2 drops a 1-channel dim
    img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    out = np.asarray(img.resize((int(width), int(height)), Image.Resampling.BICUBIC))
    return out.reshape(int(height), int(width), *arr.shape[2:])


def shortest_edge_centre_crop(arr: np.ndarray, short: int, size: int,
                              method: str = "cv2") -> np.ndarray:
    """Official ``ResizeShortestEdge(short)`` then ``CenterCrop(size)`` on ``[H, W(, C)]`` uint8.

    The short side becomes ``short``, the long one ``int(long * short / short_side + 0.5)``; the
    crop starts at ``int((new - size) * 0.5)`` on each axis (tensorpack's rounding).
    """
    h, w = arr.shape[:2]
    scale = short / min(h, w)
    if h < w:
        nh, nw = short, int(scale * w + 0.5)
    else:
        nh, nw = int(scale * h + 0.5), short
    out = resize_uint8(arr, nw, nh, method)
    top, left = int((nh - size) * 0.5), int((nw - size) * 0.5)
    return out[top:top + size, left:left + size]


class GoogleNetResize:
    """Random crop of 8%-100% of the area with aspect ratio in [3/4, 4/3], resized to ``size``.

    As tensorpack's ``GoogleNetRandomCropAndResize(interp=cv2.INTER_CUBIC)`` of the official
    code: area fraction and aspect ratio are uniform (not log-uniform), width and height are
    swapped with probability 1/2, 10 tries, then a fallback of shortest-edge resize to ``size`` +
    centre crop (:func:`shortest_edge_centre_crop`). Crop offsets are drawn from
    ``[0, w - ww)`` as in the tensorpack of the paper's time (Dec. 2018; versions from Aug. 2019
    on also allow ``w - ww``). Input and output are 8-bit PIL images;
    ``resize_method`` as :func:`resize_uint8` (default ``"cv2"``, the official resize).
    """

    def __init__(self, size: int = 224, area: tuple = (0.08, 1.0), ratio: tuple = (0.75, 1.333),
                 resize_method: str = "cv2"):
        self.size, self.area, self.ratio = size, area, ratio
        self.resize_method = check_resize_method(resize_method)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        arr = np.asarray(img)  # [H, W, C] uint8
        for _ in range(10):
            u = torch.rand(3).tolist()
            target = (self.area[0] + u[0] * (self.area[1] - self.area[0])) * w * h
            aspect = self.ratio[0] + u[1] * (self.ratio[1] - self.ratio[0])
            ww = int(math.sqrt(target * aspect) + 0.5)
            hh = int(math.sqrt(target / aspect) + 0.5)
            if u[2] < 0.5:
                ww, hh = hh, ww
            if hh <= h and ww <= w:
                x1 = 0 if w == ww else int(torch.randint(0, w - ww, ()).item())
                y1 = 0 if h == hh else int(torch.randint(0, h - hh, ()).item())
                crop = arr[y1:y1 + hh, x1:x1 + ww]
                return Image.fromarray(
                    resize_uint8(crop, self.size, self.size, self.resize_method))
        return Image.fromarray(
            shortest_edge_centre_crop(arr, self.size, self.size, self.resize_method))


class ShortestEdgeCentreCrop:
    """PIL image -> PIL image: :func:`shortest_edge_centre_crop` (official evaluation resize)."""

    def __init__(self, short: int, size: int, resize_method: str = "cv2"):
        self.short, self.size = short, size
        self.resize_method = check_resize_method(resize_method)

    def __call__(self, img: Image.Image) -> Image.Image:
        return Image.fromarray(shortest_edge_centre_crop(np.asarray(img), self.short, self.size,
                                                         self.resize_method))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


class Brightness:
    """``x * U(lo, hi)`` on a float image ``[3, H, W]``."""

    def __init__(self, lo: float = 0.6, hi: float = 1.4):
        self.lo, self.hi = lo, hi

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * _uniform(self.lo, self.hi)


class Contrast:
    """``(x - mean) * r + mean``, mean per channel, ``r ~ U(lo, hi)`` (tensorpack ``Contrast``)."""

    def __init__(self, lo: float = 0.6, hi: float = 1.4):
        self.lo, self.hi = lo, hi

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = _uniform(self.lo, self.hi)
        mean = x.mean(dim=(-2, -1), keepdim=True)  # [3, 1, 1]
        return x * r + mean * (1 - r)


class Saturation:
    """``x * a + grey * (1 - a)`` with ``a = 1 + U(-alpha, alpha)`` and grey the luma image."""

    def __init__(self, alpha: float = 0.4):
        self.alpha = alpha

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = 1 + _uniform(-self.alpha, self.alpha)
        luma = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
        grey = (x * luma).sum(dim=0, keepdim=True)  # [1, H, W]
        return x * a + grey * (1 - a)


class Lighting:
    """AlexNet PCA lighting: add ``eigvec @ (N(0, std^2) * eigval)`` to every pixel (RGB)."""

    def __init__(self, std: float = 0.1, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC):
        self.std = std
        self.eigval = torch.tensor(eigval)
        self.eigvec = torch.tensor(eigvec)  # [3 channels, 3 eigenvectors]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.randn(3) * self.std * self.eigval  # [3]
        inc = self.eigvec @ v  # [3]
        return x + inc.to(x.dtype).view(3, 1, 1)


class Clamp01:
    """Clip to the valid pixel range [0, 1]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0.0, 1.0)


def imagenet_train(size: int = 224, resize_method: str = "cv2") -> v2.Compose:
    """Official training augmentation (module docstring); PIL image -> float ``[3, size, size]``.

    ``resize_method``: ``"cv2"`` (official ``INTER_CUBIC``) or ``"pil"`` (:func:`resize_uint8`).
    """
    return v2.Compose([
        GoogleNetResize(size, resize_method=resize_method),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomOrder([v2.Compose([op, Clamp01()])
                        for op in (Brightness(), Contrast(), Saturation(), Lighting())]),
        v2.RandomHorizontalFlip(),
    ])


def imagenet_eval(size: int = 224, resize: int | None = None,
                  resize_method: str = "cv2") -> v2.Compose:
    """Shortest edge to ``resize`` (256 for 224) bicubic, centre crop ``size``; -> float [0, 1].

    ``resize_method="cv2"`` (default): the official ``ResizeShortestEdge(256, cv2.INTER_CUBIC)``
    + ``CenterCrop(224)`` pixel for pixel (:func:`shortest_edge_centre_crop`); ``"pil"``:
    torchvision's antialiased bicubic ``Resize`` + ``CenterCrop``.
    """
    resize = resize if resize is not None else round(size * 256 / 224)
    if check_resize_method(resize_method) == "cv2":
        crop = [ShortestEdgeCentreCrop(resize, size, "cv2")]
    else:
        crop = [v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(size)]
    return v2.Compose([*crop, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])


def small_train(size: int, padding: int, flip: bool = True) -> v2.Compose:
    """CIFAR-style augmentation on a uint8 tensor ``[C, H, W]``: pad-and-crop (+ flip)."""
    steps = [v2.RandomCrop(size, padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def small_eval() -> v2.Compose:
    """uint8 ``[C, H, W]`` -> float in [0, 1]."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
