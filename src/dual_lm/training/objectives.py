"""The dual objective: autoregressive (AR) and masked-diffusion (MD) losses, z-loss, and mixing by alpha.

Facts from the reference trainer (DESIGN.md section 3):

- Every position predicts the next token. AR: causal attention, every position is a target,
  loss = ar_weight x sum CE / (B x L) with ar_weight 2.0 as the released models were trained
  (1.0 is the v3 paper's equation).
- MD: per row t ~ U(0,1), u ~ U(0,1), k = max(1, floor(t L + u)) positions chosen uniformly among
  non-special tokens (ids < 16 never) become ``<mask>``; position j has a target iff input j+1 is
  masked, and the last position always has one. Loss = sum over targets of CE / t~ divided by
  B x L (all positions), t~ = (1 - 1e-4) k / L + 1e-4. Bidirectional attention. When k exceeds
  the maskable tokens of a row, every position of the row is masked (``<s>`` included) and
  t~ = 1, as the reference does.
- z-loss: logsumexp(logits)^2 with the same per-token weights, coefficient 1e-4.
- The head runs only at target positions.

AR and MD rows can share one forward pass: each row carries its own attention pattern (causal or
bidirectional, both restricted to its documents), so a single process realises any alpha
(``rows_for_ar``). Under torchrun the reference's rank rotation is available too: alpha = 1 - m/d
as a reduced fraction, the world size a multiple of d, and rank r runs MD in epoch e iff
(e + r) mod d < m, where e = step // (steps // R) counts optimiser steps (``md_ranks``,
``rotation_epoch``, ``rank_runs_md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from dual_lm.config import ObjectiveConfig
from dual_lm.tokens import MASK_ID, NUM_SPECIAL_TOKENS

IGNORE = -100
RATE_EPS = 1e-4


# ----------------------------------------------------------------------------- masking


def draw_mask_counts(batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k = max(1, floor(t L + u)) per row with t, u ~ U(0, 1) (the reference's exactly-k masking)."""
    t = torch.rand(batch, generator=generator)
    u = torch.rand(batch, generator=generator)
    return torch.clamp(torch.floor(t * length + u), min=1).long()


def choose_positions(eligible: torch.Tensor, counts: torch.Tensor, generator=None) -> torch.Tensor:
    """Bool [B, L]: exactly counts[b] positions of row b, uniformly among ``eligible``; a row whose count
    exceeds its eligible positions is masked everywhere, ineligible positions included.

    The reference thresholds uniform scores (ineligible ones infinite) at the k-th smallest, so a k
    past the finite scores reaches infinity and takes every position (about 0.1% of MD rows at
    L = 2,048, where k is close to L and the row holds a few ``<s>``).
    """
    device, eligible = eligible.device, eligible.cpu()
    scores = torch.rand(eligible.shape, generator=generator)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible positions sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    overflow = counts.cpu() > eligible.sum(1)
    return (((ranks < counts.cpu()[:, None]) & eligible) | overflow[:, None]).to(device)


def mask_rate(masked: torch.Tensor) -> torch.Tensor:
    """t~ per row: (1 - 1e-4) k / L + 1e-4 for the realised count k."""
    length = masked.shape[1]
    return (1 - RATE_EPS) * masked.sum(1).double() / length + RATE_EPS


@dataclass
class MaskedRows:
    """A masked-diffusion draw for some rows: inputs with ``<mask>``, aligned targets, per-row rate t~."""

    inputs: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L], IGNORE where no loss
    rate: torch.Tensor  # [B] float64
    masked: torch.Tensor  # [B, L] bool


def mask_rows(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator | None = None,
    replay: torch.Tensor | None = None,
) -> MaskedRows:
    """Draw (or replay, when ``replay`` is a bool [B, L] mask) the MD corruption of packed rows."""
    if replay is None:
        counts = draw_mask_counts(inputs.shape[0], inputs.shape[1], generator)
        masked = choose_positions(inputs >= NUM_SPECIAL_TOKENS, counts, generator)
    else:
        masked = replay.to(torch.bool)
    corrupted = inputs.masked_fill(masked, MASK_ID)
    has_target = torch.zeros_like(masked)
    has_target[:, :-1] = masked[:, 1:]
    has_target[:, -1] = True
    return MaskedRows(corrupted, targets.masked_fill(~has_target, IGNORE), mask_rate(masked), masked)


# ----------------------------------------------------------------------------- losses


def weighted_head_loss(head, hidden, targets, weights, z_coefficient: float, normaliser: int):
    """sum_j w_j (CE_j + z lse_j^2) / normaliser over target positions, with the head run only there.

    Returns the loss and a dict of sums: weighted CE, plain CE, correct argmax, target count.
    """
    where = targets != IGNORE  # [B, L]
    logits = head(hidden[where]).float()  # [N, V]
    gold = targets[where]
    w = weights[where]
    ce = F.cross_entropy(logits, gold, reduction="none")
    lse = ce + logits.gather(1, gold[:, None]).squeeze(1)  # logsumexp from the fused CE kernel, no second pass
    weighted = (w * ce).sum()
    loss = (weighted + z_coefficient * (w * lse.square()).sum()) / normaliser
    sums = {
        "weighted": weighted.detach(),
        "ce": ce.sum().detach(),
        "correct": (logits.argmax(-1) == gold).sum(),
        "targets": torch.tensor(gold.numel()),
    }
    return loss, sums


