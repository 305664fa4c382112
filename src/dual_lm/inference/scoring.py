"""Log-likelihood of continuations given contexts in three modes (DESIGN.md section 4), batched.

- causal: sum_i log p(w_i | c, w_<i) with causal attention;
- prefix: the same, but the context attends bidirectionally within itself (``prefix_lengths``);
- masked: pseudo-log-likelihood: for each w_i, w_i and the n-1 tokens after it become ``<mask>``
  and w_i is read at the position before it under bidirectional attention (one row per token).

Requests are token lists: the context starts with ``<s>``; the continuation is non-empty.
Rows are sorted by length and padded on the right, so batches hold rows of similar length.

Whole texts get their exact causal log-likelihood (sliding windows past the context length,
``score_texts``); ``md_bound`` estimates the masked-diffusion lower bound with its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dual_lm.inference import SCORE_MODES
from dual_lm.tokens import MASK_ID, PAD_ID


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum over the continuation's tokens
    tokens: int
    greedy: bool  # every continuation token is the argmax (causal and prefix modes)


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness splits a pair: the context alone,
    and the tokens of context + continuation after the context's length (so a leading space stays
    with the continuation's first word). Only when that leaves nothing is the continuation
    tokenised on its own."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    if len(full) > len(ctx):
        return ctx, full[len(ctx) :]
    return ctx, tokenizer(continuation.strip(), add_special_tokens=False)["input_ids"]


def _check(requests, limit: int) -> None:
    for n, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {n}: context and continuation must both be non-empty token lists")
        if len(context) + len(continuation) > limit:
            raise ValueError(f"request {n}: {len(context) + len(continuation)} tokens exceed the context of {limit}")


def _rows_in_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches, longest first: similar lengths share a batch, so little of it is padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # length bucketing: similar lengths together
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] padded on the right and their attention mask (1 = token): real positions keep their index."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class _Row:
    """One model input of a scorer: its ids, the (position, gold token) pairs read from it, the request it
    belongs to, the factor on its summed log-probs (the MD bound's L/k) and, in prefix mode, its context length."""

    owner: int
    ids: list[int]
    reads: list[tuple[int, int]]
    weight: float = 1.0
    prefix: int = 0


def _read_rows(model, rows: list[_Row], mode: str, batch_size: int, progress: bool = False) -> list[tuple[float, bool]]:
    """The one batching loop of every scorer: per row, (weight x sum of log p(gold) at its reads, every gold
    the argmax), in row order.

    Rows are sorted by length (stable, so equal rows keep their order), run ``batch_size`` at a time padded
    on the right under ``mode`` (causal, prefix or bidirectional), and scattered back to their own index.
    ``progress`` shows a bar over the rows (on stderr).
    """
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc="scoring", unit=" row", disable=not progress)
    for batch in _rows_in_batches([len(row.ids) for row in rows], batch_size):
        ids, mask = _pad([rows[i].ids for i in batch], model.device)
        reads = [(b, p, g) for b, i in enumerate(batch) for p, g in rows[i].reads]
        logp = _logprobs_at(model, ids, mask, reads, _pattern(mode, [rows[i] for i in batch], model.device))
        gold = torch.tensor([g for _, _, g in reads], device=logp.device)  # [N], N = reads in the batch
        picked, hits = logp.gather(1, gold[:, None]).squeeze(1).tolist(), (logp.argmax(-1) == gold).tolist()
        at = 0
        for i in batch:
            n = len(rows[i].reads)
            results[i] = (rows[i].weight * sum(picked[at : at + n]), all(hits[at : at + n]))
            at += n
        bar.update(len(batch))
    bar.close()
    return results


def _pattern(mode: str, rows: list[_Row], device) -> dict:
    """``run_trunk``'s pattern arguments for a batch of rows."""
    if mode == "prefix":
        return {"prefix_lengths": torch.tensor([row.prefix for row in rows], device=device)}
    return {"attention_mode": mode}


def _logprobs_at(model, ids, mask, reads, pattern: dict) -> torch.Tensor:
    """log-softmax [N, V] of the logits at (row, position) pairs only: the trunk runs on the whole batch, the
    head (the costly [*, V] part at long continuations and large vocabularies) on the read positions."""
    hidden = model.run_trunk(input_ids=ids, attention_mask=mask, use_cache=False, **pattern).last_hidden_state
    rows = torch.tensor([r for r, _, _ in reads], device=ids.device)
    positions = torch.tensor([p for _, p, _ in reads], device=ids.device)
    return torch.log_softmax(model.lm_head(hidden[rows, positions]).float(), -1)


def _per_owner(rows: list[_Row], results: list, count: int) -> list[list]:
    """Each owner's row results in row order, so a request's value never depends on its neighbours."""
    grouped: list[list] = [[] for _ in range(count)]
    for row, result in zip(rows, results, strict=True):
        grouped[row.owner].append(result)
    return grouped


@torch.no_grad()
def score_requests(
    model, requests, mode: str = "causal", n: int = 1, batch_size: int = 16, progress: bool = False
) -> list[Scored]:
    """Score (context, continuation) token pairs; returns one ``Scored`` per request, in order."""
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
    if batch_size < 1 or n < 1:
        raise ValueError("batch_size and n must be >= 1")
    _check(requests, model.config.max_position_embeddings)
    if mode == "masked":
        rows = [_Row(r, ids, [(p, g)]) for r, (c, w) in enumerate(requests) for ids, p, g in masked_rows(c, w, n)]
    else:  # one row a request, read at every continuation token
        rows = [
            _Row(r, [*c, *w], [(len(c) - 1 + t, g) for t, g in enumerate(w)], prefix=len(c))
            for r, (c, w) in enumerate(requests)
        ]
    results = _read_rows(model, rows, "bidirectional" if mode == "masked" else mode, batch_size, progress)
    return [
        Scored(sum(v for v, _ in mine), len(w), mode != "masked" and all(g for _, g in mine))
        for mine, (_, w) in zip(_per_owner(rows, results, len(requests)), requests, strict=True)
    ]


def masked_rows(context: list[int], continuation: list[int], n: int) -> list[tuple[list[int], int, int]]:
    """(input ids, read position, gold token) for each continuation token: it and the n-1 after it masked."""
    full = list(context) + list(continuation)
    rows = []
    for i in range(len(continuation)):
        j = len(context) + i
        ids = full[:j] + [MASK_ID] * min(n, len(full) - j) + full[j + n :]
        rows.append((ids, j - 1, full[j]))
    return rows


# ----------------------------------------------------------------------------- whole texts


@dataclass(frozen=True)
class TextScore:
    logprob: float  # sum of log p over every token after the first
    tokens: int  # how many tokens were scored

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens)


def rolling_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first scored, end) windows covering tokens 1 .. length-1 once each, causal LM style.

    The first window scores tokens 1 .. window-1 from the start; each later one scores the next
    ``stride`` tokens with the ``window - stride`` (or more) tokens before them as context.
    """
    if window < 2 or not 1 <= stride <= window - 1:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window - 1, got window={window}, stride={stride}")
    spans, first = [], 1
    while first < length:
        end = min(length, window if first == 1 else first + stride)
        spans.append((max(0, end - window), first, end))
        first = end
    return spans


@torch.no_grad()
def score_texts(model, texts, window=None, stride=None, batch_size: int = 16, progress: bool = False):
    """Exact causal log-likelihood of token lists (each starting with ``<s>``) of any length.

    Texts longer than ``window`` (default: the model's context) are scored with sliding windows:
    every token is scored once, with at least ``window - stride`` tokens of context (default stride:
    half the window).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window = model.config.max_position_embeddings if window is None else window  # 0 is refused, not defaulted
    stride = max(1, window // 2) if stride is None else stride
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window {window} exceeds the model's context of {model.config.max_position_embeddings}")
    for t, ids in enumerate(texts):
        if len(ids) < 2:
            raise ValueError(f"text {t}: needs at least 2 tokens (<s> and one more)")
    rows = [  # one causal row a window, read at the tokens it scores
        _Row(t, list(ids[start:end]), [(i - 1 - start, ids[i]) for i in range(first, end)])
        for t, ids in enumerate(texts)
        for start, first, end in rolling_windows(len(ids), window, stride)
    ]
    grouped = _per_owner(rows, _read_rows(model, rows, "causal", batch_size, progress), len(texts))
    return [TextScore(sum(v for v, _ in mine), len(ids) - 1) for mine, ids in zip(grouped, texts, strict=True)]


# ----------------------------------------------------------------------------- the masked-diffusion bound


@dataclass(frozen=True)
class Bound:
    logprob: float  # Monte-Carlo estimate of the lower bound on log p(continuation | context)
    stderr: float  # its standard error over the samples
    samples: int


def bound_rows(context, continuation, samples: int, generator: torch.Generator) -> list[tuple[list[int], list, float]]:
    """Draws for the MD bound: (input ids, [(read position, gold)], weight L/k) per sample.

    k ~ U{1..L} continuation tokens are masked, uniformly at random; each masked token is read at
    the position before it (next-token shift). E[weight x sum log p] <= log p(w | c), the
    exactly-k form of the masked-diffusion ELBO (LLaDA, Nie et al. 2025, eq. 12).
    """
    length, rows = len(continuation), []
    for _ in range(samples):
        k = int(torch.randint(1, length + 1, (), generator=generator))
        chosen = torch.randperm(length, generator=generator)[:k].tolist()
        ids = list(context) + list(continuation)
        reads = []
        for i in chosen:
            j = len(context) + i
            ids[j] = MASK_ID
            reads.append((j - 1, continuation[i]))
        rows.append((ids, reads, length / k))
    return rows


@torch.no_grad()
def md_bound(model, requests, samples=32, seed=0, batch_size: int = 16, progress: bool = False) -> list[Bound]:
    """Monte-Carlo masked-diffusion lower bound on log p(continuation | context) with its standard error."""
    if samples < 2 or batch_size < 1:
        raise ValueError(f"samples must be >= 2 for a standard error and batch_size >= 1, got {samples}, {batch_size}")
    _check(requests, model.config.max_position_embeddings)
    generator = torch.Generator().manual_seed(seed)
    rows = [
        _Row(r, ids, reads, weight)
        for r, (c, w) in enumerate(requests)
        for ids, reads, weight in bound_rows(c, w, samples, generator)
    ]
    grouped = _per_owner(rows, _read_rows(model, rows, "bidirectional", batch_size, progress), len(requests))
    values = [[v for v, _ in mine] for mine in grouped]
    out = []
    for v in values:
        x = torch.tensor(v, dtype=torch.float64)
        out.append(Bound(x.mean().item(), (x.std() / math.sqrt(len(v))).item(), len(v)))
    return out
