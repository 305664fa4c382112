"""Fine-tune the same folder with each ``dlm_task_attention`` mode on the same budget and compare.

    python examples/compare_task_attention.py FOLDER --output runs/ft/compare \\
        [--modes causal,bidirectional,prefix] [--seeds 0,1,2] [every option of finetune_classification.py
        but --attention, --seed and --save-model]

Every run of a seed shares its data, its order, its head initialisation and its number of steps; only
the attention pattern of the trunk differs. Each run writes ``OUTPUT/MODE-seedS/results.json``; the
table (accuracy, eval loss, majority baseline; mean over seeds, then each seed) is printed and written
to ``OUTPUT/table.md``, and everything to ``OUTPUT/comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import finetune_classification as ft  # the sibling script, importable once its folder is on the path


def parse_list(text: str, kind: type, name: str, parser: argparse.ArgumentParser) -> list:
    """``"a,b,c"`` as a list of ``kind``; a malformed or repeated item is refused with one line."""
    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        parser.error(f"--{name} takes a comma-separated list, got {text!r}")
    if not items or len(set(items)) != len(items):
        parser.error(f"--{name} needs distinct items, got {text!r}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    ft.add_common_arguments(parser)
    parser.add_argument("--modes", default="causal,bidirectional,prefix", help="comma-separated attention modes")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every mode runs every seed")
    return parser


def mean_sd(values: list[float]) -> str:
    """``mean`` for one value, ``mean +- sd`` for several."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(runs: list[dict], modes: list[str]) -> str:
    """A markdown table: per mode the mean (+- sd over seeds) accuracy and eval loss, then each seed's accuracy."""
    lines = [
        "| attention | accuracy | eval loss | majority baseline | accuracy per seed |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        mine = [r for r in runs if r["attention"] == mode]
        per_seed = ", ".join(f"{r['accuracy']:.4f} (seed {r['seed']})" for r in mine)
        lines.append(
            f"| {mode} | {mean_sd([r['accuracy'] for r in mine])} | {mean_sd([r['eval_loss'] for r in mine])} "
            f"| {mine[0]['majority_baseline']:.4f} | {per_seed} |"
        )
    return "\n".join(lines)


def compare(base: ft.Settings, modes: list[str], seeds: list[int]) -> list[dict]:
    """One fine-tuning run per (seed, mode) into ``OUTPUT/MODE-seedS``, the data encoded once."""
    prepared = ft.prepare(base)
    runs = []
    for seed in seeds:
        for mode in modes:
            output = str(Path(base.output) / f"{mode}-seed{seed}")
            settings = ft.Settings(**{**vars(base), "attention": mode, "seed": seed, "output": output})
            runs.append(ft.finetune(settings, prepared))
            print(ft.summary(runs[-1]), flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = parse_list(args.modes, str, "modes", parser)
    unknown = [m for m in modes if m not in ft.ATTENTION_MODES]
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(ft.ATTENTION_MODES)}")
    seeds = parse_list(args.seeds, int, "seeds", parser)
    ft.check_attention(parser, args.task, modes)
    ft.check_common(parser, args)
    runs = compare(ft.settings_from(args), modes, seeds)
    text = table(runs, modes)
    output = Path(args.output)
    (output / "table.md").write_text(text + "\n")
    kept = [{k: v for k, v in r.items() if k not in ("predictions", "logits")} for r in runs]
    (output / "comparison.json").write_text(json.dumps({"modes": modes, "seeds": seeds, "runs": kept}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
