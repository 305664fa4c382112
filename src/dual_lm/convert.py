"""Reference-trainer checkpoint (``config.json`` + ``state_dict.bin``) -> model folder."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from dual_lm.card import CardFacts
from dual_lm.config import ModelShape, llama_config, load_reference_config
from dual_lm.errors import UserError
from dual_lm.folder import save_folder
from dual_lm.modeling_dlm_llama import (
    REFERENCE_GLOBAL_NAMES,
    REFERENCE_LAYER_NAMES,
    WRAPPER_PREFIXES,
    DLMLlamaForCausalLM,
)
from dual_lm.ownership import MODEL, check_output, environment_error
from dual_lm.tokenizer import check_tokenizer_fits

_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def reference_to_hf_name(name: str) -> str | None:
    """Our parameter name for a reference-trainer tensor name, or None if it has no counterpart."""
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    if name in REFERENCE_GLOBAL_NAMES:
        return REFERENCE_GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in REFERENCE_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{REFERENCE_LAYER_NAMES[match.group(2)]}"
    return None


def hf_to_reference_name(name: str) -> str:
    """Inverse of ``reference_to_hf_name`` (used to name optimiser groups like the reference)."""
    inverse_global = {v: k for k, v in REFERENCE_GLOBAL_NAMES.items()}
    if name in inverse_global:
        return inverse_global[name]
    inverse_layer = {v: k for k, v in REFERENCE_LAYER_NAMES.items()}
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in inverse_layer:
        return f"encoder.layers.{match.group(1)}.{inverse_layer[match.group(2)]}"
    raise KeyError(name)


def map_state_dict(reference: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename reference tensors to ``model``'s names; one error lists every unexpected, missing or mis-shaped tensor."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    mapped, unexpected = {}, []
    for name, tensor in reference.items():
        target = reference_to_hf_name(name)
        if target is None or target not in expected:
            unexpected.append(name)
        else:
            mapped[target] = tensor
    missing = sorted(hf_to_reference_name(n) for n in expected if n not in mapped)
    misshaped = [
        f"{hf_to_reference_name(n)} {tuple(t.shape)} (expected {tuple(expected[n])})"
        for n, t in mapped.items()
        if t.shape != expected[n]
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append("mis-shaped tensors: " + ", ".join(misshaped))
    if problems:
        raise UserError("the state dict does not match the config: " + "; ".join(problems))
    return mapped


# What torch.load raises for a damaged file: zip errors (RuntimeError), a pickle cut short (EOFError,
# UnpicklingError), garbage (KeyError, ValueError) and an unreadable tail (OSError EINVAL).
_TORCH_READ_ERRORS = (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, OSError)


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a reference ``state_dict.bin`` safely (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"state dict {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _TORCH_READ_ERRORS as err:
        if isinstance(err, OSError) and environment_error(err) is not None:
            raise  # no permission: the CLI's own line
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"cannot read state dict {path} ({detail}); it may be truncated or corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a dict of tensors as the reference trainer saves")
    return state


def _reference_model(shape: ModelShape, state_dict_path: str | Path) -> DLMLlamaForCausalLM:
    reference = load_reference_state_dict(state_dict_path)
    model = DLMLlamaForCausalLM(llama_config(shape))
    mapped = map_state_dict(reference, model)
    model.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True)
    return model.eval()


def build_reference_model(config_path: str | Path, state_dict_path: str | Path) -> DLMLlamaForCausalLM:
    """A ``DLMLlamaForCausalLM`` holding the reference checkpoint's weights."""
    return _reference_model(load_reference_config(config_path), state_dict_path)


def convert_reference(
    config_path: str | Path,
    state_dict_path: str | Path,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write a model folder for a reference checkpoint; the folder appears complete or not at all.

    Everything cheap is checked before the state dict is read: the output (new or an empty folder,
    never an input or a folder holding one), the config's sizes, and that the tokenizer's ids fit
    the model's vocabulary.
    """
    sources = tuple(p for p in (config_path, state_dict_path, tokenizer_path) if p is not None)
    out_dir = check_output(out_dir, MODEL, sources=sources)
    shape = load_reference_config(config_path)
    if tokenizer_path is not None:
        check_tokenizer_fits(tokenizer_path, shape.vocab_size)
    source = Path(state_dict_path).name
    card = CardFacts(f"Converted from the reference trainer's checkpoint {source} (`dual-lm convert-reference`).")
    return save_folder(_reference_model(shape, state_dict_path), out_dir, tokenizer_path, card=card)
