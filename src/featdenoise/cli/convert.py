"""``featdenoise convert``: an official tensorpack ``.npz`` -> self-describing ``.safetensors``."""

from __future__ import annotations

import argparse

import torch

from featdenoise.cli.common import positive_int
from featdenoise.hub.tensorpack import convert_tensorpack, load_converted


def _parse_blocks(text: str) -> list[int]:
    try:
        blocks = [int(b) for b in text.split(",")]
    except ValueError:
        blocks = []
    if len(blocks) != 4:
        raise argparse.ArgumentTypeError(f"--blocks wants 4 integers like 3,8,36,3, got {text!r}")
    return blocks


def _run(args: argparse.Namespace) -> int:
    model = convert_tensorpack(args.input, args.output, args.arch, depth=args.depth,
                               blocks=args.blocks)
    n_params = sum(p.numel() for p in model.parameters())
    # Set by create_model; nn.Module types an attribute it does not know as Tensor | Module.
    kwargs: dict = model.model_kwargs  # type: ignore[assignment]
    print(f"wrote {args.output}: {model.model_name} blocks={kwargs['blocks']} "
          f"({n_params / 1e6:.1f}M parameters)")
    if args.check:
        # Run both the npz-loaded and the re-read model once on the same image.
        x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(x)
            out = load_converted(args.output)(x)
        if not torch.isfinite(out).all():
            raise ValueError(f"{args.output}: the converted model gives non-finite logits")
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        top5 = out[0].topk(5).indices.tolist()
        print(f"check: logits {tuple(out.shape)} finite, top-5 classes {top5}, "
              f"max relative difference to the npz model {rel:.2e}")
        if rel > 1e-6:
            raise ValueError(f"{args.output}: re-read model differs from the npz model "
                             f"(relative {rel:.2e})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official tensorpack .npz to .safetensors",
                       description="Convert a checkpoint of the authors' TensorFlow code "
                                   "(R152.npz, R152-Denoise.npz, X101-DenoiseAll.npz) into a "
                                   ".safetensors file that featdenoise loads by itself.")
    p.add_argument("input", help="official .npz checkpoint")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--arch", required=True, choices=["ResNet", "ResNetDenoise",
                                                     "ResNeXtDenoiseAll"],
                   help="official --arch of the checkpoint")
    p.add_argument("--depth", type=int, default=None, choices=[50, 101, 152],
                   help="official -d (152 for R152*, 101 for X101-DenoiseAll)")
    p.add_argument("--blocks", type=_parse_blocks, default=None,
                   help="blocks per group a,b,c,d instead of --depth (default: read off the file)")
    p.add_argument("--check", action="store_true",
                   help="run the converted model once and compare with the npz-loaded one")
    p.add_argument("--size", type=positive_int, default=224,
                   help="image size for --check (default 224)")
    p.set_defaults(func=_run)
