"""Argument types shared by the bench scripts (argparse ``type=`` callables)."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Collection

__all__ = ["positive_ints", "names_from"]


def positive_ints(raw: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> ``(1, 4, 16)``; anything else is an argparse error naming the value."""
    try:
        values = tuple(int(item) for item in raw.split(",") if item.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected comma-separated positive ints, e.g. 1,4,16")
    return values


def names_from(choices: Collection[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma list of names out of ``choices``."""
    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(item.strip() for item in raw.split(",") if item.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from {','.join(choices)}")
        return names
    return parse
