"""Where a run starts: from scratch, from a model folder's weights (``model.init_from``), from another
run's checkpoint (``train.decay_from``), or from its own checkpoint with a changed schedule.

Warmup-stable-decay exists so that a run can be continued or branched while its learning rate is
flat (Hu et al., MiniCPM, arXiv 2404.06395; Hagele et al., arXiv 2405.18392). The rule here is the
exact form of that idea: a checkpoint taken after ``S`` updates may continue under a new schedule
(``train.steps``, ``optim.warmup``, ``optim.decay``, ``optim.decay_kind``) when every one of those
``S`` updates had the same learning rate (and, in ranks mode, the same rank rotation) under the new
schedule as under its own. Then the continued run equals, bit for bit, a run that had the new
schedule from the start. A checkpoint inside its decay fails the rule, and is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dual_lm.config import ModelSection, TrainConfig, preset, run_identity
from dual_lm.errors import UserError
from dual_lm.training.objectives import rotation_epoch
from dual_lm.training.optim import wsd_lr_factor

SCHEDULE_KEYS = (("train", "steps"), ("optim", "warmup"), ("optim", "decay"), ("optim", "decay_kind"))
# where a run writes and branched from, and what never changes an update (bit-exact with or without)
FREE_KEYS = (
    ("output", None), ("train", "decay_from"), ("train", "activation_checkpointing"),
    ("checkpoint", None), ("log", None), ("eval", None),
)  # fmt: skip


def identity_but_schedule(config: dict) -> dict:
    """What must not change when a run is continued: the config without its schedule and the settings
    that never change an update (the output, the origin, checkpointing, logging, validation)."""
    out = json.loads(json.dumps(run_identity(config)))  # defaults filled in; a deep copy of plain JSON values
    for section, key in (*SCHEDULE_KEYS, *FREE_KEYS):
        if key is None:
            out.pop(section, None)  # "output" is gone already; the free sections go here
        elif isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, value in a, value in b) of the first setting that differs between two configs."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found is not None:
                return found
        elif x != y:
            return f"{prefix}{key}", x, y
    return None


def _factor(cfg: TrainConfig, step: int) -> float:
    o = cfg.optim
    return wsd_lr_factor(step, cfg.train.steps, o.warmup, o.decay, o.decay_kind)


def _rotation(cfg: TrainConfig, step: int) -> int | None:
    if cfg.objective.alpha_mode != "ranks":
        return None
    return rotation_epoch(step, cfg.train.steps, cfg.data.repetitions)


def decay_start(cfg: TrainConfig) -> int:
    """The index of the first update of the decay (``train.steps`` when there is none)."""
    total = cfg.train.steps
    warmup = int(cfg.optim.warmup * total)
    return total - min(int(cfg.optim.decay * total), total - warmup)


def check_same_past(old: TrainConfig, new: TrainConfig, step: int, where: str) -> None:
    """Refuse to continue the checkpoint ``where`` (taken after ``step`` updates under ``old``) under
    ``new`` unless ``new`` gives every update taken the same learning rate and rank rotation."""
    if step > new.train.steps:
        raise UserError(f"{where} has taken {step} updates, more than train.steps={new.train.steps}")
    for s in range(step):
        if _factor(old, s) != _factor(new, s) or _rotation(old, s) != _rotation(new, s):
            break
    else:
        return
    raise UserError(_why_not(old, new, s, step, where))


def _why_not(old: TrainConfig, new: TrainConfig, s: int, step: int, where: str) -> str:
    """The message for the first update ``s`` whose learning rate or rank rotation would change."""
    if _rotation(old, s) != _rotation(new, s):
        return (
            f"update {s} of {where} ran in rank-rotation epoch {_rotation(old, s)} but would run in epoch "
            f"{_rotation(new, s)}: with objective.alpha_mode=ranks and data.repetitions > 1 the epochs are "
            "train.steps / data.repetitions long, so the run's length cannot change"
        )
    start, new_start = decay_start(old), decay_start(new)
    if s >= start:
        return (
            f"{where} is {step - start} update(s) into the decay of its {old.train.steps}-step schedule (from "
            f"step {start}): the new schedule would have taken them at another learning rate; continue from a "
            f"checkpoint at step {start + 1} or earlier (train.decay_from=CHECKPOINT branches a new run from one)"
        )
    if s >= new_start:
        return (
            f"the new schedule's decay begins at step {new_start}, before {where}'s step {step}: choose "
            f"train.steps and optim.decay so that the decay begins at step {step} or later"
        )
    return (
        f"update {s} of {where} ran at learning-rate factor {_factor(old, s):.6g} but the new schedule gives it "
        f"{_factor(new, s):.6g} (the warmup is optim.warmup x train.steps updates, so a longer run lengthens it); "
        "set optim.warmup so that the updates already taken keep their learning rates"
    )


# ---------------------------------------------------------------------------- model.init_from

SHAPE_FIELDS = {  # ModelSection field -> config.json key of a model folder
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


def _tokenization(path: Path) -> dict:
    """The parts of a tokenizer JSON that decide which ids a text gets (flags such as ``<mask>``'s strips aside)."""
    spec = json.loads(path.read_text())
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    return {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model")} | {"added": added}


def check_same_tokenizer(folder: Path, data: Path, key: str = "model.init_from") -> None:
    """The tokenizer of ``folder`` (a model folder, or a checkpoint for ``train.decay_from``) must give the
    data's ids: one clear line otherwise."""
    ours, theirs = folder / "tokenizer.json", data / "tokenizer.json"
    if not ours.is_file():
        raise UserError(
            f"{key}: {folder} has no tokenizer.json, so its token ids cannot be checked against the data's; "
            "add the tokenizer it was trained with (convert-reference --tokenizer)"
        )
    if not theirs.is_file():
        raise UserError(f"data folder {data} has no tokenizer.json; re-run `dual-lm prepare-data`")
    if _tokenization(ours) != _tokenization(theirs):
        raise UserError(
            f"{key}: {folder}'s tokenizer differs from the one {data} was prepared with; prepare the "
            f"data with `dual-lm prepare-data --tokenizer {ours}`"
        )


def with_init_shape(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``model.*`` filled from the ``model.init_from`` folder (checked, with its tokenizer
    against the data's), so the run config alone describes the model (exports rebuild it from there);
    ``cfg`` itself when there is no init_from. Settings that contradict the folder are refused."""
    from dual_lm.folder import open_folder

    name = cfg.model.init_from
    if not name:
        return cfg
    started = _started_model(cfg)
    if started is not None:  # a run that has started took its shape from the folder then: no need for it now
        return dataclasses.replace(cfg, model=started)
    weights = ("model.safetensors", "model.safetensors.index.json")
    if (Path(name) / "checkpoints").is_dir() and not any((Path(name) / w).is_file() for w in weights):
        raise UserError(
            f"model.init_from: {name} is a run folder; export a checkpoint (`dual-lm export {name} OUT`) and "
            "start from that, or continue the run itself with train.decay_from"
        )
    opened = open_folder(name)
    folder_shape = {field: opened.config[key] for field, key in SHAPE_FIELDS.items()}
    _check_no_contradiction(cfg.model, folder_shape, name)
    data = Path(cfg.data.path)
    if (data / "manifest.json").is_file():  # a folder that is no data folder is refused by the loader
        check_same_tokenizer(opened.path, data)
    model = dataclasses.replace(cfg.model, **folder_shape)
    return dataclasses.replace(cfg, model=model)


def _started_model(cfg: TrainConfig) -> ModelSection | None:
    """The model section of the run folder's ``config.json`` when that run was started from the same
    ``init_from`` with the same settings given (a resume, or a sweep cell run again), else None."""
    path = Path(cfg.output) / "config.json"
    try:
        saved = json.loads(path.read_text())["model"]
        section = ModelSection(**saved)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if section.init_from != cfg.model.init_from:
        return None
    given = dataclasses.asdict(cfg.model)
    if any(v != getattr(ModelSection, k) and v != saved.get(k) for k, v in given.items() if k != "preset"):
        return None  # another setting given now: checked against the folder again
    return section


def _check_no_contradiction(section: ModelSection, folder_shape: dict, name: str) -> None:
    """Each ``model.*`` setting given (a preset implies its sizes, not its vocabulary) must equal the folder's."""
    given = {k: v for k, v in dataclasses.asdict(section).items() if k != "init_from" and v != getattr(ModelSection, k)}
    implied = dataclasses.asdict(preset(given.pop("preset"))) if "preset" in given else {}
    implied = {k: implied[k] for k in folder_shape if k in implied and k != "vocab_size"}
    for field, value in {**implied, **given}.items():
        if field in folder_shape and value != folder_shape[field]:
            raise UserError(
                f"model.{field}={value} contradicts model.init_from {name}, which has {field}="
                f"{folder_shape[field]}; leave the other model.* settings out with init_from"
            )


def init_weights(name: str) -> dict:
    """The float32 weights of the model folder ``name`` under our tensor names (reference names mapped)."""
    import torch

    from dual_lm.folder import load_model

    return load_model(name, dtype=torch.float32).state_dict()
