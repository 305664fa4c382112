"""Using a model folder: masked fill (MNTP) and text generation in causal, prefix, diffusion and speculative modes,
one prompt (optionally streamed) or many (batched)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from dual_lm.inference import MODES
from dual_lm.inference.diffusion import DiffusionConfig, diffusion_generate
from dual_lm.inference.sampling import check_room
from dual_lm.inference.speculative import speculative_generate
from dual_lm.tokens import BOS_ID, MASK_ID, PAD_ID


@dataclass
class FillResult:
    position: int  # index of the <mask> in the input ids
    candidates: list[tuple[str, float]]  # (token text, probability), best first


def encode_with_masks(tokenizer, text: str) -> torch.Tensor:
    """``<s>`` + the text with every ``<mask>`` as one mask token. Each piece is encoded on its own,
    without the whitespace next to a mask, so the word after a mask keeps its leading space and no stray
    space token sits before a mask (where MNTP reads). This is exactly what a tokenizer that declares
    ``<mask>`` lstrip and rstrip gives for the whole text (``tokenizer.with_mask_strips``); the pieces
    make older folders, whose tokenizer lacks the strips, read the same ids."""
    pieces = text.split("<mask>")
    if len(pieces) == 1:
        raise ValueError("the text has no <mask>: write <mask> where a token should be predicted")
    ids = [BOS_ID]
    for i, piece in enumerate(pieces):
        piece = piece.lstrip() if i > 0 else piece
        piece = piece.rstrip() if i < len(pieces) - 1 else piece
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if i < len(pieces) - 1:
            ids.append(MASK_ID)
    return torch.tensor(ids)


@torch.no_grad()
def fill_masks(model, tokenizer, text: str, top_k: int = 5) -> list[FillResult]:
    """Top-k candidates for every ``<mask>`` in one bidirectional pass, read at the position before it."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ids = encode_with_masks(tokenizer, text).to(model.device)
    logits = model(ids[None], attention_mode="bidirectional").logits[0].float()
    out = []
    for position in (ids == MASK_ID).nonzero().flatten().tolist():
        probs = torch.softmax(logits[position - 1], -1)
        top = probs.topk(min(top_k, probs.numel()))
        cands = [(tokenizer.decode([i]), p) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        out.append(FillResult(position, cands))
    return out


def continuation_text(tokenizer, prompt_ids, new_ids, decoded_prompt: str | None = None) -> str:
    """The text the new tokens add after the prompt, spaces included: decoded together with the prompt
    and cut after it (the decoder strips one leading space, so decoding the new tokens alone loses it).
    ``decoded_prompt`` is the prompt's own decoding, when the caller already has it."""
    prompt_ids, new_ids = list(prompt_ids), list(new_ids)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True) if decoded_prompt is None else decoded_prompt
    return whole[len(prompt) :] if whole.startswith(prompt) else tokenizer.decode(new_ids, skip_special_tokens=True)


class TextPrinter(BaseStreamer):
    """A transformers streamer that prints new text as it comes (the first ``put`` is the prompt,
    written as ``prompt_text`` when given, so nothing is printed before decoding has started).

    Text is decoded with the prompt, so spaces survive, and held back while it ends inside a
    multi-byte character.
    """

    def __init__(self, tokenizer, write: Callable[[str], object] = print, prompt_text: str | None = None):
        self.tokenizer, self.write, self.prompt_text = tokenizer, write, prompt_text
        self.prompt: list[int] | None = None
        self.decoded_prompt = ""  # decoded once, not at every token
        self.new: list[int] = []
        self.shown = 0

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if self.prompt is None:
            self.prompt = ids
            self.decoded_prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            if self.prompt_text is not None:
                self.write(self.prompt_text)
            return
        self.new += ids
        text = continuation_text(self.tokenizer, self.prompt, self.new, self.decoded_prompt)
        if not text.endswith("\ufffd") and len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)

    def end(self) -> None:
        text = continuation_text(self.tokenizer, self.prompt or [], self.new, self.decoded_prompt)
        self.write(text[self.shown :] + "\n")
        self.shown = len(text)


def check_sampling(options: dict) -> None:
    """One ValueError for a bad sampling option of the causal and prefix modes (``model.generate``), where
    nan or inf would otherwise reach the sampler and fail deep inside it or sample garbage."""
    temperature, top_p, top_k = options.get("temperature"), options.get("top_p"), options.get("top_k")
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_p is not None and (not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a whole number >= 0, got {top_k}")


@torch.no_grad()
def generate_text(
    model, tokenizer, prompt: str, mode: str = "causal", max_new_tokens: int = 50, streamer=None, **options
):
    """Continue ``prompt`` in one of ``MODES``; options go to ``model.generate``, ``DiffusionConfig`` or
    ``speculative_generate``. A ``streamer`` (e.g. ``TextPrinter``) sees the tokens as they come in the
    causal, prefix and speculative modes. The speculative mode returns (text, ``SpeculativeResult``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    check_room(ids.shape[1], max_new_tokens, model.config.max_position_embeddings)
    if mode == "diffusion":
        new, _ = diffusion_generate(model, ids[0], max_new_tokens, DiffusionConfig(**options))
        return continuation_text(tokenizer, ids[0].tolist(), new)
    if mode == "speculative":
        result = speculative_generate(model, ids[0], max_new_tokens, streamer=streamer, **options)
        return continuation_text(tokenizer, ids[0].tolist(), result.tokens), result
    check_sampling(options)
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        max_length=None,  # the folder's max_length (the context) yields to max_new_tokens without a warning
        prefix_attention=mode == "prefix",
        streamer=streamer,
        **options,
    )
    return continuation_text(tokenizer, ids[0].tolist(), out[0, ids.shape[1] :].tolist())


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T]) of token rows padded on the left to the longest, as
    ``model.generate`` wants a batch (new tokens follow every row's last real token)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    mode: str = "causal",
    max_new_tokens: int = 50,
    batch_size: int = 8,
    progress: bool = False,
    **options,
) -> list[str]:
    """Continue many prompts: causal and prefix modes run ``batch_size`` left-padded prompts per
    ``generate`` call (bucketed by length); diffusion and speculative run one prompt at a time.
    ``progress`` shows a bar over the prompts (on stderr)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = tqdm(total=len(prompts), desc="generating", unit=" prompt", disable=not progress)
    if mode in ("diffusion", "speculative"):
        outs = []
        for prompt in prompts:
            outs.append(generate_text(model, tokenizer, prompt, mode, max_new_tokens, **options))
            bar.update(1)
        bar.close()
        return [o[0] if isinstance(o, tuple) else o for o in outs]
    check_sampling(options)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    for ids in encoded:
        check_room(len(ids), max_new_tokens, model.config.max_position_embeddings)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts = [""] * len(prompts)
    for at in range(0, len(order), batch_size):
        chunk = order[at : at + batch_size]
        ids, mask = left_pad([encoded[i] for i in chunk], PAD_ID)
        width = ids.shape[1]
        out = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            max_length=None,
            prefix_attention=mode == "prefix",
            pad_token_id=PAD_ID,
            **options,
        )
        for row, i in enumerate(chunk):
            new = [t for t in out[row, width:].tolist() if t != PAD_ID]
            texts[i] = continuation_text(tokenizer, encoded[i], new)
        bar.update(len(chunk))
    bar.close()
    return texts
