"""Multiple-choice metrics (DESIGN.md section 4): pure functions over per-item choice log-probabilities.

- accuracy: the choice with the highest summed log-probability is the gold one (ties: the first);
- length-normalised accuracy: the same after dividing each log-probability by its choice's length in
  characters, as lm-evaluation-harness's ``acc_norm`` (the choice text without the leading delimiter);
- normalized accuracy: 100 x (acc - r) / (100 - r), acc in percent, r the random-guess accuracy in
  percent: the mean over items of 100 / number of choices (BLiMP: 50).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ItemResult:
    logprobs: tuple[float, ...]  # one per choice
    lengths: tuple[int, ...]  # characters of each choice
    gold: int


@dataclass(frozen=True)
class TaskScore:
    items: int
    acc: float  # percent
    acc_norm: float  # percent
    chance: float  # percent

    @property
    def normalized(self) -> float:
        return normalized_accuracy(self.acc, self.chance)

    @property
    def normalized_norm(self) -> float:
        return normalized_accuracy(self.acc_norm, self.chance)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def is_correct(item: ItemResult, length_normalised: bool = False) -> bool:
    """Whether the best-scoring choice is the gold one (log-probability per character when normalised)."""
    scores = item.logprobs
    if length_normalised:
        scores = tuple(lp / max(n, 1) for lp, n in zip(item.logprobs, item.lengths, strict=True))
    return argmax(scores) == item.gold


def chance_level(choice_counts: Sequence[int]) -> float:
    """Random-guess accuracy in percent: the mean over items of 100 / number of choices."""
    if not choice_counts:
        raise ValueError("no items")
    return sum(100.0 / k for k in choice_counts) / len(choice_counts)


def normalized_accuracy(acc: float, chance: float) -> float:
    """100 x (acc - r) / (100 - r); 0 is chance, 100 is perfect, negative is worse than chance."""
    return 100.0 * (acc - chance) / (100.0 - chance)


def score_task(items: Sequence[ItemResult]) -> TaskScore:
    """Accuracy, length-normalised accuracy and chance level (all in percent) of a list of items."""
    if not items:
        raise ValueError("no items")
    n = len(items)
    acc = 100.0 * sum(is_correct(i) for i in items) / n
    acc_norm = 100.0 * sum(is_correct(i, True) for i in items) / n
    return TaskScore(n, acc, acc_norm, chance_level([len(i.logprobs) for i in items]))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
