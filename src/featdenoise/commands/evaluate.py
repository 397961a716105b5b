"""``featdenoise eval``: white-box robustness sweep (paper Sec. 6.1, Fig. 6) or a merge of sweeps.

Also holds the argument helpers shared by ``blackbox``, ``visualize`` and ``predict`` (model and
data options); the loading itself is :mod:`featdenoise.loading`.
eps and step size are given on the 0..255 pixel scale, as in the paper and the official flags
(``--eps 16`` is 16/255 on the [0, 1] pixels the library uses).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from featdenoise.commands.common import (
    FiniteFloat,
    int_list,
    json_object,
    nonnegative_int,
    positive_int,
    str_list,
)
from featdenoise.loading import load_model_spec
from featdenoise.runtime import outdir


# --------------------------------------------------------------------------- shared helpers
def add_model_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    """``--model SPEC`` / ``--checkpoint`` (repeatable when ``multiple``) or ``--official NPZ
    --arch [--depth]``, and the options of library and user-code specs."""
    g = p.add_argument_group(
        "model (--model, --checkpoint or --official)",
        "SPEC: a run folder, checkpoint.pt or model.safetensors; torchvision:NAME; timm:NAME; "
        "robustbench:NAME (with --model-dir); PATH.py:FUNCTION or package.module:FUNCTION (your "
        "code: it is imported, so it runs); or a featdenoise model name. Nothing is downloaded.")
    action = {"action": "append", "default": []} if multiple else {}
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
    options = {"kwargs": getattr(args, "model_kwargs", None),
               "weights": getattr(args, "weights", None),
               "normalize": getattr(args, "normalize", None),
               "model_dir": getattr(args, "model_dir", None)}
    if len(specs) > 1 and any(options.values()):
        raise ValueError("--model-kwargs, --weights, --normalize and --model-dir describe one "
                         "--model; evaluate such models one at a time")
    if any(options.values()) and not specs:
        raise ValueError("--model-kwargs, --weights, --normalize and --model-dir go with --model "
                         "SPEC (a checkpoint carries its own)")
    out = [load_model_spec(spec, **options) for spec in specs]
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


def dataset_from_args(args: argparse.Namespace, channels: int = 3):
    """The evaluation dataset of ``--data`` (a named dataset, or ``folder`` + ``--labels``)."""
    from featdenoise.loading import load_dataset

    return load_dataset(args.data, root=args.data_root, split=args.split, labels=args.labels,
                        image_size=args.image_size, channels=channels)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU (joins torchrun's group)."""
    from featdenoise.runtime import distributed

    return distributed.init(name, what="--device")


SWEEPS = ("pgd", "fgsm", "ifgsm", "mifgsm")
AUTOATTACK = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


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


# --------------------------------------------------------------------------- eval
def _run(args: argparse.Namespace) -> int:
    from featdenoise.evaluation import report

    outdir.output_dir(args.out, "--out", create=False)
    if args.plot:
        paths = report.merge_runs(args.plot, args.out, title=args.title)
        print_table(paths["table"])
        if paths['plot']:
            print(f"plot: {paths['plot']}")
        return 0
    if args.data is None:
        raise ValueError("--data is required (or --plot RUN ... to merge finished evaluations)")
    check_run_args(args)
    device = resolve_device(args.device)
    try:
        return _evaluate(args, device)
    finally:
        from featdenoise.runtime import distributed

        distributed.shutdown()


def check_run_args(args: argparse.Namespace) -> None:
    """One clear error for an impossible option value, named as the user typed it."""
    if not 0 < args.eps <= 255:
        raise ValueError(f"--eps {args.eps:g} is outside (0, 255]; eps is on the 0..255 pixel "
                         "scale (the paper's 16)")
    if getattr(args, "step_size", 1.0) <= 0:
        raise ValueError(f"--step-size {args.step_size:g} must be > 0 (0..255 scale, e.g. 1)")
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


def _evaluate(args: argparse.Namespace, device: torch.device) -> int:
    from featdenoise.evaluation import report
    from featdenoise.evaluation.whitebox import evaluate_whitebox
    from featdenoise.loading import check_compatible
    from featdenoise.models import model_in_channels
    from featdenoise.runtime import distributed

    sweep, aa = split_attacks(args)
    models = models_from_args(args)
    several = len(models) > 1
    summaries = []
    code = 0
    for name, model, source in models:
        dataset = dataset_from_args(args, model_in_channels(model))
        check_compatible(model, dataset, f"--data {args.data}")
        if args.sanity:
            ok = _sanity(model, dataset, args, device)
            if not ok:
                print(f"featdenoise eval: sanity checks failed for {name}; its robustness "
                      "numbers would not be trustworthy, so it is not evaluated", file=sys.stderr)
                code = 1
                continue
        out = outdir.child(args.out, name, "evaluation folder") if several else args.out
        outdir.output_dir(out, "--out", create=False)
        summary = evaluate_whitebox(
            model, dataset, out, steps=args.steps, attack=sweep, autoattack=aa, eps=args.eps / 255,
            step_size=args.step_size / 255, restarts=args.restarts, targeted=not args.untargeted,
            step_rule=args.step_rule, seed=args.seed, batch_size=args.batch_size,
            limit=args.limit, name=args.name if (args.name and not several) else name,
            device=device, num_workers=args.workers, progress=not args.no_progress,
            exact=args.exact, restart=args.restart,
            extra={"source": source, "data": args.data, "split": args.split},
        )
        if summary is not None:
            summaries.append(summary)
            if not several:
                print_table(os.path.join(out, report.TABLE_FILE))
                print(f"results: {out}")
    if several and summaries and distributed.is_main():
        paths = report.write_report(summaries, args.out, title=args.title)
        print_table(paths["table"])
        if paths['plot']:
            print(f"plot: {paths['plot']}")
    return code


