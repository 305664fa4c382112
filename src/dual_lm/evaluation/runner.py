"""``dual-lm eval``: score every choice of every item with ``dual_lm.inference.scoring`` and aggregate the metrics.

Tokenisation follows lm-evaluation-harness's ``hf`` backend, so causal-mode accuracies equal its own:
trailing spaces of the context move to the continuation, the pair is tokenised as one text and split
where the context's tokens end (``scoring.split_pair``); an empty context (BLiMP) becomes ``<s>``
and the continuation is tokenised without special tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from dual_lm.evaluation.metrics import ItemResult, TaskScore, score_task
from dual_lm.evaluation.prompts import TARGET_DELIMITER, Item
from dual_lm.inference.scoring import SCORE_MODES, Scored, score_requests, split_pair

Request = tuple[list[int], list[int]]
CHUNK_BATCHES = 8  # batches per score_requests call: large enough to bucket, small enough for a live bar


@dataclass(frozen=True)
class EvalSettings:
    mode: str = "causal"
    mask_n: int = 1  # masked mode: tokens masked from each scored token on
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self):
        if self.mode not in SCORE_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(SCORE_MODES)}")
        if self.mask_n < 1 or self.batch_size < 1:
            raise ValueError("mask_n and batch_size must be >= 1")


@dataclass(frozen=True)
class TaskRun:
    name: str
    score: TaskScore
    seconds: float
    requests: int


def encode_request(tokenizer, context: str, continuation: str) -> Request:
    """(context ids, continuation ids) exactly as lm-eval's ``hf`` backend tokenises a loglikelihood request."""
    stripped = context.rstrip()
    if not stripped:
        cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        return ([bos], cont) if cont[0] != bos else (cont[:1], cont[1:])
    return split_pair(tokenizer, stripped, context[len(stripped) :] + continuation)


def fit_context(request: Request, limit: int) -> Request:
    """Drop the oldest tokens so the row fits ``limit`` positions (lm-eval truncates on the left too).

    Every token of the row is fed, so a continuation keeps all its tokens only when it has at most
    ``limit - 1`` (one context token must precede it); longer ones lose their first tokens.
    """
    context, continuation = request
    if len(context) + len(continuation) <= limit:
        return request
    continuation = continuation[-(limit - 1) :]
    return context[-(limit - len(continuation)) :], continuation


def item_requests(tokenizer, items: Sequence[Item], limit: int) -> list[Request]:
    """One request per (item, choice), items in order, choices in order."""
    return [
        fit_context(encode_request(tokenizer, item.context, TARGET_DELIMITER + choice), limit)
        for item in items
        for choice in item.choices
    ]


def score_all(model, requests: Sequence[Request], settings: EvalSettings, desc: str = "") -> list[Scored]:
    """``Scored`` of every request, in order; sorted by length and scored in chunks behind a progress bar."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    chunk = settings.batch_size * CHUNK_BATCHES
    out: list[Scored | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit=" req", disable=not settings.progress) as bar:
        for start in range(0, len(order), chunk):
            ids = order[start : start + chunk]
            scored = score_requests(
                model, [requests[i] for i in ids], settings.mode, n=settings.mask_n, batch_size=settings.batch_size
            )
            for i, result in zip(ids, scored, strict=True):
                out[i] = result
            bar.update(len(ids))
    return out


def item_results(items: Sequence[Item], logprobs: Sequence[float]) -> list[ItemResult]:
    """Regroup the flat per-choice log-probabilities into one ``ItemResult`` per item."""
    results, at = [], 0
    for item in items:
        k = len(item.choices)
        results.append(ItemResult(tuple(logprobs[at : at + k]), tuple(len(c) for c in item.choices), item.gold))
        at += k
    return results


def run_task(model, tokenizer, name: str, items: Sequence[Item], settings: EvalSettings) -> TaskRun:
    """Score one task's items in the given mode; returns its metrics and timing."""
    start = time.perf_counter()
    requests = item_requests(tokenizer, items, model.config.max_position_embeddings)
    logprobs = [s.logprob for s in score_all(model, requests, settings, desc=name)]
    score = score_task(item_results(items, logprobs))
    return TaskRun(name, score, time.perf_counter() - start, len(requests))
