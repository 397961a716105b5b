"""``featdenoise visualize``: feature-noise pictures and distances (paper Sec. 3, Figs. 1-3)."""

from __future__ import annotations

import argparse

import torch

from featdenoise.analysis import viz
from featdenoise.cli.common import (
    Budget255,
    Pixels255,
    int_list,
    nonnegative_int,
    output_folder,
    positive_int,
)
from featdenoise.cli.inputs import (
    add_data_args,
    add_model_args,
    dataset_from_args,
    models_from_args,
)
from featdenoise.hub.loading import check_compatible
from featdenoise.models import model_in_channels


def _run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    output_folder(args.out, "--out")
    (name, model, _), *rest = models_from_args(args)
    # model_in_channels falls back to 3 (RGB) itself; `or 3` only tells the type checker so.
    dataset = dataset_from_args(args, channels=model_in_channels(model) or 3)
    check_compatible(model, dataset, f"--data {args.data}")
    bad = [i for i in args.images if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(f"--images {bad[0]} is out of range: the dataset has {len(dataset)} "
                         "images (indices start at 0)")
    items = [dataset[i] for i in args.images]
    x = torch.stack([a for a, _ in items])  # [N, C, H, W]
    y = torch.tensor([int(b) for _, b in items])  # [N]
    attack = viz.NoiseAttack(eps=args.eps, steps=args.steps, step_size=args.step_size,
                             targeted=not args.untargeted, seed=args.seed)
    res = viz.visualize(model, x, y, args.out, stage=args.stage, channel=args.channel,
                        attack=attack, title=name)
    print(res["table"], end="")
    print(f"labels {res['labels']}, clean predictions {res['clean_pred']}, "
          f"adversarial predictions {res['adv_pred']}")
    for p in res["pictures"]:
        print(f"picture: {p}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize", help="feature maps of clean vs PGD images and their relative L2 distance",
        description="For chosen images: the clean image, its PGD counterpart, one channel of a "
                    "stage for both, and for denoising nets the maps right before/after each "
                    "denoising op (PNG grids), plus the relative L2 distance "
                    "||f(x_adv) - f(x)|| / ||f(x)|| at every stage and op (distances.md/json).")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--images", type=int_list, default=[0, 1, 2], metavar="I,J,K",
                   help="dataset indices of the images to show (default 0,1,2)")
    p.add_argument("--stage", default=None,
                   help="feature map to show (default res3 for ImageNet nets, stage2 for small)")
    p.add_argument("--channel", type=nonnegative_int, default=None,
                   help="channel to show (default: the one the attack changes most)")
    p.add_argument("--eps", action=Budget255, default=16 / 255,
                   help="L-inf eps, 0..255 scale (default 16)")
    p.add_argument("--steps", type=positive_int, default=10, help="PGD iterations (default 10)")
    p.add_argument("--step-size", action=Pixels255, default=1 / 255,
                   help="PGD step, 0..255 scale (paper rule max(step, eps/steps); default 1)")
    p.add_argument("--untargeted", action="store_true",
                   help="untargeted PGD (default: the paper's random-target attack)")
    p.add_argument("--seed", type=int, default=0, help="seed of targets and random start")
    p.add_argument("--out", default="reports/feature_noise", help="output folder")
    p.set_defaults(func=_run)
