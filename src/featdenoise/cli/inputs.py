"""Arguments shared by the commands that take a model and data (``eval``, ``blackbox``,
``visualize``, ``predict``): the model options (:mod:`featdenoise.hub.specs`), the data
options, the device, the table print; the loading itself is :mod:`featdenoise.hub.loading`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

from featdenoise.attacks.registry import ATTACKS, AUTOATTACK_ATTACKS
from featdenoise.cli.common import (
    int_list,
    json_object,
    positive_int,
)
from featdenoise.hub.loading import SpecOptions, load_dataset, load_model_spec
from featdenoise.runtime import distributed, outdir


def add_model_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    """``--model SPEC`` / ``--checkpoint`` (repeatable when ``multiple``) or ``--official NPZ
    --arch [--depth]``, and the options of library and user-code specs."""
    g = p.add_argument_group(
        "model (--model, --checkpoint or --official)",
        "SPEC: a run folder, checkpoint.pt or model.safetensors; torchvision:NAME; timm:NAME; "
        "robustbench:NAME (with --model-dir); PATH.py:FUNCTION or package.module:FUNCTION (your "
        "code: it is imported, so it runs); or a featdenoise model name. Nothing is downloaded.")
    action: dict[str, Any] = {"action": "append", "default": []} if multiple else {}
    again = "; repeat for several models in one table and plot" if multiple else ""
    g.add_argument("--model", metavar="SPEC", **action, help="the model" + again)
    g.add_argument("--checkpoint", metavar="PATH", **action,
                   help="run directory, checkpoint.pt or model.safetensors" + again)
    g.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                   help="keyword arguments of a library or code --model, e.g. "
                        "'{\"num_classes\": 10}'")
    g.add_argument("--weights", metavar="FILE",
                   help="weights of a library or code --model: .safetensors, or a .pt/.pth state "
                        "dict (read with weights_only=True; {'state_dict': ...} and 'module.' "
                        "accepted)")
    g.add_argument("--normalize", metavar="NORM",
                   help="imagenet, cifar10, none or M1,M2,M3/S1,S2,S3: a normalisation layer in "
                        "front of a library or code --model, which then takes [0, 1] pixels "
                        "(default: imagenet for torchvision, the model's own for timm, else none)")
    g.add_argument("--model-dir", metavar="DIR",
                   help="RobustBench checkpoints (DIR/DATASET/THREAT/NAME.pt) for robustbench:NAME")
    g.add_argument("--official", metavar="NPZ",
                   help="an official tensorpack checkpoint (R152.npz, R152-Denoise.npz, ...)")
    g.add_argument("--arch", choices=["ResNet", "ResNetDenoise", "ResNeXtDenoiseAll"],
                   help="official --arch of the --official checkpoint")
    g.add_argument("--depth", type=int, choices=[50, 101, 152],
                   help="official -d of the --official checkpoint")
    g.add_argument("--blocks", type=int_list, metavar="A,B,C,D",
                   help="blocks per group of the --official checkpoint instead of --depth")


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help="fashion_mnist, cifar10, imagenet, or 'folder' (a flat folder of images "
                        "given by --data-root, labels from --labels)")
    g.add_argument("--data-root", metavar="DIR",
                   help="dataset folder (default: the dataset's own)")
    g.add_argument("--split", default="val", help="train or val (default val)")
    g.add_argument("--labels", metavar="CSV", help="filename,label lines for --data folder")
    g.add_argument("--image-size", type=positive_int, default=224,
                   help="ImageNet crop size (default 224; resize 256 + centre crop)")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate a fixed random subset of N images (same subset every run)")


def models_from_args(args: argparse.Namespace) -> list[tuple[str, nn.Module, dict]]:
    """``[(name, model, source facts)]`` from ``--model`` / ``--checkpoint`` / ``--official``."""
    def listed(value) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    specs, ckpts = listed(getattr(args, "model", None)), listed(args.checkpoint)
    if not (specs or ckpts or args.official):
        raise ValueError("give the model as --model SPEC, --checkpoint PATH or --official NPZ "
                         "--arch ARCH")
    if len(specs) + len(ckpts) + bool(args.official) > 1 and not isinstance(args.checkpoint, list):
        raise ValueError("give one model: --model, --checkpoint or --official")
    options = SpecOptions(kwargs=getattr(args, "model_kwargs", None),
                          weights=getattr(args, "weights", None),
                          normalize=getattr(args, "normalize", None),
                          model_dir=getattr(args, "model_dir", None))
    if len(specs) > 1 and options.given():
        raise ValueError("--model-kwargs, --weights, --normalize and --model-dir describe one "
                         "--model; evaluate such models one at a time")
    if options.given() and not specs:
        raise ValueError("--model-kwargs, --weights, --normalize and --model-dir go with --model "
                         "SPEC (a checkpoint carries its own)")
    out = [load_model_spec(spec, options) for spec in specs]
    for path in ckpts:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--checkpoint {path} does not exist")
        out.append(load_model_spec(path))
    if args.official:
        if not args.arch:
            raise ValueError(f"--official {args.official} needs --arch (ResNet, ResNetDenoise or "
                             "ResNeXtDenoiseAll; see the official model zoo)")
        out.append(load_model_spec(args.official, arch=args.arch, depth=args.depth,
                                   blocks=args.blocks))
    # One path component each, unique: they name output folders and legends.
    names = outdir.unique_names([n for n, _, _ in out])
    return [(n, m, src) for n, (_, m, src) in zip(names, out, strict=True)]


def split_source(item: str) -> tuple[str, str | None]:
    """``--source SPEC[@WEIGHTS]`` -> ``(SPEC, WEIGHTS or None)``. An ``@`` inside a path is kept:
    an existing file or folder named by the whole item is a spec without weights, and the split
    is at the first ``@`` after which an existing file follows (else at the first ``@``, so a
    missing weights file is reported as missing)."""
    if os.path.exists(item):
        return item, None
    cuts = [i for i, c in enumerate(item) if c == "@" and 0 < i < len(item) - 1]
    for i in cuts:
        if os.path.isfile(item[i + 1:]):
            return item[:i], item[i + 1:]
    if cuts:
        return item[:cuts[0]], item[cuts[0] + 1:]
    return item, None


def dataset_from_args(args: argparse.Namespace, channels: int = 3):
    """The evaluation dataset of ``--data`` (a named dataset, or ``folder`` + ``--labels``)."""
    return load_dataset(args.data, root=args.data_root, split=args.split, labels=args.labels,
                        image_size=args.image_size, channels=channels)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU (joins torchrun's group)."""
    return distributed.init(name, what="--device")


