"""Model presets and the mapping from the reference trainer's config keys to a ``LlamaConfig``."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig

from dual_lm.errors import UserError
from dual_lm.tokens import BOS_ID, EOS_ID, MASK_ID, PAD_ID

# The context of the published models; a trained model gets at least this many positions.
CONTEXT = 2048
# Mixes a seed with a rank or an epoch into one generator seed (a prime, so no two pairs collide
# below it).
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that define a dual-objective LLaMA model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = 51200
    max_position_embeddings: int = CONTEXT
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


MAX_SIZE = 1 << 31  # above any real model's dimension; larger values overflow torch's shape arithmetic


def check_shape(shape: ModelShape) -> None:
    """ValueError unless every size is an integer in [1, MAX_SIZE], the heads divide the hidden size,
    the head size is even (rotary embeddings rotate pairs) and rope theta and the norm eps are positive."""
    for name in ("num_layers", "hidden_size", "num_heads", "head_dim", "intermediate_size", "vocab_size"):
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise ValueError(f"model.{name} must be an integer in [1, {MAX_SIZE}], got {value!r}")
    if shape.hidden_size % shape.num_heads:
        raise ValueError(f"model.hidden_size {shape.hidden_size} is not a multiple of num_heads={shape.num_heads}")
    if shape.head_dim % 2:
        raise ValueError(f"model.head_dim {shape.head_dim} must be even for rotary embeddings")
    for name in ("rope_theta", "rms_norm_eps"):
        value = getattr(shape, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"model.{name} must be a positive number, got {value!r}")


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
        rms_norm_eps=float(shape.rms_norm_eps),
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


def _reference_json(path: Path) -> dict:
    """The reference config's JSON object; one line for a missing, empty, truncated or non-object file."""
    if not path.is_file():
        raise UserError(f"reference config {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        raw = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"reference config {path} is not UTF-8 JSON text") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"reference config {path} is not valid JSON ({err.msg} at line {err.lineno}); it may be empty or truncated"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"reference config {path} holds a JSON {type(raw).__name__}, not an object of settings")
    return raw


def _reference_size(raw: dict, key: str, path: Path, default: int | None = None) -> int:
    """A size of the reference config: a positive integer (true/false, strings and 64.0 are refused)."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"reference config {path}: {key} must be a positive integer, got {value!r}")
    return value


def _reference_number(raw: dict, key: str, path: Path, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"reference config {path}: {key} must be a positive number, got {value!r}")
    return float(value)


def load_reference_config(path: str | Path) -> ModelShape:
    """Read a reference-trainer ``config.json`` into a ``ModelShape``; unknown or unsupported keys and
    sizes that are not positive integers are errors (a zero or non-numeric size would otherwise surface
    as a ZeroDivisionError or a tensor error deep inside model construction)."""
    path = Path(path)
    raw = _reference_json(path)
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
    sizes = {key: _reference_size(raw, key, path) for key in required}
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if "d_h" not in raw and hidden % heads:
        raise UserError(
            f"reference config {path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
            "give the head size as d_h"
        )
    head_dim = _reference_size(raw, "d_h", path, hidden // heads)
    if head_dim % 2:
        raise UserError(f"reference config {path}: the head size {head_dim} must be even (rotary embeddings)")
    return ModelShape(
        num_layers=sizes["num_layers"],
        hidden_size=hidden,
        num_heads=heads,
        head_dim=head_dim,
        intermediate_size=sizes["intermediate_size"],
        vocab_size=sizes["vocab_size"],
        max_position_embeddings=_reference_size(raw, "max_sequence_length", path, 2048),
        rope_theta=_reference_number(raw, "rope_theta", path, 160_000.0),
        rms_norm_eps=_reference_number(raw, "norm_eps", path, 1e-7),
    )


def parameter_counts(shape: ModelShape) -> dict[str, int]:
    """Parameter counts from the shape alone: total, embeddings (input + output layer), non-embedding."""
    h, i, v, d = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_heads * shape.head_dim
    per_layer = 3 * h * d + d * h + 3 * h * i + 2 * h
    embeddings = v * h + (v * h + v)
    total = embeddings + shape.num_layers * per_layer + h + h * h
    return {"total": total, "embedding": embeddings, "non_embedding": total - embeddings}


# ---------------------------------------------------------------------- training run configs


@dataclass
class ModelSection:
    preset: str = "tiny"
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    vocab_size: int | None = None  # embedding rows; default: the data's vocabulary
    init_from: str = ""  # a model folder whose weights start the run (continued pretraining)

    def shape(self, vocab_size: int, max_positions: int) -> ModelShape:
        """The run's shape; ``vocab_size`` (the data's) unless the section names its own."""
        overrides = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("preset", "init_from") and v is not None
        }
        overrides.setdefault("vocab_size", vocab_size)
        return preset(self.preset, max_position_embeddings=max_positions, **overrides)


@dataclass
class DataSection:
    path: str = ""  # a prepare-data folder
    seq_len: int = 256
    repetitions: int = 1


@dataclass
class ObjectiveConfig:
    alpha: float = 63 / 64  # the AR share
    alpha_mode: str = "rows"  # rows | ranks
    ar_weight: float = 2.0  # 2.0 as released; 1.0 is the v3 paper's equation
    z_loss: float = 1e-4


@dataclass
class OptimSection:
    lr: float = 0.007
    weight_decay: float = 0.1
    warmup: float = 0.0  # fraction of steps
    decay: float = 0.25  # fraction of steps
    decay_kind: str = "linear"  # linear | sqrt | cosine
    ns_dtype: str = "float32"  # Muon's Newton-Schulz: float32 (the fixture) or bfloat16 (~10x faster on GPU)


@dataclass
class TrainSection:
    steps: int = 100
    global_batch_tokens: int = 16384
    micro_batch_rows: int = 8  # rows per rank per forward pass
    seed: int = 0
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimiser state with FSDP2 (torchrun only)
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    decay_from: str = ""  # a checkpoint (or run folder) of another run to continue from, e.g. into its decay


@dataclass
class EvalSection:
    every: int = 50  # steps; 0 = only at the end
    batches: int = 4


@dataclass
class CheckpointSection:
    every: int = 50
    keep_last: int = 2  # 0 keeps every checkpoint
    exponential: bool = False  # also keep checkpoints at steps 1, 2, 4, 8, ... (the reference's schedule)


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = False


@dataclass
class TrainConfig:
    output: str = "runs/train"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """One UserError for the first setting out of range. Only what needs the world size (the batch
        split, ranks mode, FSDP) or the schedule's own math is left to ``training.train.make_plan``."""
        o, t = self.objective, self.train
        if not 0.0 <= o.alpha <= 1.0:
            raise UserError(f"objective.alpha must lie in [0, 1], got {o.alpha}")
        for name, value, low, strict in (
            ("optim.lr", self.optim.lr, 0.0, True),
            ("optim.weight_decay", self.optim.weight_decay, 0.0, False),
            ("objective.ar_weight", o.ar_weight, 0.0, True),
            ("objective.z_loss", o.z_loss, 0.0, False),
        ):
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise UserError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value}")
        try:
            check_shape(self.model.shape(1, max(self.data.seq_len, CONTEXT)))  # the vocabulary comes from the data
        except ValueError as err:
            raise UserError(str(err)) from None
        if self.checkpoint.keep_last < 0:
            raise UserError(
                f"checkpoint.keep_last must be >= 0 (0 keeps every checkpoint), got {self.checkpoint.keep_last}"
            )
        for name, value, choices in (
            ("objective.alpha_mode", o.alpha_mode, ("rows", "ranks")),
            ("optim.ns_dtype", self.optim.ns_dtype, ("float32", "bfloat16")),
            ("train.dtype", t.dtype, ("auto", "float32", "bfloat16")),
        ):
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        for name, value in (
            ("train.steps", t.steps),
            ("train.micro_batch_rows", t.micro_batch_rows),
            ("data.seq_len", self.data.seq_len),
            ("data.repetitions", self.data.repetitions),
            ("train.global_batch_tokens", t.global_batch_tokens),
            ("log.every", self.log.every),
            ("checkpoint.every", self.checkpoint.every),
            ("eval.batches", self.eval.batches),
        ):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.eval.every < 0 or t.seed < 0:
            raise UserError("eval.every and train.seed must be >= 0")
        if not self.data.path:
            raise UserError("data.path is not set: point it at a `dual-lm prepare-data` folder")


