"""The command line's building blocks: the one-line error parser, typed option parsers, and the
table row each subcommand declares beside its handler."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field


class Parser(argparse.ArgumentParser):
    """argparse with the project's error line: ``dual-lm CMD: error: ...`` alone, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], refused where it is parsed (never a silent default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse type: a device this machine has (``dual_lm.folder.check_device``), checked where parsed."""
    from dual_lm.errors import UserError
    from dual_lm.folder import check_device

    try:
        check_device(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def dtype_name(text: str) -> str:
    """An argparse type: one of ``dual_lm.folder.DTYPES``."""
    from dual_lm.folder import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(DTYPES)}, got {text!r}")
    return text


def add_device_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` of the commands that run a model."""
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument(
        "--dtype", type=dtype_name, default="float32", help="float32, bfloat16, float16 or auto (the folder's own)"
    )


def real(low: float, high: float = math.inf, *, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with ``low_open``); nan and inf
    are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            if high == math.inf:
                bound = f"{'>' if low_open else '>='} {low:g}"
            else:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


SEED = integer(0, 2**64 - 1)  # what torch.manual_seed accepts
MIN_VOCAB = 272  # the tokenizer recipe's 16 special tokens and 256 byte symbols (tokenizer.train_tokenizer)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, its handler (``args -> exit code``), the function that declares its
    arguments, and the keyword arguments of its ``add_parser`` call (its help line)."""

    name: str
    handler: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    parser_options: dict = field(default_factory=dict)
