"""The ``dual-lm eval`` job: load a model folder, run the chosen tasks, write the results JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dual_lm.evaluation.results import build_results
from dual_lm.evaluation.runner import EvalSettings, TaskRun, run_task
from dual_lm.evaluation.tasks import load_items
from dual_lm.folder import check_device, load_folder


@dataclass(frozen=True)
class EvalJob:
    folder: str | Path
    tasks: list[str]
    settings: EvalSettings = field(default_factory=EvalSettings)
    limit: int | None = None
    blimp_path: str | Path | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


def model_info(folder: str | Path) -> dict:
    from dual_lm.folder import inspect_folder

    info = inspect_folder(folder)
    return {"name": Path(folder).resolve().name, "folder": str(Path(folder).resolve()), "parameters": info.total}


def run_job(job: EvalJob) -> dict:
    """Evaluate every task of ``job`` (data is loaded before the model, so missing data fails fast)."""
    import torch

    device = str(check_device(job.device))  # auto resolved: the results name the device that ran
    items = {name: load_items(name, job.limit, job.blimp_path) for name in job.tasks}
    torch.manual_seed(job.seed)
    model, tokenizer = load_folder(job.folder, device, job.dtype)
    runs: list[TaskRun] = [run_task(model, tokenizer, name, items[name], job.settings) for name in job.tasks]
    extra = {"seed": job.seed, "limit": job.limit, "device": device, "dtype": str(model.dtype).split(".")[-1]}
    return build_results(model_info(job.folder), job.settings, runs, **extra)