SWEEPS = tuple(ATTACKS)  # the attacks' registry names every choice of --attack
AUTOATTACK = tuple(AUTOATTACK_ATTACKS)


def split_attacks(args: argparse.Namespace) -> tuple[str | None, dict | None]:
    """``--attack pgd,autoattack`` -> ``("pgd", {AutoAttack settings})``; one sweep at most."""
    names = [a.lower() for a in args.attack]
    unknown = [a for a in names if a not in (*SWEEPS, "autoattack", *AUTOATTACK)]
    if unknown or not names:
        raise ValueError(f"--attack {unknown[0] if unknown else ''!r} is unknown; use "
                         f"{', '.join(SWEEPS)}, autoattack, or AutoAttack parts "
                         f"({', '.join(AUTOATTACK)}), comma-separated")
    sweeps = [a for a in names if a in SWEEPS]
    if len(sweeps) > 1:
        raise ValueError(f"--attack {','.join(names)}: one iteration sweep at a time "
                         f"({' or '.join(sweeps)})")
    parts = [a for a in names if a in AUTOATTACK]
    aa = None
    if "autoattack" in names or parts:
        aa = {"version": args.version, "attacks": parts or None, "steps": args.aa_steps,
              "n_target_classes": args.aa_targets, "n_queries": args.aa_queries}
    return (sweeps[0] if sweeps else None), aa


def add_exact_arg(g) -> None:
    """``--exact``: attacks without the speed layer (bit for bit as written); ``--fast`` is kept
    as an accepted no-op (the speed layer is on by default)."""
    g.add_argument("--exact", action="store_true",
                   help="run attacks without the speed layer (BatchNorm folding, packed "
                        "convolutions): bit-for-bit as written, ~1.3-1.6x slower on a CPU")
    g.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)


def add_restart_arg(g) -> None:
    """``--restart``: discard another evaluation found in ``--out`` instead of refusing."""
    g.add_argument("--restart", action="store_true",
                   help="if --out holds an evaluation with other settings, model or images, "
                        "discard it and start over (default: refuse)")


def print_table(path: str) -> None:
    with open(path) as f:
        print(f.read(), end="")


def check_run_args(args: argparse.Namespace) -> None:
    """One clear error for an impossible option value, named as the user typed it."""
    # --eps and --step-size are bounded where they are parsed (Budget255, Step255).
    for opt in ("steps",):
        values = getattr(args, opt, None) or []
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"--steps {','.join(map(str, values))}: iteration counts must be "
                             f">= 1 (got {bad[0]})")
    for opt in ("restarts", "batch_size", "limit", "sanity_images", "source_steps", "aa_steps",
                "aa_targets", "aa_queries"):
        v = getattr(args, opt, None)
        if v is not None and v < 1:
            raise ValueError(f"--{opt.replace('_', '-')} {v} must be >= 1")
