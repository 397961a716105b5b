"""The ``featdenoise`` command: parses arguments and calls the library; no logic lives here.

Each sub-command is a module of :mod:`featdenoise.commands` with ``register(subparsers)``, which
adds its parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys

from featdenoise import __version__
from featdenoise.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featdenoise",
        description="Feature-denoising networks, PGD attacks, adversarial training and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"featdenoise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("featdenoise: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as err:
        # Library errors are written to be one clear line that names the value and what to do.
        print(f"featdenoise {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
