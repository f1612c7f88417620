"""Subcommands of the ``ambient-fast`` CLI, one module each.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

COMMANDS = ("demo", "train", "annotate", "restore", "fid", "loop", "corrupt", "bench")
