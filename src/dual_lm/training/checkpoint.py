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

import contextlib
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dual_lm.atomic import fsync_dir, settle_folder
from dual_lm.errors import UserError
from dual_lm.tokenizer import load_tokenizer_file, save_tokenizer, with_mask_strips

_NAME = re.compile(r"step-(\d{8})")
_FILES = ("model.safetensors", "trainer.pt", "state.json")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


class DamagedCheckpoint(UserError):
    """A checkpoint whose files cannot be read back (a kill or a full disk while it was copied, bit rot)."""


def save_checkpoint(
    run_dir: Path, step: int, weights: dict, trainer_state: dict, meta: dict, tokenizer: Path | None
) -> Path:
    """Write the checkpoint of ``step`` atomically; returns its folder. On any error (a full disk) the
    staging folder is removed and the earlier checkpoints are untouched."""
    final = checkpoint_dir(run_dir, step)
    staging = final.with_name(f".{final.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        torch.save(trainer_state, staging / "trainer.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        if tokenizer is not None:
            save_tokenizer(with_mask_strips(load_tokenizer_file(tokenizer)), staging / "tokenizer.json")
        settle_folder(staging)  # the umask's modes (safetensors writes 0600), flushed to disk
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = final.with_name(f".trash-{final.name}")
    if final.exists():  # a re-save of the same step after a resume: the old one goes aside first
        if trash.exists():
            shutil.rmtree(trash)
        final.rename(trash)
    staging.rename(final)  # a kill before this line: remove_leftovers renames the complete staging in
    fsync_dir(final.parent)
    if trash.exists():
        shutil.rmtree(trash)
    return final


def _discard(path: Path) -> None:
    """Rename a checkpoint out of the ``step-*`` namespace, then delete it: a kill never leaves half of one
    (the next run removes the ``.trash-*`` folder a kill left, see ``remove_leftovers``)."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    path.rename(trash)
    shutil.rmtree(trash)


_LEFTOVER = re.compile(r"\.step-\d{8}\.tmp|\.trash-step-\d{8}")


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what a killed save or prune left in ``RUN/checkpoints`` (``.step-*.tmp`` staging folders,
    ``.trash-step-*`` folders); returns them. Only the holder of the run's lock may call this.

    A kill in the middle of a re-save (old step set aside as ``.trash-step-N``, the new one complete in
    ``.step-N.tmp``, no ``step-N``) is finished first: the complete staging is renamed in, so the step
    is never lost.
    """
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    for trash in folder.glob(".trash-step-*"):
        final, staging = folder / trash.name[len(".trash-") :], folder / f".{trash.name[len('.trash-') :]}.tmp"
        if not final.exists() and staging.is_dir() and _LEFTOVER.fullmatch(trash.name):
            staging.rename(final)  # without a staging copy, the trash is a prune's: it stays deleted
    found = sorted(p for p in folder.iterdir() if _LEFTOVER.fullmatch(p.name))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


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


def prune_checkpoints(run_dir: Path, keep_last: int, exponential: bool, upto: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and, with ``exponential``, those at powers of two).

    ``keep_last <= 0`` keeps every checkpoint. With ``upto``, checkpoints after that step are neither
    counted nor deleted: after a resume that skipped a damaged newer checkpoint, that one must not
    stand in for a good one (the run replaces it when it gets there).
    """
    found = [(step, path) for step, path in list_checkpoints(run_dir) if upto is None or step <= upto]
    if keep_last <= 0:
        return
    keep = {step for step, _ in found[-keep_last:]}
    for step, path in found:
        is_power = step > 0 and step & (step - 1) == 0
        if step not in keep and not (exponential and is_power):
            _discard(path)


# What a damaged file raises when read back: safetensors' header errors, torch.load's zip and pickle
# errors (a truncated or overwritten trainer.pt), and I/O errors of an unreadable file.
_READ_ERRORS = (SafetensorError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, OSError)


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(weights, trainer state, meta) of a checkpoint folder; ``DamagedCheckpoint`` (one line naming the
    file) when a file is missing or cannot be read back."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise DamagedCheckpoint(f"{path} is not a complete checkpoint (it needs model.safetensors and state.json)")
    try:
        meta = json.loads((path / "state.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpoint(f"{path / 'state.json'} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise DamagedCheckpoint(f"{path / 'state.json'} does not hold the run config")
    weights = _read(path / "model.safetensors", lambda f: load_file(str(f)))
    trainer = _read(path / "trainer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(trainer, dict):
        raise DamagedCheckpoint(f"{path / 'trainer.pt'} does not hold a trainer state")
    return weights, trainer, meta


def _read(path: Path, reader):
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing")
    try:
        return reader(path)
    except _READ_ERRORS as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedCheckpoint(f"{path} cannot be read ({reason})") from None


def branch_name(alpha: float, repetitions: int) -> str:
    """The released models' branch naming: ``alpha_{alpha:.3f}_n-reps={R}``."""
    return f"alpha_{alpha:.3f}_n-reps={repetitions}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise UserError(f"{path} {what}; give a checkpoint folder or a run folder with checkpoints")
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path} is neither a checkpoint nor a run folder with checkpoints")
    return found[-1][1]


