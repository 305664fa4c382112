"""Log-likelihood of continuations given contexts in three modes (DESIGN.md section 4), batched.

- causal: sum_i log p(w_i | c, w_<i) with causal attention;
- prefix: the same, but the context attends bidirectionally within itself (``prefix_lengths``);
- masked: pseudo-log-likelihood: for each w_i, w_i and the n-1 tokens after it become ``<mask>``
  and w_i is read at the position before it under bidirectional attention (one row per token).

Requests are token lists: the context starts with ``<s>``; the continuation is non-empty.
Rows are sorted by length and padded on the right, so batches hold rows of similar length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dual_lm.config import MASK_ID, PAD_ID

SCORE_MODES = ("causal", "prefix", "masked")


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum over the continuation's tokens
    tokens: int
    greedy: bool  # every continuation token is the argmax (causal and prefix modes)


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation): the pair is tokenised as one text and split where the
    context's own tokens end (so a leading space stays with the continuation's first word)."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    if full[: len(ctx)] == ctx and len(full) > len(ctx):
        return ctx, full[len(ctx) :]
    return ctx, tokenizer(continuation.strip(), add_special_tokens=False)["input_ids"]


def _check(requests, limit: int) -> None:
    for n, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {n}: context and continuation must both be non-empty token lists")
        if len(context) + len(continuation) > limit:
            raise ValueError(f"request {n}: {len(context) + len(continuation)} tokens exceed the context of {limit}")


def _rows_in_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # length bucketing: similar lengths together
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_requests(model, requests, mode: str = "causal", n: int = 1, batch_size: int = 16) -> list[Scored]:
    """Score (context, continuation) token pairs; returns one ``Scored`` per request, in order."""
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
    if batch_size < 1 or n < 1:
        raise ValueError("batch_size and n must be >= 1")
    _check(requests, model.config.max_position_embeddings)
    if mode == "masked":
        return _score_masked(model, requests, n, batch_size)
    results: list[Scored | None] = [None] * len(requests)
    lengths = [len(c) + len(w) for c, w in requests]
    for batch in _rows_in_batches(lengths, batch_size):
        ids, mask = _pad([list(requests[i][0]) + list(requests[i][1]) for i in batch], model.device)
        extra = {}
        if mode == "prefix":
            extra["prefix_lengths"] = torch.tensor([len(requests[i][0]) for i in batch], device=model.device)
        logp = torch.log_softmax(model(ids, attention_mask=mask, **extra).logits.float(), -1)
        for b, i in enumerate(batch):
            context, continuation = requests[i]
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=model.device)
            gold = torch.tensor(continuation, device=model.device)
            rows = logp[b, positions]
            results[i] = Scored(
                rows.gather(1, gold[:, None]).sum().item(), len(gold), bool((rows.argmax(-1) == gold).all())
            )
    return results


def masked_rows(context: list[int], continuation: list[int], n: int) -> list[tuple[list[int], int, int]]:
    """(input ids, read position, gold token) for each continuation token: it and the n-1 after it masked."""
    full = list(context) + list(continuation)
    rows = []
    for i in range(len(continuation)):
        j = len(context) + i
        ids = full[:j] + [MASK_ID] * min(n, len(full) - j) + full[j + n :]
        rows.append((ids, j - 1, full[j]))
    return rows


def _score_masked(model, requests, n: int, batch_size: int) -> list[Scored]:
    flat = [(r, row) for r, (c, w) in enumerate(requests) for row in masked_rows(c, w, n)]
    sums = [0.0] * len(requests)
    for batch in _rows_in_batches([len(row[0]) for _, row in flat], batch_size):
        ids, mask = _pad([flat[i][1][0] for i in batch], model.device)
        logp = torch.log_softmax(model(ids, attention_mask=mask, attention_mode="bidirectional").logits.float(), -1)
        for b, i in enumerate(batch):
            request, (_, position, gold) = flat[i]
            sums[request] += logp[b, position, gold].item()
    return [Scored(s, len(w), False) for s, (_, w) in zip(sums, requests, strict=True)]
