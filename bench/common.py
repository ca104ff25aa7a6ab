"""What every benchmark script shares: its data arguments and the command line it prints."""

from __future__ import annotations

import argparse
import shlex
import sys


def bench_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --root (default: the shipped sample), --category and repeatable --set overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--root", default="sample")
    p.add_argument("--category", default="bottle")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def print_command() -> None:
    """The exact command that made the figures printed after it."""
    print(f"command: .venv/bin/python {' '.join(shlex.quote(a) for a in sys.argv)}")
