"""Atomic training checkpoints: everything a resumed run needs to continue bit for bit.

A checkpoint is a folder ``RUN/checkpoints/step-00000100`` holding

    model.safetensors   the weights
    trainer.pt          optimiser state, loader state, RNG states (torch.save, tensors and plain data)
    state.json          step, resolved config, package version (human readable)
    tokenizer.json      the run's tokenizer, so the checkpoint exports on its own

It is written into ``.step-00000100.tmp``, every file fsynced, then renamed into place and the
parent fsynced: a kill at any moment leaves either no new checkpoint or a complete one, and the
previous checkpoints untouched. Only folders named ``step-*`` count; leftovers are ignored.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dual_lm.atomic import fsync_dir, fsync_file
from dual_lm.errors import UserError

_NAME = re.compile(r"step-(\d{8})")
_FILES = ("model.safetensors", "trainer.pt", "state.json")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    run_dir: Path, step: int, weights: dict, trainer_state: dict, meta: dict, tokenizer: Path | None
) -> Path:
    """Write the checkpoint of ``step`` atomically; returns its folder."""
    final = checkpoint_dir(run_dir, step)
    staging = final.with_name(f".{final.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
    torch.save(trainer_state, staging / "trainer.pt")
    (staging / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, staging / "tokenizer.json")
    for path in staging.iterdir():
        fsync_file(path)
    fsync_dir(staging)
    if final.exists():  # a re-save of the same step after a resume: move the old one aside first
        _discard(final)
    staging.rename(final)
    fsync_dir(final.parent)
    return final


def _discard(path: Path) -> None:
    """Rename a checkpoint out of the ``step-*`` namespace, then delete it: a kill never leaves half of one."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    path.rename(trash)
    shutil.rmtree(trash)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _NAME.fullmatch(p.name)) and all((p / f).is_file() for f in _FILES)
    ]
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep_last: int, exponential: bool) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and, with ``exponential``, those at powers of two).

    ``keep_last <= 0`` keeps every checkpoint.
    """
    found = list_checkpoints(run_dir)
    if keep_last <= 0:
        return
    keep = {step for step, _ in found[-keep_last:]}
    for step, path in found:
        is_power = step > 0 and step & (step - 1) == 0
        if step not in keep and not (exponential and is_power):
            _discard(path)


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(weights, trainer state, meta) of a checkpoint folder."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path} is not a complete checkpoint (it needs model.safetensors and state.json)")
    weights = load_file(str(path / "model.safetensors"))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "state.json").read_text())
    return weights, trainer, meta


def branch_name(alpha: float, repetitions: int) -> str:
    """The released models' branch naming: ``alpha_{alpha:.3f}_n-reps={R}``."""
    return f"alpha_{alpha:.3f}_n-reps={repetitions}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path} is neither a checkpoint nor a run folder with checkpoints")
    return found[-1][1]


def export_checkpoint(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write a model folder (weights, config, modeling file, tokenizer) from a training checkpoint."""
    from dual_lm.config import config_from_dict, llama_config
    from dual_lm.folder import save_folder
    from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM

    ckpt = resolve_checkpoint(path)
    weights, _, meta = load_checkpoint(ckpt)
    cfg = config_from_dict(meta["config"])
    vocab = weights["model.embed_tokens.weight"].shape[0]
    shape = cfg.model.shape(vocab, max(cfg.data.seq_len, 2048))
    model = DLMLlamaForCausalLM(llama_config(shape))
    model.load_state_dict(weights)
    if out_dir is None:
        out_dir = ckpt.parent.parent / branch_name(cfg.objective.alpha, cfg.data.repetitions)
    tokenizer = ckpt / "tokenizer.json"
    return save_folder(model, out_dir, tokenizer if tokenizer.is_file() else None)
