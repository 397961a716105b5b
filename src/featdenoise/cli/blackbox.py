"""``featdenoise blackbox``: accuracy per attacker and all-or-nothing accuracy (paper Sec. 6.2).

Attackers: transfer attacks crafted on ``--source`` models (registered model names or
checkpoints) with ``--source-attacks`` at ``--eps`` (default 32 on the 0..255 scale, the CAAD
black-box setting), and folders of adversarial images (``--adv-dirs``) matched to the clean images
by file name. The clean images are a dataset (``--data``) or a folder (``--clean-dir`` with
``--labels``).
"""

from __future__ import annotations

import argparse
import os

from featdenoise.cli.common import Budget255, Pixels255, nonnegative_int, positive_int, str_list
from featdenoise.cli.inputs import (
    add_data_args,
    add_exact_arg,
    add_model_args,
    add_restart_arg,
    check_run_args,
    dataset_from_args,
    models_from_args,
    print_table,
    resolve_device,
    split_source,
)
from featdenoise.data.files import labelled_folder
from featdenoise.evaluation import blackbox as bb
from featdenoise.evaluation.options import RunOptions
from featdenoise.hub.loading import SpecOptions, check_compatible, load_model_spec
from featdenoise.models import model_in_channels, model_num_classes
from featdenoise.runtime import distributed, outdir


def _run(args: argparse.Namespace) -> int:
    check_run_args(args)
    outdir.output_dir(args.out, "--out", create=False)
    if args.save_adv:
        outdir.output_dir(args.save_adv, "--save-adv", create=False)
    device = resolve_device(args.device)
    try:
        ((name, model, source),) = models_from_args(args)
        channels = model_in_channels(model)
        if args.clean_dir:
            if args.data:
                raise ValueError("give the clean images as --data or as --clean-dir, not both")
            if not args.labels:
                raise ValueError("--clean-dir needs --labels CSV (filename,label lines)")
            dataset = labelled_folder(args.clean_dir, args.labels, channels)
        elif args.data:
            dataset = dataset_from_args(args, channels)
        else:
            raise ValueError("give the clean images: --data NAME or --clean-dir DIR --labels CSV")
        check_compatible(model, dataset, "the clean images")
        attackers: list[bb.TransferAttacker | bb.FolderAttacker] = []
        k = model_num_classes(model)
        for item in args.source:
            spec, weights = split_source(item)
            kwargs = {"num_classes": k} if spec.split(":")[0] in ("torchvision", "timm") else None
            src_name, src, _ = load_model_spec(
                spec, SpecOptions(kwargs=kwargs, weights=weights or None), num_classes=k,
                in_channels=channels)
            src_channels = model_in_channels(src)
            if src_channels != channels:
                raise ValueError(f"--source {spec} takes {src_channels}-channel images but the "
                                 f"clean images have {channels}; use a source trained on this "
                                 "data")
            attackers += bb.transfer_attackers(
                [(src_name, src)], args.source_attacks, steps=args.source_steps,
                step_size=args.source_step_size, targeted=args.targeted)
        if args.adv_dirs:
            attackers += bb.folder_attackers(args.adv_dirs, allow_missing=args.allow_missing)
        options = RunOptions(
            batch_size=args.batch_size, limit=args.limit, seed=args.seed, name=args.name or name,
            device=device, num_workers=args.workers, progress=not args.no_progress,
            exact=args.exact, restart=args.restart,
            extra={"source": source, "data": args.data or os.path.abspath(args.clean_dir)})
        summary = bb.evaluate_blackbox(
            model, dataset, args.out, attackers, options=options, eps=args.eps,
            clip_eps=args.clip_eps, targeted=args.targeted, save_adv=args.save_adv)
        if summary is not None and distributed.is_main():
            print_table(os.path.join(args.out, "table.md"))
            for attacker, n in summary.get("missing", {}).items():
                if n:
                    print(f"{attacker}: the clean image stood in for {n} missing file(s) "
                          "(--allow-missing)")
            print(f"results: {args.out}")
        return 0
    finally:
        distributed.shutdown()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "blackbox", help="black-box defence: accuracy per attacker and all-or-nothing (Table 2)",
        description="Accuracy of the defended model against each attacker and the all-or-nothing "
                    "accuracy (an image counts only if every attacker's version is classified "
                    "correctly; paper Sec. 6.2). eps on the 0..255 scale.")
    add_model_args(p)
    add_data_args(p, required=False)
    p.add_argument("--clean-dir", metavar="DIR",
                   help="clean images as a flat folder (with --labels) instead of --data")
    a = p.add_argument_group("attackers")
    a.add_argument("--source", type=str_list, default=[], metavar="MODEL[,MODEL...]",
                   help="source models for transfer attacks: model specs as for --model "
                        "(run folders, FILE.npz:ARCH[:DEPTH], torchvision:NAME, timm:NAME, "
                        "PATH.py:FUNCTION, registry names), each optionally SPEC@WEIGHTS "
                        "(torchvision and timm sources get num_classes of the target)")
    a.add_argument("--source-attacks", type=str_list, default=list(bb.TRANSFER_ATTACKS),
                   metavar="A[,A...]", help="attacks run on each source (default: all of "
                        f"{','.join(bb.TRANSFER_ATTACKS)})")
    a.add_argument("--source-steps", type=positive_int, default=10, help="iterations (default 10)")
    a.add_argument("--source-step-size", action=Pixels255, default=1 / 255,
                   help="step on the 0..255 scale; max(step, eps/steps) is used (default 1)")
    a.add_argument("--targeted", action="store_true",
                   help="targeted transfer attacks (default untargeted, the CAAD 2017 "
                        "non-targeted track the paper's attackers come from)")
    a.add_argument("--eps", action=Budget255, default=32 / 255,
                   help="L-inf radius on the 0..255 scale (default 32, CAAD black-box setting)")
    a.add_argument("--adv-dirs", nargs="+", default=[], metavar="DIR",
                   help="folders of adversarial images named like the clean images")
    a.add_argument("--allow-missing", action="store_true",
                   help="a clean image stands in where an --adv-dirs folder lacks a file")
    a.add_argument("--clip-eps", action="store_true",
                   help="clip --adv-dirs images into the eps-box of the clean image")
    add_exact_arg(a)
    a.add_argument("--save-adv", metavar="DIR",
                   help="also write the transfer attacks' images as PNG folders "
                        "DIR/<source>_<attack>/<image id>.png (readable with --adv-dirs)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (reused to resume)")
    add_restart_arg(r)
    r.add_argument("--name", help="label of the defended model")
    r.add_argument("--batch-size", type=positive_int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--workers", type=nonnegative_int, default=0, help="data loader workers")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)

