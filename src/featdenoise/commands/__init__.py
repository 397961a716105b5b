"""Sub-commands of the ``featdenoise`` CLI, one module each (``register(subparsers)``).

Add a command by writing ``commands/NAME.py`` with a ``register`` function and listing it here.
"""

from __future__ import annotations

from featdenoise.commands import (
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
