"""The ``dual-lm`` command: a table of subcommands (each declares its arguments beside its handler in
``cli.making`` or ``cli.using``); parsing only, the work lives in the library's modules.

Errors: pure code raises ValueError, the boundaries (file readers, option checks) raise UserError,
and ``main`` is the one place a UserError becomes ``dual-lm CMD: error: ...`` with exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from dual_lm import __version__
from dual_lm.cli import making, serving, using
from dual_lm.cli.options import Parser
from dual_lm.errors import UserError
from dual_lm.ownership import environment_error

COMMANDS = making.COMMANDS + using.COMMANDS + serving.COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dual-lm", description="Dual-objective (AR + masked diffusion) LLaMA models.")
    parser.add_argument("--version", action="version", version=f"dual-lm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, **command.parser_options)
        command.arguments(p)
        p.set_defaults(func=command.handler)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, except that ``key=value`` overrides may also follow the options
    (``dual-lm sweep CONFIG --alphas 0,1 train.seed=1``): they join the command's ``overrides``."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The one place user errors become ``dual-lm CMD: error: ...`` and exit 2. A full disk or a
    permission error is the machine's fault and gets the same line; any other exception is a bug
    and keeps its traceback."""
    try:
        args = parse(build_parser(), argv)
    except SystemExit as exit_:  # a parse error (already printed as one line) or --help
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except UserError as err:
        print(f"dual-lm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``dual-lm ... | head``): stop quietly, as a shell tool does
        with contextlib.suppress(OSError, ValueError):  # no descriptor (stdout is not a file)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        message = environment_error(err)
        if message is None:
            raise
        print(f"dual-lm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dual-lm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
