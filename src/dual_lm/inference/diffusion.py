"""Masked-diffusion sampling with a dual model's bidirectional mode, adapted to the next-token shift.

A canvas holds fixed tokens (the prompt, and for infilling the text after the gap) and
``<mask>`` tokens to fill. Each step runs the model bidirectionally once; the token at a masked
position i is read from the logits at position i-1 (MNTP). A step commits some masked positions:

- ``confidence`` (low-confidence remasking, as in LLaDA, Nie et al. 2025): sample a candidate
  for every masked position and keep the most confident ones, the rest stay masked;
- ``random``: commit uniformly chosen positions (the plain reverse process of masked diffusion).

With ``block_length`` the gap is filled block by block from left to right (semi-autoregressive,
as in LLaDA's block sampling); inside a block the order is free. Fixed tokens never change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dual_lm.inference import STRATEGIES
from dual_lm.inference.sampling import check_room, cut_at_eos
from dual_lm.tokens import MASK_ID


@dataclass(frozen=True)
class DiffusionConfig:
    steps: int = 32  # model passes over the whole gap (at most one per masked token)
    temperature: float = 0.0  # 0 = argmax
    strategy: str = "confidence"
    block_length: int | None = None  # semi-autoregressive blocks; None = one block
    stop_at_eos: bool = True  # cut the generated text at the first </s>
    seed: int = 0

    def validate(self, gap: int) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not _whole(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be >= 1 (a whole number), got {self.steps}")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # nan would sample from nan probabilities
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.block_length is not None and (not _whole(self.block_length) or self.block_length < 1):
            raise ValueError(f"block_length must be >= 1 (a whole number), got {self.block_length}")
        if gap < 1:
            raise ValueError("nothing to fill: the canvas has no <mask> positions")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DiffusionResult:
    tokens: torch.Tensor  # [T] the final canvas
    filled: list[int]  # positions that were masked
    trace: list[torch.Tensor] = field(default_factory=list)  # canvas after each step, if asked


def commit_counts(masked: int, steps: int) -> list[int]:
    """How many positions each step commits: as even as possible, every step at least one."""
    steps = min(steps, masked)
    base, extra = divmod(masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def _candidates(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its probability) per row of logits [N, V]; <mask> itself is never proposed."""
    logits = logits.float().clone()
    logits[:, MASK_ID] = -math.inf
    if temperature == 0:
        probs = torch.softmax(logits, -1)
        conf, token = probs.max(-1)
        return token, conf
    probs = torch.softmax(logits / temperature, -1)
    token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
    return token, probs.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def sample_canvas(model, canvas: torch.Tensor, cfg: DiffusionConfig, trace: bool = False) -> DiffusionResult:
    """Fill every ``<mask>`` of ``canvas`` [T] (position 0 must be fixed, e.g. ``<s>``) and return it."""
    if canvas.dim() != 1:
        raise ValueError(f"canvas must be a 1-D token tensor, got shape {tuple(canvas.shape)}")
    if canvas[0].item() == MASK_ID:
        raise ValueError("position 0 cannot be masked: it has no position before it to be read from")
    gap = (canvas == MASK_ID).nonzero().flatten().tolist()
    cfg.validate(len(gap))
    generator = torch.Generator().manual_seed(cfg.seed)
    x = canvas.clone()
    result = DiffusionResult(x, list(gap))
    blocks = _blocks(gap, cfg.block_length)
    steps_per_block = commit_counts(cfg.steps, len(blocks)) if cfg.steps >= len(blocks) else [1] * len(blocks)
    for block, steps in zip(blocks, steps_per_block, strict=True):
        for count in commit_counts(len(block), steps):
            still = [p for p in block if x[p].item() == MASK_ID]
            logits = model(x[None], attention_mode="bidirectional").logits[0]  # [T, V]
            positions = torch.tensor(still, device=x.device)
            token, conf = _candidates(logits[positions - 1], cfg.temperature, generator)
            if cfg.strategy == "confidence":
                chosen = conf.topk(count).indices
            else:
                chosen = torch.randperm(len(still), generator=generator)[:count].to(x.device)
            x[positions[chosen]] = token[chosen]
            if trace:
                result.trace.append(x.clone())
    return result


def _blocks(gap: list[int], block_length: int | None) -> list[list[int]]:
    if block_length is None:
        return [gap]
    return [gap[i : i + block_length] for i in range(0, len(gap), block_length)]


@torch.no_grad()
def diffusion_generate(model, prompt_ids: torch.Tensor, new_tokens: int, cfg: DiffusionConfig, trace=False):
    """Generate ``new_tokens`` after ``prompt_ids`` [P] (starting with ``<s>``); returns (new ids, result)."""
    check_room(prompt_ids.numel(), new_tokens, model.config.max_position_embeddings)
    canvas = torch.cat([prompt_ids, torch.full((new_tokens,), MASK_ID, dtype=prompt_ids.dtype)])
    result = sample_canvas(model, canvas.to(model.device), cfg, trace)
    new = result.tokens[prompt_ids.numel() :].tolist()
    return (cut_at_eos(new) if cfg.stop_at_eos else new), result


@torch.no_grad()
def infill(model, before_ids: torch.Tensor, after_ids: torch.Tensor, lengths, cfg: DiffusionConfig):
    """Fill a gap between ``before_ids`` (starting with ``<s>``) and ``after_ids``.

    ``lengths`` is one span length or an iterable of candidates; with several, the span whose
    filled tokens have the highest mean log-probability (one bidirectional pass, each token read
    at the position before it) wins. Returns (span ids, length, mean log-probability).
    """
    candidates = [lengths] if isinstance(lengths, int) else list(lengths)
    if not candidates or min(candidates) < 1:
        raise ValueError(f"span lengths must be >= 1, got {candidates}")
    best = None
    for length in candidates:
        canvas = torch.cat([before_ids, torch.full((length,), MASK_ID, dtype=before_ids.dtype), after_ids])
        filled = sample_canvas(model, canvas.to(model.device), cfg).tokens
        logp = torch.log_softmax(model(filled[None], attention_mode="bidirectional").logits[0].float(), -1)
        span = torch.arange(before_ids.numel(), before_ids.numel() + length, device=filled.device)
        score = logp[span - 1, filled[span]].mean().item()
        if best is None or score > best[2]:
            best = (filled[span].tolist(), length, score)
    return best
