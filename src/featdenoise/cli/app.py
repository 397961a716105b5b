"""The ``featdenoise`` command: parses arguments and calls the library; no logic lives here.

Each sub-command is a module of :mod:`featdenoise.cli` with ``register(subparsers)``, which
adds its parser and sets ``func(args) -> int``. The library's progress messages (the
``featdenoise`` loggers, level INFO) are written to standard error as plain lines; what a command
produces (tables, report paths) goes to standard output.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from featdenoise import __version__
from featdenoise.cli import (
    ablate,
    bench,
    blackbox,
    convert,
    demo,
    evaluate,
    predict,
    train,
    visualize,
)
from featdenoise.runtime.atomic import command_inputs

COMMANDS: list = [
    bench.register,
    convert.register,
    evaluate.register,
    blackbox.register,
    predict.register,
    train.register,
    visualize.register,
    demo.register,
    ablate.register,
]
"""Each sub-command's ``register(subparsers)``, in the order ``--help`` lists them. Add a command
by writing ``cli/NAME.py`` with a ``register`` function and listing it here."""

OUTPUT_ARGS = frozenset({"out", "output", "save_adv"})
"""Argument names (``dest``) that name what a command writes; every other argument naming an
existing file or folder is one of the command's inputs, which no write of the command may replace
(:func:`featdenoise.runtime.atomic.command_inputs`)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``featdenoise CMD: error: ...``, exit
    status 2) like every other error of the CLI; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _StderrLines(logging.Handler):
    """Writes each record's message as one line to ``sys.stderr`` as it is when the record is
    emitted (not the stream of when the handler was made), so a redirected or captured standard
    error receives it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # a broken stream must not stop the command (logging's own rule)
            self.handleError(record)


def configure_logging() -> None:
    """Show the library's INFO messages (logger ``featdenoise`` and below) on standard error, one
    plain line each; calling it again adds no second handler. Other loggers are left alone."""
    logger = logging.getLogger("featdenoise")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featdenoise",
        description="Feature-denoising networks, PGD attacks, adversarial training and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"featdenoise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def input_files(args: argparse.Namespace) -> list[str]:
    """Every existing file or folder named by a non-output argument (strings and lists of
    strings): what the command reads, so never what it writes."""
    found = []
    for dest, value in vars(args).items():
        if dest in OUTPUT_ARGS or dest == "func":
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item and os.path.exists(item):
                found.append(item)
    return found


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError`` that escaped a command: a file where a folder belongs (the
    ``[Errno 17] File exists`` of ``os.makedirs``) is said in words."""
    name = err.filename
    if name and err.errno in (errno.EEXIST, errno.ENOTDIR):
        return (f"{name}: a file is in the way where a folder is needed (an --out that is an "
                "existing file?); give a folder path or move the file away")
    if name and err.errno == errno.EISDIR:
        return f"{name} is a folder; give a file path"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        with command_inputs(input_files(args)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        # A command that saved its state says where it stopped and what was kept.
        detail = str(err).strip()
        print(f"featdenoise {args.command}: {detail or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as err:
        # Library errors are written to be one clear line that names the value and what to do.
        text = describe_os_error(err) if isinstance(err, OSError) else str(err)
        print(f"featdenoise {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
