"""A golden loss curve: a fixed tiny run's logged losses at every step, pinned to a tolerance.

The run trains the ``tiny`` preset for 24 steps on the suite's synthetic corpus (``conftest.data_dir``)
with alpha = 1/2, so both objectives, Muon + AdamW, the WSD schedule and the evaluation feed the curve.
Any change to what training computes moves it. To regenerate the file after an intended change:

    DUAL_LM_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py

and say in the commit why the curve moved."""

import json
import os
from pathlib import Path

import pytest

from dual_lm.config import load_train_config
from dual_lm.training.runlog import METRICS_FILE
from dual_lm.training.train import run_training

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden-loss.json"
OVERRIDES = {
    "data.seq_len": 32,
    "train.micro_batch_rows": 4,
    "train.global_batch_tokens": 256,
    "train.steps": 24,
    "log.every": 1,
    "eval.every": 8,
    "eval.batches": 2,
    "checkpoint.every": 24,
    "optim.lr": 0.01,
    "objective.alpha": 0.5,
}
TIMING = ("tokens_per_s",)  # the only logged values that depend on the machine's speed
TOLERANCE = 1e-4  # absolute, in nats: float32 sums on another CPU may differ in the last bits


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_golden_loss_curve(data_dir, tmp_path):
    argv = [f"{k}={v}" for k, v in {"data.path": data_dir, "output": tmp_path / "run", **OVERRIDES}.items()]
    run_training(load_train_config(None, argv))
    found = curve(tmp_path / "run")
    if os.environ.get("DUAL_LM_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "steps": found}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "the run's settings changed: regenerate the golden file"
    expected = golden["steps"]
    assert [r["step"] for r in found] == [r["step"] for r in expected] == list(range(1, 25))
    for got, want in zip(found, expected, strict=True):
        assert sorted(got) == sorted(want), got["step"]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=TOLERANCE), (got["step"], key)
    assert {"loss", "ar_nll", "md_loss", "val_ar_nll", "val_md_loss"} <= set().union(*expected)
    assert expected[-1]["loss"] < 0.7 * expected[0]["loss"]  # and the pinned curve is one that learns
