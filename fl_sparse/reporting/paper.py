"""The paper's published numbers, read from ``paper_numbers.toml`` beside this module (data, not code)."""

from __future__ import annotations

import tomllib
from pathlib import Path

NUMBERS_FILE = Path(__file__).with_name("paper_numbers.toml")


def paper_numbers() -> dict[str, dict[str, dict[str, float]]]:
    """Every table of ``paper_numbers.toml``: {table: {algorithm: {column: value}}}."""
    with open(NUMBERS_FILE, "rb") as handle:
        return tomllib.load(handle)


#: Table 1 of the PFFDST paper (LeNet, CIFAR-10, s = 0.8): best accuracy (%) per budget column.
PAPER_TABLE1: dict[str, dict[str, float]] = paper_numbers()["table1"]
