"""Tokenizers: the special tokens of the published recipe and the copy a model folder carries."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from dual_lm.errors import UserError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
ROLE_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a HF ``tokenizers`` JSON file and check that it has the special tokens at their ids."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise UserError(f"{path} is not a tokenizers JSON file: {err}") from None
    wrong = [
        f"{tok} (id {tokenizer.token_to_id(tok)}, expected {i})"
        for i, tok in enumerate(SPECIAL_TOKENS[:5])
        if tokenizer.token_to_id(tok) != i
    ]
    if wrong:
        raise UserError(f"tokenizer {path} lacks the special tokens at their ids: {', '.join(wrong)}")
    return tokenizer


def save_folder_tokenizer(path: str | Path, folder: str | Path, max_length: int) -> PreTrainedTokenizerFast:
    """Save ``tokenizer.json`` and its config into a model folder so ``AutoTokenizer`` loads it."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=load_tokenizer_file(path), model_max_length=max_length, **ROLE_TOKENS
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer
