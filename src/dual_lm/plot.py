"""PNG plots: a run's loss curves (``dual-lm plot RUN_DIR``) and a sweep's heatmap and validation curves."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from dual_lm.atomic import write_bytes_atomic
from dual_lm.errors import UserError
from dual_lm.ownership import PNG_SOFTWARE

CURVES = [
    ("ar_nll", "train AR loss (nats/token)"),
    ("md_loss", "train MD loss (reference weighting)"),
    ("val_ar_nll", "validation AR loss"),
    ("val_md_loss", "validation MD loss"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``. A torn last line (what a kill during the append leaves, and
    what ``train --resume`` cuts) is left out; a bad line anywhere else is an error naming it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a `dual-lm train` output folder?")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text; is it a `dual-lm train` metrics file?") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for at, (n, line) in enumerate(lines):
        record = _record(line)
        if record is None:
            if at == len(lines) - 1 and not text.endswith("\n") and records:
                break  # torn by a kill: the complete lines before it are the run so far
            raise UserError(f"{path}:{n} is not a metrics record (a JSON object with 'step' and 'tokens')")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no records yet")
    return records


def _record(line: str) -> dict | None:
    """A metrics line as a dict with numeric step and tokens, or None."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not all(_number(record.get(k)) for k in ("step", "tokens")):
        return None
    return record


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    """Render the figure to PNG bytes marked ``Software: dual-lm`` (so a later command knows it may
    replace the file, ``ownership.PLOT``) and write them atomically: a kill or a full disk leaves the
    old file or the new one and no temporary file."""
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120, metadata={"Software": PNG_SOFTWARE})
    finally:
        plt.close(fig)
    write_bytes_atomic(out, buffer.getvalue())
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every available curve against training tokens; returns the PNG path (the caller checks
    that it may write there, see ``cli.output_file``)."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in CURVES:
        points = [(r["tokens"], r[key]) for r in records if _number(r.get(key))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("val") else None, markersize=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"dual-lm: {run_dir.resolve().parent.name}/{run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


SWEEP_PANELS = [
    ("val_ar_nll", "validation AR loss (lower is better)", "viridis_r"),
    ("val_md_loss", "validation MD loss (lower is better)", "viridis_r"),
    ("prefix_gain", "prefix gain: causal - prefix nats/token", "RdBu"),
    ("tasks_causal", "task score, causal (normalized accuracy)", "viridis"),
    ("tasks_prefix", "task score, prefix (normalized accuracy)", "viridis"),
]


def plot_sweep_heatmap(results: list[dict], out: Path) -> Path:
    """Panels of repetitions (rows) x alpha (columns), each cell annotated with its value."""
    import numpy as np

    plt = _pyplot()
    alphas = sorted({r["alpha"] for r in results})
    reps = sorted({r["repetitions"] for r in results})
    panels = [p for p in SWEEP_PANELS if any(p[0] in r for r in results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.9 * len(reps) + 2.2), squeeze=False)
    for ax, (key, title, cmap) in zip(axes[0], panels, strict=True):
        grid = np.full((len(reps), len(alphas)), np.nan)
        for r in results:
            grid[reps.index(r["repetitions"]), alphas.index(r["alpha"])] = r.get(key, np.nan)
        if cmap == "RdBu":  # centred on zero: blue where prefix scoring helps
            bound = float(np.nanmax(np.abs(grid))) or 1.0
            image = ax.imshow(grid, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = ax.imshow(grid, cmap=cmap, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(alphas)), [f"{a:.3g}" for a in alphas])
        ax.set_yticks(range(len(reps)), [str(r) for r in reps])
        ax.set_xlabel("alpha (AR share)")
        ax.set_ylabel("repetitions R")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, out)


def plot_sweep_curves(results: list[dict], out: Path) -> Path:
    """Validation AR and MD loss against training tokens: one column per R, one line per alpha."""
    plt = _pyplot()
    reps = sorted({r["repetitions"] for r in results})
    fig, axes = plt.subplots(2, len(reps), figsize=(4.2 * len(reps), 6.5), squeeze=False, sharex="col")
    for col, rep in enumerate(reps):
        for r in sorted((r for r in results if r["repetitions"] == rep), key=lambda r: r["alpha"]):
            for row, key in enumerate(("val_ar_nll", "val_md_loss")):
                points = [(c["tokens"], c[key]) for c in r.get("curve", []) if key in c]
                if points:
                    xs, ys = zip(*points, strict=True)
                    axes[row, col].plot(xs, ys, marker="o", markersize=2, label=f"alpha {r['alpha']:.3g}")
        for row, label in enumerate(("validation AR loss", "validation MD loss")):
            axes[row, col].set_title(f"R = {rep}: {label}", fontsize=9)
            axes[row, col].grid(alpha=0.3)
        axes[1, col].set_xlabel("training tokens")
        axes[0, col].legend(fontsize=7)
    return _save(fig, out)
