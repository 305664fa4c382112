"""Held-out scoring of a study: the same validation continuations read causally and with prefix attention."""

from __future__ import annotations

from dual_lm.tokens import BOS_ID


def validation_windows(data_path: str, windows: int, context: int = 64, continuation: int = 32) -> list:
    """Up to ``windows`` (context, continuation) token pairs cut from the validation documents in order
    (none for ``windows`` = 0)."""
    from dual_lm.data.loader import TokenShards

    if windows < 0:
        raise ValueError(f"windows must be >= 0, got {windows}")
    if windows == 0:
        return []
    shards = TokenShards(data_path, split="valid")
    pairs, width = [], context - 1 + continuation
    for doc in range(shards.num_documents):
        tokens = shards.document(doc).tolist()
        for start in range(0, len(tokens) - width + 1, width):
            piece = tokens[start : start + width]
            pairs.append(([BOS_ID, *piece[: context - 1]], piece[context - 1 :]))
            if len(pairs) == windows:
                return pairs
    return pairs


def scoring_gap(model, data_path: str, windows: int, seq_len: int) -> dict:
    """Mean nats/token of held-out continuations (seq_len/4 tokens after seq_len/2 of context) scored
    causally and with prefix attention."""
    from dual_lm.inference.scoring import score_requests

    pairs = validation_windows(data_path, windows, seq_len // 2, seq_len // 4)
    if not pairs:
        return {}
    tokens = sum(len(w) for _, w in pairs)
    out = {}
    for mode in ("causal", "prefix"):
        scores = score_requests(model, pairs, mode, batch_size=16)
        out[f"{mode}_nll"] = -sum(s.logprob for s in scores) / tokens
    out["prefix_gain"] = out["causal_nll"] - out["prefix_nll"]
    out["windows"] = len(pairs)
    return out
