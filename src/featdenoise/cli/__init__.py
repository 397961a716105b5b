"""The ``featdenoise`` command line: :func:`main` (:mod:`.app`) and one module per sub-command
(``register(subparsers)`` adds its parser). Commands parse arguments and call the library; no
logic lives here."""

from featdenoise.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
