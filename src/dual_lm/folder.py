"""Model folders: validation, loading by mode, and the facts ``dual-lm info`` prints."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from dual_lm.errors import UserError
from dual_lm.modeling_dlm_llama import (
    ATTENTION_MODES,
    AUTO_MAP,
    DLMLlamaForCausalLM,
    DLMLlamaForMaskedLM,
)
from dual_lm.tokenizer import save_folder_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
EMBEDDING_TENSORS = ("model.embed_tokens.weight", "lm_head.output.weight", "lm_head.output.bias")


def check_folder(folder: str | Path) -> Path:
    """Return ``folder`` as a Path if it holds a config and weights; otherwise one clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; is it a model folder (see `dual-lm convert-reference`)?")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}); the save may be incomplete")
    return folder


def load_model(folder: str | Path, masked: bool = False, **kwargs):
    """Load a folder as ``DLMLlamaForCausalLM`` (or ``DLMLlamaForMaskedLM``) in eval mode."""
    cls = DLMLlamaForMaskedLM if masked else DLMLlamaForCausalLM
    return cls.from_pretrained(str(check_folder(folder)), **kwargs).eval()


def save_folder(model, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Save ``model`` (and a tokenizer) as a model folder: written aside, then renamed into place.

    A kill or an error leaves either the previous folder or the complete new one, never a partial one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer_path is not None:
            save_folder_tokenizer(tokenizer_path, staging, model.config.max_position_embeddings)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{staging.name[-8:]}")
            out_dir.rename(old)
        staging.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


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
    """Read the config and count parameters from the safetensors headers without loading weights."""
    folder = check_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    total = embedding = 0
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                numel = 1
                for dim in handle.get_slice(name).get_shape():
                    numel *= dim
                total += numel
                embedding += numel if name in EMBEDDING_TENSORS else 0
    return FolderInfo(config, total, embedding, (folder / "tokenizer.json").is_file())


def human(n: int) -> str:
    if n < 1e6:
        return f"{n / 1e3:.1f}K"
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def describe_folder(folder: str | Path) -> str:
    """The text ``dual-lm info`` prints."""
    info = inspect_folder(folder)
    c = info.config
    rope = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta"))
    rows = [
        ("layers", c.get("num_hidden_layers")),
        ("hidden size", c.get("hidden_size")),
        ("attention heads", f"{c.get('num_attention_heads')} x {c.get('head_dim')}"),
        ("intermediate size (SwiGLU)", c.get("intermediate_size")),
        ("vocabulary", c.get("vocab_size")),
        ("context length", c.get("max_position_embeddings")),
        ("rope theta", rope),
        ("rms norm eps", c.get("rms_norm_eps")),
        ("task-head attention", c.get("dlm_task_attention", "bidirectional")),
        ("parameters", f"{human(info.total)} total, {human(info.non_embedding)} non-embedding ({info.total:,})"),
        ("tokenizer", "tokenizer.json" if info.has_tokenizer else "none (pass token ids, or convert with --tokenizer)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"model folder {Path(folder)}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    classes = c.get("auto_map", AUTO_MAP)
    lines.append("  classes (trust_remote_code=True):")
    lines += [f"    {auto:<36} {target.split('.')[-1]}" for auto, target in classes.items()]
    lines.append(f"  attention modes: {', '.join(ATTENTION_MODES)} (+ document_ids for packed sequences)")
    return "\n".join(lines)