def _sanity(model: nn.Module, dataset, args: argparse.Namespace, device: torch.device) -> bool:
    """Run :func:`featdenoise.evaluation.sanity.run_sanity` on a few images; print its report."""
    try:
        from featdenoise.evaluation import sanity
    except ImportError as err:
        raise ValueError(f"--sanity needs featdenoise.evaluation.sanity ({err})") from None
    if not hasattr(sanity, "run_sanity"):
        raise ValueError("--sanity needs featdenoise.evaluation.sanity.run_sanity, which this "
                         "installation lacks")
    from torch.utils.data import DataLoader, Subset

    from featdenoise.data.datasets import subset_indices

    idx = subset_indices(len(dataset), args.limit, args.seed)[: args.sanity_images]
    loader = DataLoader(Subset(dataset, idx), batch_size=args.batch_size)
    model.to(device)
    results = sanity.run_sanity(
        model, loader, args.eps / 255, min(args.steps), device, targeted=not args.untargeted,
        max_images=args.sanity_images, seed=args.seed, restarts=args.sanity_restarts,
        exact=args.exact)
    fmt = getattr(sanity, "format_report", None)
    print(fmt(results) if fmt else "\n".join(str(r) for r in results))
    return all(getattr(r, "passed", bool(r)) for r in results)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="white-box PGD evaluation: accuracy and attack success vs iterations (Fig. 6)",
        description="Clean top-1/top-5, then accuracy and targeted attack success rate for each "
                    "attack iteration count (paper Sec. 6.1, Fig. 6). Per-image outcomes, "
                    "summary.json, table.md and accuracy_vs_iterations.png go to --out. "
                    "Resumable (rerun the same command) and distributed with torchrun.")
    add_model_args(p, multiple=True)
    add_data_args(p, required=False)
    g = p.add_argument_group("attack (eps and step on the 0..255 scale)")
    g.add_argument("--attack", type=str_list, default=["pgd"], metavar="A[,A...]",
                   help="pgd (default, the paper's), fgsm, ifgsm or mifgsm (an iteration "
                        "sweep over --steps), and/or autoattack (or some of apgd-ce, apgd-dlr, "
                        "apgd-t, fab-t, square), all on the same images, e.g. pgd,autoattack")
    g.add_argument("--version", default="standard", choices=["standard", "rand"],
                   help="AutoAttack version (rand: APGD-CE + APGD-DLR with EOT 20)")
    g.add_argument("--aa-steps", type=positive_int, default=None, metavar="N",
                   help="APGD/FAB iterations (default 100; fewer is weaker than AutoAttack)")
    g.add_argument("--aa-targets", type=positive_int, default=None, metavar="N",
                   help="APGD-T/FAB-T target classes (default 9, at most classes - 1)")
    g.add_argument("--aa-queries", type=positive_int, default=None, metavar="N",
                   help="Square queries (default 5000; fewer is weaker than AutoAttack)")
    g.add_argument("--steps", type=int_list, default=[10, 100, 1000], metavar="N,N,...",
                   help="attack iterations (default 10,100,1000)")
    g.add_argument("--restarts", type=positive_int, default=1,
                   help="random restarts per attack (PGD)")
    g.add_argument("--eps", action=FiniteFloat, default=16.0,
                   help="L-inf radius on the 0..255 scale (default 16, the paper's)")
    g.add_argument("--step-size", action=FiniteFloat, default=1.0,
                   help="step on the 0..255 scale (default 1; see --step-rule)")
    g.add_argument("--step-rule", default="paper", choices=["paper", "fixed"],
                   help="paper: step = max(step, eps/steps), i.e. 1.6 for 10 steps (Sec. 6.1)")
    add_exact_arg(g)
    g.add_argument("--untargeted", action="store_true",
                   help="untargeted attack (default: the paper's targeted attack, random target)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (reused to resume)")
    add_restart_arg(r)
    r.add_argument("--name", help="model label in the table and plot (default: from the path)")
    r.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per batch (per process)")
    r.add_argument("--seed", type=int, default=0, help="seeds targets, random starts, --limit")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--workers", type=nonnegative_int, default=0, help="data loader workers")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--plot", nargs="+", metavar="RUN",
                   help="instead of evaluating: merge finished evaluation folders into one table "
                        "and plot in --out")
    r.add_argument("--title", help="plot title")
    r.add_argument("--sanity", action="store_true",
                   help="first run the gradient-masking sanity checks on a few images; a model "
                        "that fails them is not evaluated (exit status 1)")
    r.add_argument("--sanity-images", type=positive_int, default=64, help="images for --sanity")
    r.add_argument("--sanity-restarts", type=positive_int, default=5,
                   help="random restarts compared with one start in --sanity (default 5)")
    p.set_defaults(func=_run)
