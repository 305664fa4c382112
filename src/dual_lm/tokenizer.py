"""Tokenizers: the special tokens of the published recipe and the copy a model folder carries."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from dual_lm.atomic import write_text_atomic
from dual_lm.errors import UserError
from dual_lm.tokens import MASK_ID, ROLE_TOKENS, SPECIAL_TOKENS


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a HF ``tokenizers`` JSON file and check that it has the special tokens at their ids."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception for every parse error
        detail = " ".join(str(err).split()) or "empty or truncated"
        raise UserError(f"{path} is not a tokenizers JSON file ({detail}); it may be truncated or corrupt") from None
    wrong = [
        f"{tok} (id {tokenizer.token_to_id(tok)}, expected {i})"
        for i, tok in enumerate(SPECIAL_TOKENS[:5])
        if tokenizer.token_to_id(tok) != i
    ]
    if wrong:
        raise UserError(f"tokenizer {path} lacks the special tokens at their ids: {', '.join(wrong)}")
    return tokenizer


def with_mask_strips(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with ``<mask>`` declared lstrip and rstrip: it absorbs the spaces around it.

    The recipe's normaliser prepends a space to every segment between added tokens, so without the
    strips ``"of <mask> is"`` becomes ``Ġof Ġ <mask> Ġ Ġis``: the position before the mask, where MNTP
    reads the prediction, holds a stray space token. With them the ids equal the pieces encoded on their
    own (``dual-lm fill``'s encoding). Text without ``<mask>`` tokenises exactly as before."""
    spec = json.loads(tokenizer.to_str())
    for added in spec.get("added_tokens", []):
        if added["content"] == SPECIAL_TOKENS[MASK_ID]:
            added["lstrip"] = added["rstrip"] = True
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_vocab_size(tokenizer: Tokenizer) -> int:
    """How many embedding rows the tokenizer's ids need: one past its largest id, added tokens included."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def check_tokenizer_fits(path: str | Path, vocab_size: int) -> Tokenizer:
    """Load ``path`` and refuse it when its ids reach past a model vocabulary of ``vocab_size``: such a
    pair loads fine and then fails with an IndexError in every later generate or fill."""
    tokenizer = load_tokenizer_file(path)
    needed = tokenizer_vocab_size(tokenizer)
    if needed > vocab_size:
        raise UserError(
            f"tokenizer {path} has {needed:,} tokens but the model's vocabulary is {vocab_size:,}: its ids would "
            "index past the embedding; use the tokenizer the model was trained with"
        )
    return tokenizer


def save_folder_tokenizer(path: str | Path, folder: str | Path, max_length: int) -> PreTrainedTokenizerFast:
    """Save ``tokenizer.json`` and its config into a model folder so ``AutoTokenizer`` loads it."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=with_mask_strips(load_tokenizer_file(path)), model_max_length=max_length, **ROLE_TOKENS
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


# ---------------------------------------------------------------------------- the BPE recipe

# Pre-tokenisation split of the published tokenizer: words with an optional leading non-letter,
# single digits, punctuation runs, newline runs and whitespace, isolated before byte-level mapping.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"| ?\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def recipe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the published pipeline.

    Normaliser: prepend a space, NFC, a space after every newline, then no spaces before a
    newline; the split above plus byte-level mapping; a decoder that undoes both; and a
    post-processor that prepends ``<s>``.
    """
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Prepend(" "),
            normalizers.NFC(),
            normalizers.Replace(Regex("\n"), "\n "),
            normalizers.Replace(Regex(" *\n"), "\n"),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True),
            decoders.Strip(" ", 1, 0),
            decoders.Replace("\n ", "\n"),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    return tokenizer


def train_tokenizer(texts, vocab_size: int, total: int | None = None) -> Tokenizer:
    """Train the recipe on an iterator of texts; the 16 special tokens get ids 0-15."""
    from tokenizers import pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: the 16 special tokens and 256 byte symbols need {minimum}"
        )
    tokenizer = recipe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=total)
    return with_mask_strips(tokenizer)


def save_tokenizer(tokenizer: Tokenizer, out_path: str | Path) -> None:
    """Write the tokenizer JSON atomically (``write_text_atomic``: an error or a kill leaves
    ``out_path`` as it was)."""
    write_text_atomic(Path(out_path), tokenizer.to_str())
