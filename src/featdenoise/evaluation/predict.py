"""Predict a label for every image of a folder (the official ``main.py --eval-directory``).

This is how a defence takes part in a black-box competition (CAAD, paper Sec. 6.2): the organisers'
attackers write a folder of images, the defence writes ``filename,label`` for each.

Preprocessing as the official code does it: each file is decoded to 8-bit RGB (BGR there, which
its model expects; ours take RGB and flip inside the model), resized *naively* to ``size x size``
(no crop, aspect ratio not kept) by ``cv2.resize(img, (224, 224), interpolation=cv2.INTER_CUBIC)``
on the uint8 pixels, as the official ``main.py --eval-directory``, then scaled to [0, 1]: the same
pixels as the official input (OpenCV resizes each channel on its own, so the channel order does
not change them). ``resize_method="pil"`` uses Pillow's antialiased bicubic instead. ``size``
None keeps the files' own size (then they must all share it). Files are decoded by Pillow where
the official code uses ``cv2.imread``: the same pixels for PNG/BMP; JPEG decoders may differ.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featdenoise.data.files import ImageFiles, list_images, write_labels_csv
from featdenoise.models import model_in_channels, model_label
from featdenoise.runtime.distributed import resolve_device
from featdenoise.runtime.finite import check_finite_logits
from featdenoise.runtime.modes import eval_mode


def predict_folder(model: nn.Module, folder: str, *, size: int | None = 224,
                   batch_size: int = 32, device: torch.device | str | None = None,
                   num_workers: int = 0, progress: bool = True,
                   resize_method: str = "cv2") -> tuple[list[str], list[int]]:
    """Top-1 predictions for every image directly inside ``folder``, in sorted file-name order.

    Args:
        model: classifier on ``[N, C, H, W]`` pixels in [0, 1]; run in eval mode (restored after).
        folder: flat folder of image files (see :data:`featdenoise.data.files.IMAGE_EXTENSIONS`).
        size: bicubic resize to ``size x size`` (official: 224); None keeps each file's size.
        resize_method: ``"cv2"`` (default; official ``cv2.INTER_CUBIC`` on uint8, bit for bit)
            or ``"pil"`` (Pillow bicubic, antialiased when shrinking).
        batch_size: images per forward pass.
        device: default: the GPU if there is one, else the CPU.
        num_workers: DataLoader workers decoding images.
        progress: show a progress bar.

    Returns:
        ``(file names, predicted class indices)``.
    Raises:
        NonFiniteError: a batch's logits hold NaN or inf (one line naming the model and the
            files); no label is written for them.
    """
    device = torch.device(device) if device is not None else resolve_device()
    names = list_images(folder)
    ds = ImageFiles(folder, names, size=size, channels=model_in_channels(model),
                    resize_method=resize_method)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds: list[int] = []
    with eval_mode(model), torch.no_grad():
        model.to(device)
        for x, _ in tqdm(loader, desc="predict", unit="batch", disable=not progress,
                         dynamic_ncols=True):
            logits = model(x.to(device))  # [N, K]
            check_finite_logits(logits, model_label(model), names[len(preds):])
            preds += logits.argmax(1).tolist()  # [N]
    return names, preds


def predict_to_csv(model: nn.Module, folder: str, out: str, *, header: bool = True,
                   **kwargs) -> str:
    """Run :func:`predict_folder` and write ``filename,label`` lines to ``out`` after a header row
    that marks the file as ours (``header=False``: none, the official ``--prediction-file``
    form); see :func:`featdenoise.data.files.write_labels_csv`. Returns ``out``."""
    names, preds = predict_folder(model, folder, **kwargs)
    write_labels_csv(out, names, preds, header=header)
    return out
