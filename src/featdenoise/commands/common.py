"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse


def str_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (comma-separated, blanks dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    """``"10,100"`` -> ``[10, 100]``; anything else is an argparse error naming the text."""
    try:
        return [int(t) for t in str_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
