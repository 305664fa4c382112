"""Choosing alpha from the data budget: the paper's Remarks 1 and 2."""

from __future__ import annotations

from dual_lm.errors import UserError

# the released recommendations (model card) for data-constrained runs
RELEASED = {32: 0.75, 128: 0.125}


def recommend_alpha(repetitions: float) -> tuple[float, list[str]]:
    """(alpha, reasoning): 63/64 for R <= 16; else about 16/R so the AR objective sees ~16 epochs (band 8-32)."""
    if repetitions < 1:
        raise UserError(f"repetitions must be >= 1 (the token budget divided by the unique tokens), got {repetitions}")
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


def repetitions_from_budget(unique_tokens: int, budget_tokens: int) -> float:
    if unique_tokens <= 0 or budget_tokens <= 0:
        raise UserError("--unique-tokens and --budget-tokens must be positive")
    return max(1.0, budget_tokens / unique_tokens)
