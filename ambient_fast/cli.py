"""``ambient-fast``: the command-line entry point; a thin dispatcher over ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per available command module."""
    parser = argparse.ArgumentParser(
        prog="ambient-fast",
        description="Custom-kernel engine for ambient diffusion and Ambient Dataloops.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ambient_fast.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"ambient_fast.commands.{name}":
                raise
            continue
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
