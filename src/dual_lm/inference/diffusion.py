"""Masked-diffusion sampling with a dual model's bidirectional mode, adapted to the next-token shift.

A canvas holds fixed tokens (the prompt, and for infilling the text after the gap) and
``<mask>`` tokens to fill. Each step runs the model bidirectionally once; the token at a masked
position i is read from the logits at position i-1 (MNTP). A step commits some masked positions:

- ``confidence`` (low-confidence remasking, as in LLaDA, Nie et al. 2025): sample a candidate
  for every masked position and keep the most confident ones, the rest stay masked;
- ``random``: commit uniformly chosen positions (the plain reverse process of masked diffusion);
- with ``threshold`` (Fast-dLLM's parallel decoding, Wu et al., arXiv 2505.22618): commit every
  masked position whose confidence (the probability of its candidate) exceeds the threshold, and
  at least the most confident one; the number of steps is then adaptive and ``steps`` is unused.

``sample_canvas`` recomputes the whole canvas at every step. With ``block_length`` it fills the
gap block by block from left to right (semi-autoregressive, as in LLaDA's block sampling), every
pass still over the whole canvas. ``diffusion_generate`` with ``block_length`` runs the cached
block sampler of ``dual_lm.inference.block_diffusion`` instead (``cache="causal"``, the default):
the prompt and the finished blocks attend causally and sit in an exact KV cache, each step runs
only the current block; ``cache="none"`` keeps the uncached block sampler. Fixed tokens never change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dual_lm.inference import CACHES, STRATEGIES
from dual_lm.inference.sampling import check_room, cut_at_eos
from dual_lm.tokens import MASK_ID

# how diffusion_generate holds the committed text in block mode; the command line repeats these names
# (dual_lm.cli.using imports no torch)


@dataclass(frozen=True)
class DiffusionConfig:
    steps: int = 32  # model passes over the whole gap (at most one per masked token); unused with a threshold
    temperature: float = 0.0  # 0 = argmax
    strategy: str = "confidence"
    block_length: int | None = None  # semi-autoregressive blocks; None = one block over the whole canvas
    threshold: float | None = None  # commit every slot whose confidence exceeds it (at least one); None = fixed steps
    cache: str = "causal"  # with block_length: "causal" = exact KV cache of the committed text, "none" = recompute
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
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
                raise ValueError(f"threshold must be a number in (0, 1], got {self.threshold!r}")
            if not 0 < self.threshold <= 1:  # nan fails both comparisons
                raise ValueError(f"threshold must be a number in (0, 1], got {self.threshold}")
            if self.strategy != "confidence":
                raise ValueError(f"threshold commits by confidence: use strategy 'confidence', not {self.strategy!r}")
        if self.cache not in CACHES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {', '.join(CACHES)}")
        if gap < 1:
            raise ValueError("nothing to fill: the canvas has no <mask> positions")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DiffusionResult:
    tokens: torch.Tensor  # [T] the final canvas (a block sampler stopped at </s> leaves later blocks masked)
    filled: list[int]  # positions that were masked
    trace: list[torch.Tensor] = field(default_factory=list)  # canvas after each step, if asked
    forwards: int = 0  # forward passes of the model (one per step)

    @property
    def committed(self) -> int:
        """How many masked positions hold a token now."""
        return sum(1 for p in self.filled if self.tokens[p].item() != MASK_ID)

    @property
    def passes_per_token(self) -> float:
        """Forward passes per committed token (1.0 = one pass per token, as causal decoding)."""
        return self.forwards / self.committed if self.committed else 0.0


def commit_counts(masked: int, steps: int) -> list[int]:
    """How many positions each step commits: as even as possible, every step at least one."""
    steps = min(steps, masked)
    base, extra = divmod(masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def steps_per_block(steps: int, blocks: int) -> list[int]:
    """The steps of each block: ``steps`` shared as evenly as possible, at least one per block."""
    return commit_counts(steps, blocks) if steps >= blocks else [1] * blocks


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


def choose_commits(conf: torch.Tensor, count: int | None, cfg: DiffusionConfig, generator: torch.Generator):
    """Indices into the still-masked slots that this step commits.

    With ``cfg.threshold`` (Fast-dLLM, arXiv 2505.22618): every slot whose confidence exceeds it, at
    least the most confident one; otherwise ``count`` slots, the most confident (LLaDA's
    low-confidence remasking) or uniformly random ones."""
    if cfg.threshold is not None:
        chosen = (conf > cfg.threshold).nonzero().flatten()
        return chosen if chosen.numel() else conf.argmax()[None]
    if cfg.strategy == "confidence":
        return conf.topk(count).indices
    return torch.randperm(conf.numel(), generator=generator)[:count].to(conf.device)


def after_step(result: DiffusionResult, x: torch.Tensor, committed: torch.Tensor, trace: bool, on_step) -> bool:
    """Record a step: the canvas into ``result.trace`` when asked, and ``on_step(canvas [T], committed
    positions [C])`` when given (a server streams the canvas); True when ``on_step`` asks to stop."""
    if trace:
        result.trace.append(x.clone())
    return bool(on_step is not None and on_step(x, committed))


def step_counts(size: int, steps: int, cfg: DiffusionConfig):
    """Each step's commit count for a block of ``size`` slots: the fixed schedule, or ``None`` per step
    with a threshold (the caller stops when the block is full)."""
    if cfg.threshold is None:
        yield from commit_counts(size, steps)
        return
    for _ in range(size):  # a threshold step commits at least one slot
        yield None


@torch.no_grad()
def sample_canvas(
    model, canvas: torch.Tensor, cfg: DiffusionConfig, trace: bool = False, on_step=None
) -> DiffusionResult:
    """Fill every ``<mask>`` of ``canvas`` [T] (position 0 must be fixed, e.g. ``<s>``) and return it;
    ``on_step`` (see ``after_step``) may stop it early, leaving masks.

    Every step recomputes the whole canvas bidirectionally (``cfg.cache`` is not read here: a canvas
    may hold text after the gap, which no causal prefix cache could see)."""
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
    for block, steps in zip(blocks, steps_per_block(cfg.steps, len(blocks)), strict=True):
        for count in step_counts(len(block), steps, cfg):
            still = [p for p in block if x[p].item() == MASK_ID]
            if not still:
                break
            logits = model(x[None], attention_mode="bidirectional").logits[0]  # [T, V]
            result.forwards += 1
            positions = torch.tensor(still, device=x.device)
            token, conf = _candidates(logits[positions - 1], cfg.temperature, generator)
            chosen = choose_commits(conf, count, cfg, generator)
            x[positions[chosen]] = token[chosen]
            if after_step(result, x, positions[chosen], trace, on_step):
                return result
    return result


def _blocks(gap: list[int], block_length: int | None) -> list[list[int]]:
    if block_length is None:
        return [gap]
    return [gap[i : i + block_length] for i in range(0, len(gap), block_length)]


@torch.no_grad()
def diffusion_generate(
    model, prompt_ids: torch.Tensor, new_tokens: int, cfg: DiffusionConfig, trace=False, on_step=None
):
    """Generate ``new_tokens`` after ``prompt_ids`` [P] (starting with ``<s>``); returns (new ids, result).

    The result (``DiffusionResult``) holds the canvas, the forward passes and ``passes_per_token``.
    Without ``block_length`` (or with ``cache="none"``) every step recomputes the whole canvas
    (``sample_canvas``); with it the cached block sampler runs (``block_diffusion.block_generate``:
    the committed text attends causally, over an exact KV cache). ``on_step``: see ``after_step``."""
    check_room(prompt_ids.numel(), new_tokens, model.config.max_position_embeddings)
    cfg.validate(new_tokens)
    if cfg.block_length is not None and cfg.block_length > new_tokens:
        raise ValueError(f"block_length ({cfg.block_length}) must be <= max_new_tokens ({new_tokens})")
    if cfg.block_length is not None and cfg.cache == "causal":
        from dual_lm.inference.block_diffusion import block_generate  # it builds on this module

        result = block_generate(model, prompt_ids, new_tokens, cfg, trace, on_step=on_step)
    else:
        canvas = torch.cat([prompt_ids, torch.full((new_tokens,), MASK_ID, dtype=prompt_ids.dtype)])
        result = sample_canvas(model, canvas.to(model.device), cfg, trace, on_step)
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
