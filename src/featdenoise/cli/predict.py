"""``featdenoise predict DIR --out predictions.csv``: a label for every image of a folder.

The official ``main.py --eval-directory``: every image directly in DIR, resized naively (no crop)
to ``--size`` (224 by default for ``--official`` models; checkpoints keep the files' size unless
``--size`` is given) by OpenCV ``INTER_CUBIC`` as the official code (``--resize pil``: Pillow
bicubic), classified; ``filename,label`` lines written after a
``filename,featdenoise_prediction`` header row, which marks the file as ours: a later run replaces
it, and nothing else (``--no-header``: the official headerless form, written only where no file
exists yet).
"""

from __future__ import annotations

import argparse
import os

from featdenoise.cli.common import nonnegative_int, output_file, positive_int
from featdenoise.cli.inputs import add_model_args, models_from_args, resolve_device
from featdenoise.data.files import is_predictions_csv
from featdenoise.evaluation.predict import predict_to_csv
from featdenoise.runtime import distributed


def check_paths(args: argparse.Namespace) -> None:
    """DIR must be a folder; --out a file that may be (re)written: not a folder, not an input, not
    a file of another program (only an earlier predictions file of ours, recognised by its header
    row, is replaced)."""
    if os.path.isfile(args.dir):
        raise ValueError(f"DIR {args.dir} is a file; predict classifies every image directly "
                         f"inside a folder: pass the folder that holds it "
                         f"({os.path.dirname(os.path.abspath(args.dir))})")
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"DIR {args.dir} does not exist; pass a folder of images")
    output_file(args.out, "--out", ours=is_predictions_csv)


def _run(args: argparse.Namespace) -> int:
    check_paths(args)
    device = resolve_device(args.device)
    try:
        if distributed.world_size() > 1:
            raise ValueError("predict runs in one process; start it without torchrun")
        ((_, model, _),) = models_from_args(args)
        size = args.size
        if size is None and args.official:
            size = 224
        if size == 0:
            size = None
        out = predict_to_csv(model, args.dir, args.out, size=size, batch_size=args.batch_size,
                             device=device, num_workers=args.workers,
                             progress=not args.no_progress, resize_method=args.resize,
                             header=not args.no_header)
        print(f"predictions: {out}")
        return 0
    finally:
        distributed.shutdown()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="write filename,label for every image of a folder (--eval-directory)",
        description="Classify every image directly inside DIR and write 'filename,label' lines "
                    "as the official --eval-directory / --prediction-file, after a header row "
                    "that marks the file as featdenoise's (only such a file is ever replaced).")
    p.add_argument("dir", metavar="DIR", help="flat folder of images")
    add_model_args(p)
    p.add_argument("--out", default="predictions.csv",
                   help="CSV to write (default predictions.csv)")
    p.add_argument("--size", type=nonnegative_int, default=None,
                   help="bicubic resize to SIZE x SIZE, no crop (default 224 with --official, "
                        "else the files' own size; 0 keeps it)")
    p.add_argument("--resize", choices=("cv2", "pil"), default="cv2",
                   help="how --size resizes: cv2 = cv2.resize INTER_CUBIC on 8-bit pixels, the "
                        "official code bit for bit (default); pil = Pillow bicubic, antialiased")
    p.add_argument("--no-header", action="store_true",
                   help="no header row (the official headerless form); such a file cannot be "
                        "told from a labels file, so a later run will not replace it")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=nonnegative_int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