def _run_of(checkpoint: Path) -> Path | None:
    """The run folder of ``RUN/checkpoints/step-N``, or None for a checkpoint kept elsewhere."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _export_model(checkpoint: Path, weights: dict, meta: dict):
    """(model holding the checkpoint's weights, run config); one line when they do not fit together."""
    from dual_lm.config import CONTEXT, config_from_dict, llama_config
    from dual_lm.folder import compare_shapes
    from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM

    try:
        cfg = config_from_dict(meta["config"])
    except UserError as err:
        raise DamagedCheckpoint(f"{checkpoint / 'state.json'} holds an invalid run config: {err}") from None
    embedding = weights.get("model.embed_tokens.weight")
    if embedding is None or embedding.dim() != 2:
        raise DamagedCheckpoint(f"{checkpoint / 'model.safetensors'} has no 2-D model.embed_tokens.weight")
    shape = cfg.model.shape(embedding.shape[0], max(cfg.data.seq_len, CONTEXT))
    model = DLMLlamaForCausalLM(llama_config(shape))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    problems = compare_shapes({name: tuple(t.shape) for name, t in weights.items()}, expected)
    if problems:
        raise DamagedCheckpoint(f"the weights of {checkpoint} do not match its run config: {'; '.join(problems)}")
    model.load_state_dict(weights)
    return model, cfg


def export_checkpoint(path: str | Path, out_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write a model folder (weights, config, modeling file, tokenizer) from a training checkpoint.

    ``out_dir`` (default ``RUN/alpha_{alpha:.3f}_n-reps={R}``) must be new or empty, or with
    ``overwrite`` an existing model folder; never the checkpoint, the run, a folder holding either,
    the current or the home directory (``ownership.check_output``). Inside the run folder the export
    holds the run's lock, so it cannot race a trainer of that run.
    """
    from dual_lm.folder import save_folder
    from dual_lm.ownership import MODEL, check_output, exclusive

    checkpoint = resolve_checkpoint(path)
    run_dir = _run_of(checkpoint)
    sources = tuple(p for p in (Path(path), checkpoint, run_dir) if p is not None)

    def check(out) -> Path:
        return check_output(out, MODEL, update=overwrite, sources=sources, flag="--overwrite")

    out = None if out_dir is None else check(out_dir)  # refuse before reading the weights
    try:
        weights, _, meta = load_checkpoint(checkpoint)
    except DamagedCheckpoint as err:
        older = " (give an older RUN/checkpoints/step-* folder to export that one)" if checkpoint != Path(path) else ""
        raise DamagedCheckpoint(f"cannot export: {err}{older}") from None
    model, cfg = _export_model(checkpoint, weights, meta)
    if out is None:
        out = check((run_dir or checkpoint.parent) / branch_name(cfg.objective.alpha, cfg.data.repetitions))
    tokenizer = checkpoint / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    card = card_facts(cfg, meta["step"], run_dir)
    if run_dir is not None and out.resolve().is_relative_to(run_dir.resolve()):
        with exclusive(run_dir, "run"):
            return save_folder(model, out, tokenizer, overwrite=overwrite, card=card)
    return save_folder(model, out, tokenizer, overwrite=overwrite, card=card)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def card_facts(cfg, step: int, run_dir: Path | None):
    """What the exported folder's model card says: alpha, repetitions, tokens trained, and the last
    validation figures logged at or before ``step`` (none when the run's metrics are not at hand)."""
    from dual_lm.card import CardFacts
    from dual_lm.training.runlog import METRICS_FILE, VAL_KEYS, read_metrics

    records = []
    if run_dir is not None and (run_dir / METRICS_FILE).is_file():
        with contextlib.suppress(UserError):  # a damaged metrics file costs the card its figures, not the export
            records = [r for r in read_metrics(run_dir) if r.get("step", step + 1) <= step]
    evaluated = [r for r in records if VAL_KEYS[0] in r]
    validation = {k: v for k, v in (evaluated[-1] if evaluated else {}).items() if k in VAL_KEYS and _number(v)}
    logged = records[-1].get("tokens") if records and records[-1].get("step") == step else None
    tokens = logged if _number(logged) else step * cfg.train.global_batch_tokens  # the log's own count first
    source = f"Trained with dual-lm (`dual-lm train`), exported from the checkpoint of step {step:,}."
    return CardFacts(source, cfg.objective.alpha, cfg.data.repetitions, tokens, validation)
