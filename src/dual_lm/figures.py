"""Figures: matplotlib without a display, and PNGs that dual-lm recognises as its own."""

from __future__ import annotations

import io
from pathlib import Path

from dual_lm.atomic import write_bytes_atomic
from dual_lm.ownership import PNG_SOFTWARE


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display is ever needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: Path) -> Path:
    """Render the figure to PNG bytes marked ``Software: dual-lm`` (so a later command knows it may
    replace the file, ``ownership.PLOT``) and write them atomically: a kill or a full disk leaves the
    old file or the new one and no temporary file."""
    plt = pyplot()
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120, metadata={"Software": PNG_SOFTWARE})
    finally:
        plt.close(fig)
    write_bytes_atomic(out, buffer.getvalue())
    return out
