"""``ambient-fast``: the command-line entry point; a thin dispatcher over ``commands/``."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

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


# errno values that mean "the write could not be done" (the disk, not the data).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def describe_os_error(err: OSError, output: Path | None = None) -> str:
    """One line for an OS error: ``cannot write out/x.png: No space left on device``.

    The path is the one the error names, else the command's output (``output``); a write
    error (disk full, read-only, quota) says "write", a missing file "open", others "access".
    """
    where = err.filename if err.filename is not None else output
    reason = err.strerror or str(err)
    verb = "write" if err.errno in _WRITE_ERRNOS else "open" if err.errno == errno.ENOENT else "access"
    return f"cannot {verb} {where}: {reason}" if where is not None else f"{reason}"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit code.

    Exit codes: 0 done, 2 usage error (argparse names the option), 1 runtime error: bad
    data (one line naming the sample or file), changed arguments on resume, or an OS error
    (disk full, read-only, permission denied), also one line, never a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    prog = f"{parser.prog} {args.command}"
    output = next((getattr(args, name) for name in ("dst", "out", "json") if getattr(args, name, None)), None)
    try:
        return int(args._run(args) or 0)
    except OSError as err:
        message = describe_os_error(err, output)
    except ValueError as err:  # DatasetError, ArgumentsChanged, BadSampleError, bad option values
        message = str(err) or type(err).__name__
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
