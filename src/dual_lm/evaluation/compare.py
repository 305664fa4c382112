"""``dual-lm eval-compare``: a per-task grouped bar chart (PNG) and table of several ``dual-lm eval`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dual_lm.evaluation.results import METRICS, check_metric, partial_average, run_label, task_names
from dual_lm.evaluation.tasks import TASKS


def plot_runs(runs: Sequence[dict], out: str | Path, metric: str = "normalized_acc") -> Path:
    """One group of bars per task (and Avg), one bar per run; written atomically, marked as dual-lm's.

    A task a run did not score gets no bar (not a zero one); a run whose Avg is over other tasks than
    the chart's says so in its legend entry.
    """
    from dual_lm.figures import pyplot, save_png

    check_metric(metric)
    out = Path(out)
    names = task_names(runs)
    labels = [TASKS[t].column for t in names] + ["Avg"]
    width = 0.8 / len(runs)
    fig, ax = pyplot().subplots(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(runs) / 2)), 4.5))
    for k, r in enumerate(runs):
        values = [r["tasks"][t][metric] if t in r["tasks"] else float("nan") for t in names] + [r["average"][metric]]
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(labels))]
        n = partial_average(r, names)
        label = run_label(r) + (f"; Avg over {n} of {len(names)} tasks" if n is not None else "")
        ax.bar(xs, values, width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(METRICS[metric])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, out)  # the caller checked ``out`` first (``ownership.check_output_file``)