def _coerce(value, default, name: str):
    """Check a value against the type of the field's default (None defaults accept int or float)."""
    if isinstance(default, bool) or (default is None and isinstance(value, bool)):
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) or (default is None and isinstance(value, int)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float) or default is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {value!r}")
    return value


def _fill(obj, values: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"unknown config key {name!r}{closest(key, fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key {name!r} is a section; give it as a mapping")
            _fill(current, value, f"{name}.")
        elif not (value is None and current is None):  # None keeps an optional field unset
            if current is None and "int" in str(fields[key].type):  # an optional int (e.g. model.num_layers)
                current = 0
            setattr(obj, key, _coerce(value, current, name))


def parse_override(text: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}} with the value read as YAML (numbers, booleans, strings)."""
    import yaml

    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (only what differs from the defaults) plus ``key=value`` overrides."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise UserError(f"{path} must hold a mapping of sections")
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg = TrainConfig()
    _fill(cfg, values)
    return cfg


def config_from_dict(values: dict) -> TrainConfig:
    cfg = TrainConfig()
    _fill(cfg, values)
    return cfg


def run_identity(config: dict) -> dict:
    """What makes two configs the same run: every setting but ``output``, defaults filled in, so a
    config written before a key existed still equals one that has the key at its default, and a
    moved or copied run folder resumes. A config that does not parse is compared as written."""
    with contextlib.suppress(UserError, TypeError, AttributeError):
        config = config_from_dict(config).to_dict()
    return {k: v for k, v in config.items() if k != "output"}
