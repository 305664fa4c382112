"""``dual-lm eval-compare``: a per-task grouped bar chart (PNG) and table of several ``dual-lm eval`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dual_lm.evaluation.results import METRICS, check_metric, run_label
from dual_lm.evaluation.tasks import ALL_TASKS, TASKS


def plot_runs(runs: Sequence[dict], out: str | Path, metric: str = "normalized_acc") -> Path:
    """One group of bars per task (and Avg), one bar per run; written through a temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_metric(metric)
    out = Path(out)
    names = [t for t in ALL_TASKS if any(t in r["tasks"] for r in runs)]
    labels = [TASKS[t].column for t in names] + ["Avg"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * max(1, len(runs) / 2)), 4.5))
    for k, r in enumerate(runs):
        values = [r["tasks"][t][metric] if t in r["tasks"] else 0.0 for t in names] + [r["average"][metric]]
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width, label=run_label(r))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(METRICS[metric])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
