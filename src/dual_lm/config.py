"""Model presets and the mapping from the reference trainer's config keys to a ``LlamaConfig``."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig

from dual_lm.errors import UserError

# Special-token ids of the published tokenizer (and of every tokenizer our recipe trains).
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL_TOKENS = 16


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that define a dual-objective LLaMA model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 51200
    max_position_embeddings: int = 2048
    rope_theta: float = 160_000.0
    rms_norm_eps: float = 1e-7


PRESETS: dict[str, ModelShape] = {
    # the parity fixture's shape; vocab 512 keeps it fast for tests
    "tiny": ModelShape(num_layers=2, hidden_size=64, num_heads=4, head_dim=16, intermediate_size=96, vocab_size=512),
    "small": ModelShape(num_layers=6, hidden_size=256, num_heads=4, head_dim=64, intermediate_size=688),
    "470m": ModelShape(num_layers=24, hidden_size=1024, num_heads=16, head_dim=64, intermediate_size=3554),
}


def closest(name: str, choices) -> str:
    """A 'did you mean' hint for an unknown name, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def preset(name: str, **overrides) -> ModelShape:
    """Return the named preset, with any field replaced by ``overrides``."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}{closest(name, PRESETS)}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    for key in overrides:
        if key not in fields:
            raise UserError(f"unknown model field {key!r}{closest(key, fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def llama_config(shape: ModelShape, task_attention: str = "bidirectional", **extra) -> LlamaConfig:
    """A ``LlamaConfig`` for ``shape`` with the special-token ids and our own keys."""
    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(shape.rope_theta)},
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        mask_token_id=MASK_ID,
        dlm_task_attention=task_attention,
        **extra,
    )


# ---------------------------------------------------------------------- reference trainer configs

REFERENCE_KEYS = {
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "d_h",
    "vocab_size",
    "max_sequence_length",
    "norm_eps",
    "rope_theta",
    "tie_weights",
    "model",
    "attention_pre_norm_affine",
    "feed_forward_pre_norm_affine",
    "classifier_pre_norm_affine",
}


def load_reference_config(path: str | Path) -> ModelShape:
    """Read a reference-trainer ``config.json`` into a ``ModelShape``; unknown or unsupported keys are errors."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"reference config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"reference config {path} is not valid JSON: {err}") from None
    unknown = sorted(set(raw) - REFERENCE_KEYS)
    if unknown:
        hints = ", ".join(f"{k!r}{closest(k, REFERENCE_KEYS)}" for k in unknown)
        raise UserError(f"unknown key(s) in reference config {path}: {hints}")
    required = ["hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise UserError(f"reference config {path} lacks required key(s): {', '.join(missing)}")
    if raw.get("tie_weights", False):
        raise UserError("tie_weights=true is not supported: the released models have untied embeddings")
    for key in ("attention_pre_norm_affine", "feed_forward_pre_norm_affine", "classifier_pre_norm_affine"):
        if raw.get(key, True) is not True:
            raise UserError(f"{key}=false is not supported: LlamaModel's RMSNorm always has a learnable gain")
    heads = raw["num_attention_heads"]
    return ModelShape(
        num_layers=raw["num_layers"],
        hidden_size=raw["hidden_size"],
        num_heads=heads,
        head_dim=raw.get("d_h", raw["hidden_size"] // heads),
        intermediate_size=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        max_position_embeddings=raw.get("max_sequence_length", 2048),
        rope_theta=float(raw.get("rope_theta", 160_000.0)),
        rms_norm_eps=float(raw.get("norm_eps", 1e-7)),
    )


def parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameter counts from the shape alone: total, embeddings (input + output layer), non-embedding."""
    h, i, v, d = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_heads * shape.head_dim
    per_layer = 3 * h * d + d * h + 3 * h * i + 2 * h
    embeddings = v * h + (v * h + v)
    total = embeddings + shape.num_layers * per_layer + h + h * h
    return {"total": total, "embedding": embeddings, "non_embedding": total - embeddings}
