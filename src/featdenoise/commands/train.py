"""``featdenoise train --config CONFIG [key=value ...]``: adversarial (or clean) training."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from featdenoise.config import check_model, load_config
    from featdenoise.runtime import distributed
    from featdenoise.training import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=auto")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        check_model(cfg)  # the same model check as train's, on the meta device
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    run_dir = train(cfg)
    if distributed.launched_as_main():
        print(f"run directory: {run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="adversarial training with the paper's recipe (Sec. 5)",
        description="Train a model from a YAML config (configs/*.yaml) with key=value overrides "
                    "(dotted keys, YAML values), e.g. optim.epochs=2 attack.steps=0 for clean "
                    "training. Launch with torchrun for several processes/GPUs/nodes.")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.batch_size=64 run.bf16=true")
    p.add_argument("--resume", action="store_true",
                   help="continue from run_dir/checkpoint.pt if present (same as run.resume=auto)")
    p.add_argument("--out", default=None, help="run directory (same as run.out_dir=...)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config and exit")
    p.set_defaults(func=_run)
