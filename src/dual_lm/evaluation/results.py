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


MISSING = "\u2014"  # an em dash: the run did not score this task


def task_names(runs: Sequence[dict]) -> list[str]:
    """The tasks present in any run, in the model card's column order."""
    return [t for t in ALL_TASKS if any(t in r["tasks"] for r in runs)]


def partial_average(run: dict, names: Sequence[str]) -> int | None:
    """How many tasks the run's Avg is over, when that is not every one of ``names``; else None."""
    own = set(run["tasks"])
    return None if own == set(names) else len(own)


def markdown_table(runs: Sequence[dict], metric: str = "normalized_acc") -> str:
    """The model card's table: one row per run, one column per task present in any run, then Avg.

    A task a run did not score shows an em dash; an Avg over fewer (or other) tasks than the table's
    columns says over how many, e.g. ``20.0 (2 tasks)``, since such averages are not comparable.
    """
    names = task_names(runs)
    header = ["Model", *(TASKS[t].column for t in names), "Avg"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in runs:
        cells = [f"{r['tasks'][t][metric]:.1f}" if t in r["tasks"] else MISSING for t in names]
        avg = f"{r['average'][metric]:.1f}"
        n = partial_average(r, names)
        avg += f" ({n} task{'s' if n != 1 else ''})" if n is not None else ""
        lines.append("| " + " | ".join([run_label(r), *cells, avg]) + " |")
    return "\n".join(lines)


def read_results(path: str | Path) -> dict:
    """A results JSON written by ``dual-lm eval``; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} {'is a folder, not a results file' if path.is_dir() else 'does not exist'}")
    try:
        results = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a `dual-lm eval` results file (it is not text)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not JSON: {err}") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise UserError(f'{path} is not a `dual-lm eval` results file (no "format": "{FORMAT}")')
    problems = results_problems(results)
    if problems:
        raise UserError(f"{path} is an incomplete `dual-lm eval` results file: {'; '.join(problems)}")
    return results


def results_problems(results: dict) -> list[str]:
    """What a results record lacks for tables and charts: model name, mode, per-task and average metrics."""
    problems = []
    if not isinstance(results.get("model"), dict) or not isinstance(results["model"].get("name"), str):
        problems.append('"model" must be an object with a "name"')
    if not isinstance(results.get("mode"), str):
        problems.append('"mode" must be a string')
    tasks = results.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        problems.append('"tasks" must be a non-empty object of task name -> metrics')
    else:
        for name, record in tasks.items():
            if name not in TASKS:
                problems.append(f'unknown task {name!r} in "tasks" (known: {", ".join(ALL_TASKS)})')
            elif not isinstance(record, dict) or not all(_is_number(record.get(m)) for m in METRICS):
                problems.append(f'"tasks"["{name}"] needs the numbers {", ".join(METRICS)}')
    average = results.get("average")
    if not isinstance(average, dict) or not all(_is_number(average.get(m)) for m in METRICS):
        problems.append(f'"average" must be an object with the numbers {", ".join(METRICS)}')
    return problems


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric
