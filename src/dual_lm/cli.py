"""The ``dual-lm`` command: a table of subcommands; parsing only, the work lives in the modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dual_lm.errors import UserError


def _convert(args) -> int:
    from dual_lm.convert import convert_reference

    out = convert_reference(args.config, args.state_dict, args.out_dir, args.tokenizer)
    note = "with tokenizer.json" if args.tokenizer else "without a tokenizer (pass --tokenizer to include one)"
    print(f"wrote model folder {out} {note}")
    return 0


def _info(args) -> int:
    from dual_lm.folder import describe_folder

    print(describe_folder(args.folder))
    return 0


def _demo(args) -> int:
    from dual_lm.demo import run_demo

    return run_demo(Path(args.fixture), Path(args.output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dual-lm", description="Dual-objective (AR + masked diffusion) LLaMA models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert-reference", help="reference-trainer checkpoint -> model folder")
    p.add_argument("--config", required=True, help="the reference trainer's config.json")
    p.add_argument("--state-dict", required=True, help="the reference trainer's state_dict.bin")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the folder has no tokenizer)")
    p.add_argument("out_dir", help="new model folder")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", help="print a model folder's configuration, parameter counts, classes and modes")
    p.add_argument("folder")
    p.set_defaults(func=_info)

    p = sub.add_parser("demo", help="the main job (run by `make demo`)")
    p.add_argument("--fixture", default="../shared/reference/parity-tiny", help="reference parity checkpoint folder")
    p.add_argument("--output", default="runs/demo/parity-tiny", help="where to write the converted model folder")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"dual-lm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dual-lm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
