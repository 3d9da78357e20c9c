"""Argument types shared by the subcommands: a bad value is argparse's one-line usage error, exit 2, before any work."""

from __future__ import annotations

import argparse

DEVICES = ("cpu", "cuda")


def at_least(low: int):
    """An ``int`` argument type refusing values below ``low`` (``--batch-size 0`` would divide by zero later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    return parse


__all__ = ["DEVICES", "at_least"]
