"""The ``dual-lm eval`` job: load a model folder, run the chosen tasks, write the results JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dual_lm.errors import UserError
from dual_lm.evaluation.results import build_results
from dual_lm.evaluation.runner import EvalSettings, TaskRun, run_task
from dual_lm.evaluation.tasks import load_items


@dataclass(frozen=True)
class EvalJob:
    folder: str | Path
    tasks: list[str]
    settings: EvalSettings = field(default_factory=EvalSettings)
    limit: int | None = None
    blimp_path: str | Path | None = None
    seed: int = 0
    device: str = "cpu"


DTYPES = ("float32", "bfloat16", "float16", "auto")


def check_device(device: str):
    """``device`` as a ``torch.device``; one clear error when it is malformed or names a missing GPU."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"unknown device {device!r} ({err}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def resolve_dtype(dtype, folder: Path):
    """The ``torch.dtype`` to evaluate in: float32 (default), bfloat16, float16, or auto (the folder's own)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if name == "auto":
        try:
            config = json.loads((folder / "config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{folder / 'config.json'} is not valid JSON ({err})") from None
        saved = config.get("dtype") or config.get("torch_dtype") or "float32"  # transformers 5 / 4 key
        saved = str(saved).removeprefix("torch.")
        if saved not in DTYPES or saved == "auto":  # never a silent float32 for a dtype we do not know
            raise UserError(f"{folder / 'config.json'} names dtype {saved!r}; pass one of float32, bfloat16, float16")
        return getattr(torch, saved)
    return getattr(torch, name)


def load_folder(folder: str | Path, device: str = "cpu", dtype=None):
    """(model, tokenizer) of a model folder that carries its tokenizer, on ``device`` in ``dtype``
    (float32 unless asked; ``auto``: the dtype saved in the folder); one error otherwise."""
    from transformers import AutoTokenizer

    from dual_lm.folder import check_folder, load_model

    target = check_device(device)
    folder = check_folder(folder)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; evaluation needs a folder that carries its tokenizer")
    dtype = resolve_dtype(dtype, folder)  # a bad dtype is refused before the weights are read
    model = load_model(folder).to(device=target, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(folder))


def model_info(folder: str | Path) -> dict:
    from dual_lm.folder import inspect_folder

    info = inspect_folder(folder)
    return {"name": Path(folder).resolve().name, "folder": str(Path(folder).resolve()), "parameters": info.total}


def run_job(job: EvalJob) -> dict:
    """Evaluate every task of ``job`` (data is loaded before the model, so missing data fails fast)."""
    import torch

    if job.limit is not None and job.limit < 1:
        raise UserError(f"--limit must be >= 1 (got {job.limit})")
    check_device(job.device)
    items = {name: load_items(name, job.limit, job.blimp_path) for name in job.tasks}
    torch.manual_seed(job.seed)
    model, tokenizer = load_folder(job.folder, job.device)
    runs: list[TaskRun] = [run_task(model, tokenizer, name, items[name], job.settings) for name in job.tasks]
    extra = {"seed": job.seed, "limit": job.limit, "device": job.device, "dtype": str(model.dtype).split(".")[-1]}
    return build_results(model_info(job.folder), job.settings, runs, **extra)
