"""Using a model folder: masked fill (MNTP) and text generation in causal, prefix and diffusion modes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dual_lm.config import BOS_ID, MASK_ID
from dual_lm.diffusion import DiffusionConfig, diffusion_generate
from dual_lm.speculative import speculative_generate

MODES = ("causal", "prefix", "diffusion", "speculative")


@dataclass
class FillResult:
    position: int  # index of the <mask> in the input ids
    candidates: list[tuple[str, float]]  # (token text, probability), best first


def encode_with_masks(tokenizer, text: str) -> torch.Tensor:
    """``<s>`` + the text with every ``<mask>`` as one mask token; each piece is encoded on its own
    so the word after a mask keeps its leading space and no stray space tokens surround the mask."""
    pieces = text.split("<mask>")
    if len(pieces) == 1:
        raise ValueError("the text has no <mask>: write <mask> where a token should be predicted")
    ids = [BOS_ID]
    for i, piece in enumerate(pieces):
        if piece.strip():
            ids += tokenizer(piece.strip(), add_special_tokens=False)["input_ids"]
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


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, mode: str = "causal", max_new_tokens: int = 50, **options):
    """Continue ``prompt`` in one of ``MODES``; options go to ``model.generate``, ``DiffusionConfig`` or
    ``speculative_generate``. The speculative mode returns (text, acceptance rate)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed the context of {limit}"
        )
    if mode == "diffusion":
        new, _ = diffusion_generate(model, ids[0], max_new_tokens, DiffusionConfig(**options))
        return tokenizer.decode(new, skip_special_tokens=True)
    if mode == "speculative":
        result = speculative_generate(model, ids[0], max_new_tokens, **options)
        return tokenizer.decode(result.tokens, skip_special_tokens=True), result.acceptance_rate
    extra = {"prefix_lengths": torch.tensor([ids.shape[1]], device=ids.device)} if mode == "prefix" else {}
    out = model.generate(ids, max_new_tokens=max_new_tokens, **extra, **options)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
