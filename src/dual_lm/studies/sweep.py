"""An alpha x repetitions grid at a fixed token budget: train, export and evaluate every cell, then
draw the table, a heatmap and the validation curves (the paper's study, at any scale).

Layout of ``OUT``::

    OUT/alpha_{alpha:.3f}_n-reps={R}/run/      the cell's training run (checkpoints, metrics.jsonl)
    OUT/alpha_{alpha:.3f}_n-reps={R}/model/    the exported model folder
    OUT/alpha_{alpha:.3f}_n-reps={R}/result.json   written last and atomically: the cell is done
    OUT/sweep.json    the grid and evaluation options (the folder's marker, see ``ownership``)
    OUT/results.json  results.md  heatmap.png  curves.png

A finished cell (``result.json`` present) is not retrained; its evaluation (prefix vs causal
scoring, tasks) is recomputed from its model folder when the evaluation options differ from the
ones stored in its result. An interrupted cell resumes from its newest checkpoint (or, killed
during its evaluation, reuses its export), so killing and re-running the same command loses at
most one checkpoint interval. One sweep at a time holds the folder (``ownership.exclusive``).
Every cell trains the same number of steps on the same budget; ``data.repetitions`` = R keeps the
first 1/R of the corpus (DESIGN.md section 3), so R is the epoch count when the budget equals the
corpus.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from dual_lm.atomic import write_json_atomic, write_text_atomic
from dual_lm.config import TrainConfig, run_identity
from dual_lm.errors import UserError
from dual_lm.studies.heldout import scoring_gap
from dual_lm.training.checkpoint import branch_name, export_checkpoint, list_checkpoints
from dual_lm.training.origins import with_init_shape
from dual_lm.training.runlog import VAL_KEYS, final_metrics

# a cell result's evaluation part: recomputed (without retraining) when the evaluation options change
EVAL_KEYS = ("causal_nll", "prefix_nll", "prefix_gain", "windows", "tasks_causal", "tasks_prefix", "evaluation")
COLUMN_NAMES = {
    "val_ar_nll": "val AR nll",
    "val_md_loss": "val MD loss",
    "causal_nll": "causal nll",
    "prefix_nll": "prefix nll",
    "prefix_gain": "prefix gain",
    "tasks_causal": "tasks causal",
    "tasks_prefix": "tasks prefix",
}


@dataclass(frozen=True)
class SweepSpec:
    alphas: tuple[float, ...]
    repetitions: tuple[int, ...]
    out_dir: Path
    nproc: int = 1  # > 1: each cell is its own torchrun job with this many processes
    windows: int = 64  # (context, continuation) windows of the validation split for prefix vs causal scoring
    tasks: tuple[str, ...] = ()  # `dual-lm eval` tasks per cell (causal and prefix), where the budget allows
    eval_limit: int | None = None


def parse_alphas(text: str) -> tuple[float, ...]:
    """``0,0.5,63/64,1`` -> floats in [0, 1] (fractions allowed), in the given order, no duplicates."""
    try:
        values = tuple(float(Fraction(part.strip())) for part in text.split(",") if part.strip())
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--alphas must be comma-separated numbers or fractions like 63/64, got {text!r}") from None
    if not values or any(not 0 <= a <= 1 for a in values) or len(set(values)) != len(values):
        raise UserError(f"--alphas must be distinct values in [0, 1], got {text!r}")
    if len({f"{a:.3f}" for a in values}) != len(values):
        raise UserError(f"--alphas {text!r} holds values equal to 3 decimals: their cells would share a folder")
    return values


def parse_repetitions(text: str) -> tuple[int, ...]:
    """``1,16,64`` -> distinct integers >= 1."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--repetitions must be comma-separated integers, got {text!r}") from None
    if not values or any(r < 1 for r in values) or len(set(values)) != len(values):
        raise UserError(f"--repetitions must be distinct integers >= 1, got {text!r}")
    return values


def cell_config(base: TrainConfig, alpha: float, repetitions: int, cell_dir: Path) -> TrainConfig:
    """The base config with this cell's alpha, repetitions and run folder."""
    cfg = copy.deepcopy(base)
    cfg.objective.alpha, cfg.data.repetitions, cfg.output = alpha, repetitions, str(cell_dir / "run")
    return cfg


# ----------------------------------------------------------------------------- one cell