def corrupt_rows(inputs, targets, ar_rows, ar_weight: float, generator=None, replay=None):
    """(model inputs, targets, per-position weights) [B, L] of one dual batch: AR rows as they are with
    weight ``ar_weight``; the others the MD draw (``mask_rows``) with weight 1 / t~. An all-AR batch
    draws nothing, so the generator advances only when masks are used."""
    batch, length = inputs.shape
    ar_weight = torch.tensor(ar_weight, device=inputs.device)
    if bool(ar_rows.all()):
        return inputs, targets, ar_weight.expand(batch, length)
    md = mask_rows(inputs, targets, generator, replay)
    model_inputs = torch.where(ar_rows[:, None], inputs, md.inputs)
    row_targets = torch.where(ar_rows[:, None], targets, md.targets)
    md_weight = (1.0 / md.rate.float()).to(inputs.device)[:, None]
    return model_inputs, row_targets, torch.where(ar_rows[:, None], ar_weight, md_weight).expand(batch, length)


class DualObjective(torch.nn.Module):
    """``objective(inputs, targets, document_ids, ar_rows)`` -> (loss, stats) in one forward pass.

    Rows with ``ar_rows`` True are AR rows, the others MD rows. The loss is
    (n_ar / B) AR + (n_md / B) MD, where AR and MD are the reference's losses over their own rows,
    i.e. the sum of weighted token losses over all rows divided by B x L. Wrap this module (not
    the bare model) in DDP so that gradient synchronisation sees the whole computation.
    """

    def __init__(self, model, cfg: ObjectiveConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, inputs, targets, document_ids, ar_rows, generator=None, replay=None):
        cfg = self.cfg
        batch, length = inputs.shape
        ar_rows = ar_rows.to(inputs.device)
        model_inputs, row_targets, weights = corrupt_rows(inputs, targets, ar_rows, cfg.ar_weight, generator, replay)
        hidden = self.trunk(model_inputs, ar_rows, document_ids)
        total = torch.zeros((), device=inputs.device)
        stats: dict[str, torch.Tensor] = {}
        for name, rows in (("ar", ar_rows), ("md", ~ar_rows)):
            if not bool(rows.any()):
                continue
            sub_targets = row_targets.masked_fill(~rows[:, None], IGNORE)
            loss, sums = weighted_head_loss(
                self.model.lm_head, hidden, sub_targets, weights, cfg.z_loss, batch * length
            )
            total = total + loss
            stats.update({f"{name}_{k}": v for k, v in sums.items()})
            stats[f"{name}_rows"] = rows.sum()
        return total, stats

    def trunk(self, inputs, ar_rows, document_ids):
        """Final-normed hidden states [B, L, H] under each row's pattern (an all-AR batch runs the plain
        causal LlamaModel path, an all-MD one the bidirectional path: ``run_trunk`` picks them). No KV
        cache: training never reads one back."""
        out = self.model.run_trunk(input_ids=inputs, row_causal=ar_rows, document_ids=document_ids, use_cache=False)
        return out.last_hidden_state


# ----------------------------------------------------------------------------- mixing by alpha


def rows_for_ar(batch: int, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B]: which rows run AR. floor(alpha B) rows, plus one more with probability frac(alpha B),
    so the expected AR share is exactly alpha at any batch size; which rows is random."""
    exact = alpha * batch
    count = math.floor(exact)
    if torch.rand((), generator=generator).item() < exact - count:
        count += 1
    order = torch.randperm(batch, generator=generator)
    ar = torch.zeros(batch, dtype=torch.bool)
    ar[order[:count]] = True
    return ar


def md_ranks(alpha: float, world_size: int) -> tuple[int, int]:
    """(m, d): 1 - alpha = m/d as a reduced fraction, the reference's hybrid numerator and denominator
    (63/64 -> (1, 64), 3/4 -> (1, 4), 1 -> (0, 1), 0 -> (1, 1)); the world size must be a multiple of d."""
    share = Fraction(1 - alpha).limit_denominator(1 << 20)
    m, d = share.numerator, share.denominator
    if not math.isclose(m / d, 1 - alpha, rel_tol=0.0, abs_tol=1e-12) or world_size % d:
        raise ValueError(
            f"alpha={alpha} cannot be realised by splitting {world_size} rank(s): by ranks 1 - alpha must be "
            f"m/d with the world size a multiple of d (here {m}/{d}); use objective.alpha_mode=rows or launch "
            f"a multiple of {d} processes"
        )
    return m, d


def rotation_epoch(step: int, total_steps: int, repetitions: int) -> int:
    """The reference's epoch of the MD-rank rotation: step // (total_steps // R), counted in optimiser steps
    (not data passes)."""
    per_epoch = total_steps // repetitions
    if per_epoch < 1:
        raise ValueError(f"{total_steps} steps over {repetitions} repetitions leave epochs of 0 steps")
    return step // per_epoch


def rank_runs_md(epoch: int, rank: int, md_count: int, denominator: int) -> bool:
    """The reference rotation: rank r runs MD in epoch e iff (e + r) mod d < m."""
    return (epoch + rank) % denominator < md_count
