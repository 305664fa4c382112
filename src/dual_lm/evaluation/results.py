"""Results of ``dual-lm eval``: the JSON record and the model card's Markdown table."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from dual_lm.errors import UserError
from dual_lm.evaluation.metrics import mean
from dual_lm.evaluation.runner import EvalSettings, TaskRun
from dual_lm.evaluation.tasks import ALL_TASKS, TASKS

FORMAT = "dual-lm-eval/1"
METRICS = {
    "normalized_acc": "normalized accuracy 100 x (acc - r) / (100 - r)",
    "normalized_acc_norm": "normalized length-normalised accuracy",
    "acc": "accuracy (%)",
    "acc_norm": "length-normalised accuracy (%)",
}


def task_record(run: TaskRun) -> dict:
    """The JSON entry of one task: data, format version, item count, metrics in percent, timing."""
    spec, s = TASKS[run.name], run.score
    return {
        "column": spec.column,
        "version": spec.version,
        "lm_eval_task": spec.lm_eval_task,
        "data": spec.data,
        "items": s.items,
        "requests": run.requests,
        "chance": s.chance,
        "acc": s.acc,
        "acc_norm": s.acc_norm,
        "normalized_acc": s.normalized,
        "normalized_acc_norm": s.normalized_norm,
        "seconds": run.seconds,
        "items_per_second": s.items / run.seconds if run.seconds > 0 else None,
    }


def average(tasks: dict) -> dict:
    """Unweighted mean over tasks of every metric (the model card's Avg column)."""
    keys = ("acc", "acc_norm", "chance", "normalized_acc", "normalized_acc_norm")
    return {k: mean([t[k] for t in tasks.values()]) for k in keys}


def build_results(model_info: dict, settings: EvalSettings, runs: Sequence[TaskRun], **extra) -> dict:
    """The results record: mode (and mask n), model, settings, per-task metrics and their average."""
    from dual_lm import __version__

    tasks = {r.name: task_record(r) for r in runs}
    return {
        "format": FORMAT,
        "dual_lm_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "mode": settings.mode,
        "mask_n": settings.mask_n if settings.mode == "masked" else None,
        "batch_size": settings.batch_size,
        **extra,
        "tasks": tasks,
        "average": average(tasks),
    }


def run_label(results: dict) -> str:
    """``name (mode)``, with the masked mode's n: the row label in tables and charts."""
    mode = results["mode"] + (f", n={results['mask_n']}" if results.get("mask_n") else "")
    return f"{results['model']['name']} ({mode})"


def markdown_table(runs: Sequence[dict], metric: str = "normalized_acc") -> str:
    """The model card's table: one row per run, one column per task present in any run, then Avg."""
    names = [t for t in ALL_TASKS if any(t in r["tasks"] for r in runs)]
    header = ["Model", *(TASKS[t].column for t in names), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in runs:
        cells = [f"{r['tasks'][t][metric]:.1f}" if t in r["tasks"] else "-" for t in names]
        lines.append("| " + " | ".join([run_label(r), *cells, f"{r['average'][metric]:.1f}"]) + " |")
    return "\n".join(lines)


def read_results(path: str | Path) -> dict:
    """A results JSON written by ``dual-lm eval``; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not JSON: {err}") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise UserError(f'{path} is not a `dual-lm eval` results file (no "format": "{FORMAT}")')
    return results


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric
