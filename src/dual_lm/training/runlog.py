"""The metrics file of a run, ``RUN/metrics.jsonl``: its name, its keys, its writer and its readers.

One JSON object per logged step with ``step`` and ``tokens``; evaluation steps add the ``VAL_KEYS``.
``train`` appends (and on resume cuts the lines after the checkpoint), ``plot`` and the studies read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dual_lm.atomic import write_text_atomic
from dual_lm.errors import UserError

METRICS_FILE = "metrics.jsonl"
# The validation metrics of an evaluation step (nats/token and accuracies; DESIGN.md section 3).
VAL_KEYS = ("val_ar_nll", "val_md_loss", "val_md_nll", "val_ar_acc", "val_md_acc")


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn line (a kill during the append) sorts last and is cut."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON object per logged step; on resume, later lines are cut."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, tensorboard: bool):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``. A torn last line (what a kill during the append leaves, and
    what ``train --resume`` cuts) is left out; a bad line anywhere else is an error naming it."""
    path = run_dir / METRICS_FILE
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
    if not isinstance(record, dict) or not all(is_number(record.get(k)) for k in ("step", "tokens")):
        return None
    return record


def is_number(value) -> bool:
    """A finite int or float (not a bool): what a plotted metric must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def final_metrics(run_dir: Path) -> tuple[dict, list[dict]]:
    """The last validation record of a run and every validation record (the curve)."""
    records = read_metrics(run_dir)
    curve = [{k: r[k] for k in ("step", "tokens", *VAL_KEYS) if k in r} for r in records if VAL_KEYS[0] in r]
    if not curve:
        raise UserError(f"{run_dir} has no validation record; set eval.batches >= 1 and a validation split")
    return curve[-1], curve
