"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse
import json
import math

from featdenoise.runtime.atomic import check_output
from featdenoise.runtime.outdir import output_dir


def str_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (comma-separated, blanks dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    """``"10,100"`` -> ``[10, 100]``; anything else (also an empty list) is an argparse error
    naming the text."""
    try:
        values = [int(t) for t in str_list(text)]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 0,1,2, got {text!r}")
    return values


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
"""argparse type: an integer >= 1 (sizes, counts, batch sizes); anything else is one line."""
nonnegative_int = _int_at_least(0, "an integer >= 0")
"""argparse type: an integer >= 0 (worker counts, ``--size 0`` = keep, channel indices)."""


def json_object(text: str) -> dict:
    """argparse type: a JSON object (``'{"num_classes": 10}'``); anything else is one line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at column {err.colno}): "
                                         f"{text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 10}}',"
                                         f" got {text!r}")
    return value


class FiniteFloat(argparse.Action):
    """``action=FiniteFloat``: a float flag that refuses what is not a finite number.

    Every float option of the CLI uses it, so ``--step-size inf`` or ``--eps nan`` stops at once
    with one line naming the flag as typed (``--step-size nan: not a finite number``, exit 2)
    instead of running to the end or speaking of the library's [0, 1] scale."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            number = float(values)
        except ValueError:
            parser.error(f"{option_string} {values}: not a number")
        if not math.isfinite(number):
            parser.error(f"{option_string} {values}: not a finite number")
        setattr(namespace, self.dest, number)


class Pixels255(FiniteFloat):
    """``action=Pixels255``: a finite float flag given on the 0..255 scale (``--eps 16``) and
    stored on the library's [0, 1] scale (``16 / 255``). This is the one place where the CLI's
    0..255 numbers become [0, 1] pixels; give ``default=`` on the [0, 1] scale too.

    Subclasses bound the value as typed (:class:`Budget255`, :class:`Step255`): a value outside
    is one argparse line quoting the flag and the value as the user wrote them."""

    def refuse(self, number: float) -> str | None:
        """Why ``number`` (0..255 scale) is not accepted, or None."""
        return None

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        number = getattr(namespace, self.dest)
        why = self.refuse(number)
        if why:
            parser.error(f"{option_string} {values} {why}")
        setattr(namespace, self.dest, number / 255)


class Budget255(Pixels255):
    """An L-inf budget (``--eps``) on the 0..255 scale: in (0, 255]."""

    def refuse(self, number: float) -> str | None:
        if 0 < number <= 255:
            return None
        return "is outside (0, 255]; eps is on the 0..255 pixel scale (the paper's 16)"


class Step255(Pixels255):
    """An attack step size (``--step-size``) on the 0..255 scale: > 0."""

    def refuse(self, number: float) -> str | None:
        return None if number > 0 else "must be > 0 (0..255 scale, e.g. 1)"


def output_folder(path: str, flag: str = "--out") -> str:
    """Create the output folder ``path``; an existing *file* there, or an input of the command,
    is one line naming ``flag`` (:func:`featdenoise.runtime.outdir.output_dir`)."""
    return output_dir(path, flag)


def output_file(path: str, flag: str = "--out", ours=None) -> str:
    """Refuse an output file that would destroy something (an existing folder, an input of the
    command, a read-only file, a file ``ours`` does not recognise); see
    :func:`featdenoise.runtime.atomic.check_output`. Returns ``path``."""
    check_output(path, ours=ours, what=flag)
    return path
