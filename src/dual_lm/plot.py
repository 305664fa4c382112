"""``dual-lm plot RUN_DIR``: training and validation loss curves from ``metrics.jsonl`` to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from dual_lm.errors import UserError

CURVES = [
    ("ar_nll", "train AR loss (nats/token)"),
    ("md_loss", "train MD loss (reference weighting)"),
    ("val_ar_nll", "validation AR loss"),
    ("val_md_loss", "validation MD loss"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; is it a `dual-lm train` output folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise UserError(f"{path} holds no records yet")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every available curve against training tokens; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in CURVES:
        points = [(r["tokens"], r[key]) for r in records if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if key.startswith("val") else None, markersize=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title(f"dual-lm: {run_dir.resolve().parent.name}/{run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