def train_cell(cfg: TrainConfig, nproc: int) -> None:
    """Train (or resume) the cell's run to ``train.steps``: in this process, or as a torchrun job."""
    from dual_lm.training.train import run_training

    run_dir = Path(cfg.output)
    resume = bool(list_checkpoints(run_dir)) if run_dir.is_dir() else False
    if nproc == 1:
        run_training(cfg, resume=resume)
        return
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.parent / "train.yaml"
    write_text_atomic(config_file, yaml.safe_dump(cfg.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "dual_lm", "train", str(config_file), *(["--resume"] if resume else [])]
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(f"the torchrun job of {run_dir.parent.name} failed; re-run the sweep to resume it")


def task_scores(model_dir: Path, spec: SweepSpec) -> dict:
    """Average normalized accuracy of ``spec.tasks`` in causal and prefix mode (empty without tasks)."""
    if not spec.tasks:
        return {}
    from dual_lm.evaluation.evaluate import EvalJob, run_job
    from dual_lm.evaluation.runner import EvalSettings

    out = {}
    for mode in ("causal", "prefix"):
        results = run_job(EvalJob(str(model_dir), list(spec.tasks), EvalSettings(mode), spec.eval_limit))
        out[f"tasks_{mode}"] = results["average"]["normalized_acc"]
    return out


def _comparable(config: dict) -> dict:
    return run_identity(config)


def check_same_config(cell_dir: Path, cfg: TrainConfig) -> None:
    """A cell finished or started under another config is an error, not something to reuse."""
    path = cell_dir / "run" / "config.json"  # written by every (re)start of the cell's training
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete the cell {cell_dir} to rerun it") from None
    if not isinstance(saved, dict) or _comparable(saved) != _comparable(with_init_shape(cfg).to_dict()):
        raise UserError(
            f"{cell_dir} was run with another config (see {path}); use a new --output, or delete the cell to rerun it"
        )


def evaluation_options(spec: SweepSpec) -> dict:
    """What a cell's evaluation numbers depend on besides its model; stored in its ``result.json`` so a
    rerun with other options recomputes them instead of reprinting stale ones."""
    return {"windows": spec.windows, "tasks": list(spec.tasks), "limit": spec.eval_limit if spec.tasks else None}


def evaluate_cell(model_dir: Path, cfg: TrainConfig, spec: SweepSpec) -> dict:
    """The evaluation part of a cell's result: prefix vs causal scoring, task scores, and their options."""
    from dual_lm.folder import load_model

    gap = scoring_gap(load_model(model_dir), cfg.data.path, spec.windows, cfg.data.seq_len)
    return gap | task_scores(model_dir, spec) | {"evaluation": evaluation_options(spec)}


def read_cell_result(path: Path) -> dict:
    """A finished cell's ``result.json``; one line when it is not one (it is written atomically, so only
    a hand edit or a damaged disk gets here)."""
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it to recompute the cell") from None
    if not isinstance(result, dict) or not {"alpha", "repetitions", "curve", "config"} <= set(result):
        raise UserError(f"{path} is not a sweep cell result; delete it to recompute the cell")
    return result


def _trained_model(cfg: TrainConfig, cell_dir: Path, nproc: int) -> Path:
    """The cell's exported model: reused when training is complete and the export is there (an export
    is atomic and made only after training), else trained (or resumed) and exported."""
    from dual_lm.ownership import is_model_folder

    model_dir, run_dir = cell_dir / "model", Path(cfg.output)
    found = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if found and found[-1][0] == cfg.train.steps and model_dir.is_dir() and is_model_folder(model_dir):
        return model_dir
    train_cell(cfg, nproc)
    return export_checkpoint(run_dir, model_dir, overwrite=True)  # a rerun replaces its own


def run_cell(base: TrainConfig, alpha: float, repetitions: int, spec: SweepSpec) -> dict:
    """Train, export and evaluate one cell; returns the result. A finished cell (``result.json``) is
    reused, its evaluation recomputed from its model folder when the evaluation options changed."""
    cell_dir = spec.out_dir / branch_name(alpha, repetitions)
    cfg = cell_config(base, alpha, repetitions, cell_dir)
    check_same_config(cell_dir, cfg)
    done = cell_dir / "result.json"
    if done.is_file():
        result = read_cell_result(done)
        if result.get("evaluation") == evaluation_options(spec):
            return result
        print(f"[sweep] {cell_dir.name}: other evaluation options, re-evaluating (no retraining)", flush=True)
        kept = {k: v for k, v in result.items() if k not in EVAL_KEYS}
        evaluation = evaluate_cell(_trained_model(cfg, cell_dir, spec.nproc), cfg, spec)
        result = _ordered(kept, evaluation)
        write_json_atomic(done, result)
        return result
    model_dir = _trained_model(cfg, cell_dir, spec.nproc)
    final, curve = final_metrics(Path(cfg.output))
    result = {"alpha": alpha, "repetitions": repetitions, "name": cell_dir.name, "steps": cfg.train.steps}
    result |= {k: final[k] for k in VAL_KEYS if k in final} | {"tokens": final.get("tokens")}
    result["curve"], result["config"] = curve, cfg.to_dict()
    result = _ordered(result, evaluate_cell(model_dir, cfg, spec))
    write_json_atomic(done, result)
    return result


def _ordered(result: dict, evaluation: dict) -> dict:
    """The training part, the evaluation, then the curve and config: one key order however it was made."""
    tail = {k: result[k] for k in ("curve", "config") if k in result}
    head = {k: v for k, v in result.items() if k not in tail}
    return head | evaluation | tail


# ----------------------------------------------------------------------------- the grid


SPEC_FORMAT = "dual-lm-sweep/1"


def check_sweep_output(out_dir: Path, base: TrainConfig) -> Path:
    """``out_dir`` may be new, empty, or a sweep folder (resumed); anything else is refused before any
    training starts, and so are the places no command replaces (the data folder, one holding it, the
    current and the home directory)."""
    from dual_lm.ownership import SWEEP, check_output

    return check_output(out_dir, SWEEP, update=True, sources=(base.data.path,))


def spec_record(spec: SweepSpec) -> dict:
    """``sweep.json``: the marker that makes the folder recognisably a sweep, and the grid that made it."""
    return {
        "format": SPEC_FORMAT,
        "alphas": list(spec.alphas),
        "repetitions": list(spec.repetitions),
        "nproc": spec.nproc,
        "evaluation": evaluation_options(spec),
    }


def run_sweep(base: TrainConfig, spec: SweepSpec) -> list[dict]:
    """Every cell in order (repetitions outer, alpha inner), then the report; returns the results.

    The sweep folder is checked first, marked with ``sweep.json`` and held with its lock while the
    sweep runs, so a second sweep on it is refused rather than mixing cells."""
    from dual_lm.ownership import exclusive

    if not Path(base.data.path).is_dir():
        raise UserError(f"data.path {base.data.path!r} is not a prepare-data folder (see `dual-lm prepare-data`)")
    check_sweep_output(spec.out_dir, base)
    cells = [(a, r) for r in spec.repetitions for a in spec.alphas]
    with exclusive(spec.out_dir, "sweep"):
        for alpha, reps in cells:  # every cell before any work, so a refused rerun changes nothing
            cell_dir = spec.out_dir / branch_name(alpha, reps)
            check_same_config(cell_dir, cell_config(base, alpha, reps, cell_dir))
            if (cell_dir / "result.json").is_file():
                read_cell_result(cell_dir / "result.json")
        write_json_atomic(spec.out_dir / "sweep.json", spec_record(spec))
        results = []
        for n, (alpha, reps) in enumerate(cells, 1):
            print(f"[sweep] cell {n}/{len(cells)}: {branch_name(alpha, reps)}", flush=True)
            results.append(run_cell(base, alpha, reps, spec))
        write_report(results, spec.out_dir)
    return results


def results_table(results: list[dict]) -> str:
    """Markdown: one row per cell."""
    columns = ["val_ar_nll", "val_md_loss", "causal_nll", "prefix_nll", "prefix_gain"]
    columns += [k for k in ("tasks_causal", "tasks_prefix") if any(k in r for r in results)]
    lines = ["| alpha | R | " + " | ".join(COLUMN_NAMES[k] for k in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for r in results:
        values = " | ".join(f"{r.get(k, math.nan):.3f}" for k in columns)
        lines.append(f"| {r['alpha']:.3f} | {r['repetitions']} | {values} |")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict], out_dir: Path) -> None:
    """results.json, results.md, heatmap.png and curves.png in ``out_dir``."""
    from dual_lm.studies.plot import plot_sweep_curves, plot_sweep_heatmap

    write_json_atomic(out_dir / "results.json", {"cells": results})
    write_text_atomic(out_dir / "results.md", results_table(results))
    plot_sweep_heatmap(results, out_dir / "heatmap.png")
    plot_sweep_curves(results, out_dir / "curves.png")
