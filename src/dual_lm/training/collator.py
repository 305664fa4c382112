"""``DualObjectiveCollator``: the dual objective's batches for transformers' ``Trainer``.

Continued pretraining with ``Trainer`` (and its callbacks, PEFT, DeepSpeed) instead of ``dual-lm
train``: the collator draws what ``DualObjective`` draws (DESIGN.md section 3) and the model's
forward computes the same loss from it.

- Each example's ``input_ids`` (starting with ``<s>``) become one row: inputs ``ids[:-1]``, targets
  ``ids[1:]``. All examples of a batch have one length (packed rows, as ``dual-lm train`` sees them):
  the exact-k count and the rate t~ are drawn per row of that length, so padded rows would be masked
  at the wrong rate; unequal lengths are refused.
- Rows run AR with share alpha (``rows_for_ar``: floor(alpha B) rows plus one with probability
  frac(alpha B)); the others are MD rows with the reference's exactly-k masking: k = max(1, floor(t L
  + u)) non-special positions become ``<mask>``, a position has a target iff the next input is
  masked (the last always), each weighted 1 / t~.
- AR rows are weighted ``ar_weight`` (2.0, as the released models) at every position.

Unlike BERT's 80/10/10 masking (15% of tokens; 80% ``[MASK]``, 10% random, 10% kept, read at the
token itself) every chosen position becomes ``<mask>``, the rate varies per row over (0, 1], the
loss is weighted by 1/t (the masked-diffusion ELBO), and the prediction is read at the position
before (MNTP). The batch holds ``input_ids``, ``attention_mask``, ``shift_labels`` (aligned with the
logits), ``label_weights`` and ``row_causal``; ``DLMLlamaForCausalLM`` turns them into
sum w CE / (B x L), which equals ``DualObjective`` without z-loss on the same draw. The loss is a
mean per micro-batch, so ``Trainer``'s gradient accumulation averages it (no ``labels`` key: the
token count that ``Trainer`` would pass does not apply to a weighted loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dual_lm.training.objectives import corrupt_rows, rows_for_ar


@dataclass
class DualObjectiveCollator:
    """``collator(examples) -> batch`` for ``Trainer(data_collator=...)`` with ``DLMLlamaForCausalLM``."""

    alpha: float = 0.5  # the AR share of the rows
    ar_weight: float = 2.0
    seed: int | None = None  # a generator of its own when set (reproducible draws), else torch's global one
    generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not self.ar_weight > 0:
            raise ValueError(f"ar_weight must be > 0, got {self.ar_weight}")
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, examples: list) -> dict[str, torch.Tensor]:
        rows = [example_ids(e) for e in examples]
        if len({len(r) for r in rows}) > 1:  # the exact-k draw and 1/t~ are per row of the batch's length
            raise ValueError(
                f"DualObjectiveCollator needs examples of one length (packed rows, as dual-lm train uses), got "
                f"lengths {sorted({len(r) for r in rows})}; pack the texts into fixed-length rows first"
            )
        ids = torch.tensor(rows, dtype=torch.long)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        ar_rows = rows_for_ar(inputs.shape[0], self.alpha, self.generator)
        return dual_batch(inputs, targets, ar_rows, self.ar_weight, self.generator)


def example_ids(example) -> list[int]:
    ids = example["input_ids"] if isinstance(example, dict) else example
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if len(ids) < 2:
        raise ValueError(f"an example needs at least 2 tokens (<s> and one more), got {len(ids)}")
    return ids


def dual_batch(inputs, targets, ar_rows, ar_weight: float, generator=None) -> dict[str, torch.Tensor]:
    """The model's batch for packed ``inputs``/``targets`` [B, L] with AR rows ``ar_rows`` [B]: the
    corruption and weights of ``DualObjective`` (``corrupt_rows``)."""
    model_inputs, labels, weights = corrupt_rows(inputs, targets, ar_rows, ar_weight, generator)
    return {
        "input_ids": model_inputs,
        "attention_mask": torch.ones_like(inputs),
        "shift_labels": labels,
        "label_weights": weights.contiguous(),
        "row_causal": ar_rows,
    }
