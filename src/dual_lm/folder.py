"""Model folders: validation on open, loading by mode, atomic saves, and the facts ``dual-lm info`` prints.

Every command that opens a folder (info, fill, generate, score, eval, sweep) goes through
``check_folder``. transformers loads many broken folders without a word: a config without our keys
falls back to default Llama sizes, a missing tensor is initialised at random, a tokenizer larger
than the embedding fails later with an IndexError. Here each of those is one clear line instead.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from dual_lm.atomic import fsync_dir, settle_folder
from dual_lm.card import CARD_FILE, CardFacts, model_card
from dual_lm.config import MAX_SIZE
from dual_lm.errors import UserError
from dual_lm.modeling_dlm_llama import (
    ATTENTION_MODES,
    AUTO_MAP,
    DLMLlamaForCausalLM,
    DLMLlamaForMaskedLM,
)
from dual_lm.ownership import make_staging, remove_stale_staging
from dual_lm.tokenizer import check_tokenizer_fits, save_folder_tokenizer

WEIGHT_FILE = "model.safetensors"
WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (WEIGHT_FILE, WEIGHT_INDEX)
EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.output.weight", "lm_head.output.bias")
SIZE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
SIDE_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
REMEDY = "re-create the folder with `dual-lm export` or `dual-lm convert-reference`"


def _broken(folder: Path, problem: str) -> UserError:
    return UserError(f"model folder {folder}: {problem}")


# ------------------------------------------------------------------------------ config.json


def _read_json(path: Path, folder: Path) -> object:
    """A JSON file of the folder; empty, truncated or non-UTF-8 files are one line."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise _broken(folder, f"{path.name} is not UTF-8 text; {REMEDY}") from None
    if not text.strip():
        raise _broken(folder, f"{path.name} is empty; {REMEDY}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _broken(
            folder, f"{path.name} is not valid JSON ({err.msg} at line {err.lineno}), perhaps truncated; {REMEDY}"
        ) from None


def _positive_int(config: dict, key: str, folder: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise _broken(folder, f"config.json: {key} must be an integer in [1, {MAX_SIZE}], got {value!r}; {REMEDY}")
    return value


def _positive_number(value, key: str, folder: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _broken(folder, f"config.json: {key} must be a positive number, got {value!r}; {REMEDY}")
    return float(value)


def _identity(config: object, folder: Path) -> dict:
    """The config must be a dual-lm Llama config, not a run config or a plain Llama one."""
    if not isinstance(config, dict):
        raise _broken(folder, f"config.json holds a JSON {type(config).__name__}, not an object; {REMEDY}")
    if {"objective", "data", "train"} <= set(config):
        raise _broken(folder, f"config.json is a training run config, not a model config; {REMEDY}")
    if config.get("model_type") != "llama":
        raise _broken(folder, f"config.json has model_type {config.get('model_type')!r}, not 'llama'; {REMEDY}")
    if "mask_token_id" not in config:
        raise _broken(folder, f"config.json lacks mask_token_id, so it is not a dual-lm model; {REMEDY}")
    return config


def _heads(config: dict, folder: Path) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) as the attention layers will build them."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") is None:
        if hidden % heads:
            raise _broken(folder, f"config.json: hidden_size {hidden} is not a multiple of {heads} heads; {REMEDY}")
        head_dim = hidden // heads
    else:
        head_dim = _positive_int(config, "head_dim", folder)
    if head_dim % 2:
        raise _broken(folder, f"config.json: head_dim {head_dim} must be even for rotary embeddings; {REMEDY}")
    kv_heads = (
        heads if config.get("num_key_value_heads") is None else _positive_int(config, "num_key_value_heads", folder)
    )
    if heads % kv_heads:
        raise _broken(folder, f"config.json: {heads} attention heads cannot share {kv_heads} key/value heads; {REMEDY}")
    return head_dim, kv_heads


