"""PNG plots: a run's loss curves (``dual-lm plot RUN_DIR``) and a sweep's heatmap and validation curves."""

from __future__ import annotations

from pathlib import Path

from dual_lm.figures import pyplot, save_png
from dual_lm.training.runlog import is_number, read_metrics

CURVES = [
    ("ar_nll", "train AR loss (nats/token)"),
    ("md_loss", "train MD loss (reference weighting)"),
    ("val_ar_nll", "validation AR loss"),
    ("val_md_loss", "validation MD loss"),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every available curve against training tokens; returns the PNG path (the caller checks
    that it may write there, see ``ownership.check_output_file``)."""
    plt = pyplot()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in CURVES:
        points = [(r["tokens"], r[key]) for r in records if is_number(r.get(key))]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("val") else None, markersize=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"dual-lm: {run_dir.resolve().parent.name}/{run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, out)


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

    plt = pyplot()
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
    return save_png(fig, out)


def plot_sweep_curves(results: list[dict], out: Path) -> Path:
    """Validation AR and MD loss against training tokens: one column per R, one line per alpha."""
    plt = pyplot()
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
    return save_png(fig, out)
