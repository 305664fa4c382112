"""Choosing alpha from the data budget: the paper's Remarks 1 and 2."""

from __future__ import annotations

import math

# the released recommendations (model card) for data-constrained runs
RELEASED = {32: 0.75, 128: 0.125}


def recommend_alpha(repetitions: float) -> tuple[float, list[str]]:
    """(alpha, reasoning): 63/64 for R <= 16; else about 16/R so the AR objective sees ~16 epochs (band 8-32)."""
    if not math.isfinite(repetitions) or repetitions < 1:  # nan passes a plain < 1 test and inf gives alpha 0
        raise ValueError(
            f"repetitions must be a finite number >= 1 (the token budget over the unique tokens), got {repetitions}"
        )
    r = repetitions
    lines = [f"data repetitions R = {r:g}"]
    if r <= 16:
        lines += [
            "Remark 1 (regular data, R <= 16): a small share of masked diffusion costs no AR quality",
            "and gives the model its bidirectional abilities, so train with alpha = 63/64.",
        ]
        return 63 / 64, lines
    alpha = 16 / r
    low, high = 8 / r, min(1.0, 32 / r)
    lines += [
        "Remark 2 (data-constrained, R > 16): choose alpha so the AR objective sees about 16 effective",
        f"epochs: alpha x R ~= 16 -> alpha ~= 16/R = {alpha:.4f} (good band 8-32 epochs: alpha in "
        f"[{low:.4f}, {high:.4f}]). The rest of the budget trains the masked-diffusion objective,",
        "which keeps improving on repeated data where pure AR overfits.",
    ]
    if r in RELEASED:
        lines.append(
            f"The released model for R = {r:g} uses alpha = {RELEASED[r]} (branch "
            f"alpha_{RELEASED[r]:.3f}_n-reps={r:g})."
        )
    return alpha, lines


def repetitions_from_budget(unique_tokens: float, budget_tokens: float) -> float:
    """R = budget / unique tokens; a budget below the corpus sees each token at most once: R = 1."""
    for name, value in (("unique_tokens", unique_tokens), ("budget_tokens", budget_tokens)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return max(1.0, budget_tokens / unique_tokens)