def validate_config(config: object, folder: Path) -> dict:
    """The config with every size checked and ``head_dim``/``num_key_value_heads`` filled in as the model
    uses them, so nothing printed or built from it is None."""
    config = _identity(config, folder)
    for key in SIZE_KEYS:
        _positive_int(config, key, folder)
    head_dim, kv_heads = _heads(config, folder)
    mask = config["mask_token_id"]
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < config["vocab_size"]:
        raise _broken(folder, f"config.json: mask_token_id {mask!r} is not an id of the vocabulary; {REMEDY}")
    _positive_number(config.get("rms_norm_eps"), "rms_norm_eps", folder)
    rope = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    _positive_number(rope, "rope_theta", folder)
    attention = config.get("dlm_task_attention", "bidirectional")
    if attention not in ATTENTION_MODES:
        raise _broken(
            folder, f"config.json: dlm_task_attention {attention!r} is not one of {', '.join(ATTENTION_MODES)}"
        )
    return {**config, "head_dim": head_dim, "num_key_value_heads": kv_heads, "rope_theta": float(rope)}


def expected_shapes(config: dict, folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the causal/masked LM builds for ``config``, from a model on the meta
    device (no memory is allocated, whatever the sizes)."""
    import torch
    from transformers import LlamaConfig

    try:
        llama = LlamaConfig.from_dict(config)
    except (ValueError, TypeError, KeyError) as err:
        raise _broken(folder, f"config.json is not a valid LlamaConfig ({err}); {REMEDY}") from None
    with torch.device("meta"):
        model = DLMLlamaForCausalLM(llama)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------ weights


def _shards(folder: Path) -> tuple[list[str], dict | None]:
    """The weight files and, for a sharded folder, its index's weight map. ``model.safetensors`` wins
    when both exist, as in transformers."""
    if (folder / WEIGHT_FILE).is_file():
        return [WEIGHT_FILE], None
    index = _read_json(folder / WEIGHT_INDEX, folder)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _broken(folder, f"{WEIGHT_INDEX} has no weight_map of tensor names to shard files; {REMEDY}")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name or Path(name).name != name or name in (".", ".."):
            raise _broken(folder, f"{WEIGHT_INDEX} names shard {name!r}, which is not a file name inside the folder")
        if not (folder / name).is_file():
            raise _broken(folder, f"{WEIGHT_INDEX} names shard {name}, which is missing; {REMEDY}")
    return names, weight_map


def read_weight_headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the safetensors headers, without reading any tensor data."""
    names, weight_map = _shards(folder)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    owner: dict[str, str] = {}
    for name in names:
        try:
            with safe_open(str(folder / name), framework="pt") as handle:
                for tensor in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if tensor in owner:
                        raise _broken(folder, f"tensor {tensor} is stored in both {owner[tensor]} and {name}")
                    piece = handle.get_slice(tensor)
                    found[tensor], owner[tensor] = (piece.get_dtype(), tuple(piece.get_shape())), name
        except SafetensorError as err:
            raise _broken(folder, f"{name} is unreadable ({err}): the file is corrupt or truncated; {REMEDY}") from None
    if weight_map is not None:
        misplaced = sorted(t for t in set(weight_map) | set(owner) if weight_map.get(t) != owner.get(t))
        if misplaced:
            raise _broken(folder, f"{WEIGHT_INDEX} does not match its shards for: {_first(misplaced)}; {REMEDY}")
    return found


def _first(names: list[str], count: int = 4) -> str:
    shown = ", ".join(names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def compare_shapes(found: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """The differences between stored ``{name: shape}`` and the model's, as short phrases (empty if none)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(found) & set(expected))
    misshaped = [f"{n} {found[n]} (expected {expected[n]})" for n in common if tuple(found[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_first(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_first(misshaped, 2)}")
    return problems


def _check_weights(folder: Path, config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    headers = read_weight_headers(folder)
    problems = compare_shapes({n: shape for n, (_, shape) in headers.items()}, expected_shapes(config, folder))
    if problems:
        raise _broken(folder, f"the weights do not match config.json: {'; '.join(problems)}; {REMEDY}")
    odd = sorted(n for n, (dtype, _) in headers.items() if dtype not in FLOAT_DTYPES)
    if odd:
        raise _broken(folder, f"tensors of a non-float dtype: {_first(odd)}; {REMEDY}")
    return headers


# ------------------------------------------------------------------------------ the folder


@dataclass
class OpenedFolder:
    """A validated folder: its checked config and its tensors' (dtype, shape)."""

    path: Path
    config: dict
    headers: dict[str, tuple[str, tuple[int, ...]]]
    has_tokenizer: bool


def open_folder(folder: str | Path) -> OpenedFolder:
    """Validate everything a load relies on, reading only JSON files and safetensors headers."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; is it a model folder (see `dual-lm convert-reference`)?")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}); the save may be incomplete")
    config = validate_config(_read_json(folder / "config.json", folder), folder)
    for name in SIDE_FILES:
        if (folder / name).is_file() and not isinstance(_read_json(folder / name, folder), dict):
            raise _broken(folder, f"{name} does not hold a JSON object; {REMEDY}")
    headers = _check_weights(folder, config)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    if has_tokenizer:
        check_tokenizer_fits(folder / "tokenizer.json", config["vocab_size"])
    return OpenedFolder(folder, config, headers, has_tokenizer)


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path once it is a complete, consistent model folder; otherwise one clear error."""
    return open_folder(folder).path


def load_model(folder: str | Path, masked: bool = False, **kwargs):
    """Load a validated folder as ``DLMLlamaForCausalLM`` (or ``DLMLlamaForMaskedLM``) in eval mode."""
    cls = DLMLlamaForMaskedLM if masked else DLMLlamaForCausalLM
    return cls.from_pretrained(str(check_folder(folder)), **kwargs).eval()


# ------------------------------------------------------------------------------ saving


def _occupied(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _swap_in(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out_dir``; an occupied ``out_dir`` is first renamed aside as
    ``.NAME.old-PID-RAND`` and removed afterwards. After a kill in between, the next command that checks
    ``out_dir`` finishes the replacement (``ownership.remove_stale_staging``)."""
    old = None
    if _occupied(out_dir):
        if not overwrite:
            raise UserError(f"refusing to replace {out_dir}: it appeared while the model was being written")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        out_dir.rename(old)
    staging.rename(out_dir)  # onto a missing or empty folder
    fsync_dir(out_dir.parent)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old is not None:  # a link (or a file) stood at out_dir: only the link goes, never its target
        old.unlink()


def fill_generation_defaults(folder: Path, context: int) -> None:
    """``generation_config.json``: decode up to the context (``max_length``; transformers' own default stops
    at 20 tokens), greedily, unless the saved config already says otherwise. The model is not changed."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if "max_length" not in config and "max_new_tokens" not in config:
        config["max_length"] = context
    config.setdefault("do_sample", False)
    path.write_text(json.dumps(config, indent=2) + "\n")


def save_folder(
    model,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    overwrite: bool = False,
    card: CardFacts | None = None,
) -> Path:
    """Save ``model`` (and a tokenizer) as a model folder: written into a staging sibling, then renamed in.

    The caller decides whether ``out_dir`` may be written (``ownership.check_output``); an existing
    non-empty ``out_dir`` is replaced only with ``overwrite``. A kill or an error (a full disk) leaves
    the previous folder or the complete new one and no partial one; staging left by a killed save is
    removed by the next save to the same place. Folders and files follow the umask. With ``card`` the
    folder gets its ``README.md`` model card (``dual_lm.card``), its snippets loading ``out_dir``.
    """
    out_dir = Path(out_dir)
    remove_stale_staging(out_dir)
    if _occupied(out_dir) and not overwrite:
        raise UserError(f"refusing to replace {out_dir}: it exists and is not empty; choose a new folder")
    if tokenizer_path is not None:
        check_tokenizer_fits(tokenizer_path, model.config.vocab_size)  # before any writing
    staging = make_staging(out_dir)
    try:
        model.save_pretrained(staging)
        fill_generation_defaults(staging, model.config.max_position_embeddings)
        if tokenizer_path is not None:
            save_folder_tokenizer(tokenizer_path, staging, model.config.max_position_embeddings)
        if card is not None:
            text = model_card(out_dir.resolve(), card, model.config.to_dict())
            (staging / CARD_FILE).write_text(text, encoding="utf-8")
        settle_folder(staging)
        _swap_in(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------ info


@dataclass
class FolderInfo:
    config: dict
    total: int
    embedding: int
    has_tokenizer: bool

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def inspect_folder(folder: str | Path) -> FolderInfo:
    """The validated config and parameter counts from the safetensors headers, without loading weights."""
    opened = open_folder(folder)
    total = embedding = 0
    for name, (_, shape) in opened.headers.items():
        numel = math.prod(shape)
        total += numel
        embedding += numel if name in EMBEDDING_TENSORS else 0
    return FolderInfo(opened.config, total, embedding, opened.has_tokenizer)


def human(n: int) -> str:
    if n < 1e6:
        return f"{n / 1e3:.1f}K"
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def folder_record(folder: str | Path) -> dict:
    """What ``dual-lm info --json`` prints: the validated config's shape, parameter counts, the tokenizer,
    the classes and the attention modes (the same facts as ``describe_folder``)."""
    info = inspect_folder(folder)
    c = info.config
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "head_dim", "intermediate_size",
            "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps")  # fmt: skip
    classes = c.get("auto_map") if isinstance(c.get("auto_map"), dict) else AUTO_MAP
    return {
        "folder": str(Path(folder)),
        "config": {k: c[k] for k in keys} | {"dlm_task_attention": c.get("dlm_task_attention", "bidirectional")},
        "parameters": {"total": info.total, "non_embedding": info.non_embedding, "embedding": info.embedding},
        "tokenizer": info.has_tokenizer,
        "classes": {auto: str(target).split(".")[-1] for auto, target in classes.items()},
        "attention_modes": list(ATTENTION_MODES),
    }


def describe_folder(folder: str | Path) -> str:
    """The text ``dual-lm info`` prints: ``folder_record`` as a table."""
    record = folder_record(folder)
    c, n = record["config"], record["parameters"]
    rows = [
        ("layers", c["num_hidden_layers"]),
        ("hidden size", c["hidden_size"]),
        ("attention heads", f"{c['num_attention_heads']} x {c['head_dim']}"),
        ("intermediate size (SwiGLU)", c["intermediate_size"]),
        ("vocabulary", c["vocab_size"]),
        ("context length", c["max_position_embeddings"]),
        ("rope theta", c["rope_theta"]),
        ("rms norm eps", c["rms_norm_eps"]),
        ("task-head attention", c["dlm_task_attention"]),
        ("parameters", f"{human(n['total'])} total, {human(n['non_embedding'])} non-embedding ({n['total']:,})"),
        (
            "tokenizer",
            "tokenizer.json" if record["tokenizer"] else "none (pass token ids, or convert with --tokenizer)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"model folder {record['folder']}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append("  classes (trust_remote_code=True):")
    lines += [f"    {auto:<36} {name}" for auto, name in record["classes"].items()]
    lines.append(f"  attention modes: {', '.join(record['attention_modes'])} (+ document_ids for packed sequences)")
    return "\n".join(lines)


# Device and dtype of the inference and evaluation commands.
DTYPES = ("float32", "bfloat16", "float16", "auto")


DEVICES = "cpu, cuda, cuda:N, mps or auto"  # what --device takes; auto: CUDA, else MPS, else the CPU


def check_device(device: str):
    """``device`` as a ``torch.device`` (``auto``: the first of CUDA, MPS and the CPU that this machine
    has); one clear error when it is malformed or names a device that is not there."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"unknown device {device!r} ({err}); use {DEVICES}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not has_mps:
        raise UserError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type == "cpu" and parsed.index not in (None, 0):
        raise UserError(f"device {device!r}: there is one CPU device; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r} is not supported; use {DEVICES}")
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

    target = check_device(device)
    folder = check_folder(folder)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; text commands need a folder that carries its tokenizer")
    dtype = resolve_dtype(dtype, folder)  # a bad dtype is refused before the weights are read
    model = load_model(folder).to(device=target, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(folder))
