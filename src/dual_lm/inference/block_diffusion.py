"""Semi-autoregressive block diffusion over an exact causal KV cache (issue 16).

The canvas (the prompt, then ``max_new_tokens`` ``<mask>``) is cut into blocks of ``block_length``
new positions, denoised left to right as in LLaDA's block sampling (Nie et al. 2025). What this
mode defines, and what makes its cache exact:

- the committed text (the prompt and every finished block) attends **causally**, so its keys and
  values are those of a causal prefill, exactly the cache causal generation keeps; they are
  written once and never recomputed;
- the **window** of block [s, e) is positions s-1 .. e-1: the last committed token (where the
  block's first token is read, MNTP) and the block's slots. It attends to the cache and
  bidirectionally to itself, and sees nothing after the block (no later masks exist yet).

Each step is one forward pass over the window, which commits some of its masked slots
(``diffusion.choose_commits``: the fixed LLaDA schedule, random, or Fast-dLLM's confidence
threshold, Wu et al., arXiv 2505.22618, whose adaptive steps let a block finish in fewer passes).
The first pass of a block also carries, as causal rows, the committed tokens not yet in the cache
(the prompt but its last token, or the previous block): the cache is written without a pass of its
own, so a run costs exactly its number of steps. The window's own keys are dropped after each pass.

The cache is exact: after each block it equals a fresh causal prefill of the committed text, and
the sampler equals an uncached twin that recomputes the whole sequence at every step under the
same pattern (an explicit dense mask), token for token (both tested). Fast-dLLM's approximate
prefix cache (keys of the prefix computed bidirectionally and reused while they go stale) is not
offered. This mode is not ``sample_canvas`` (``block_length=None``), whose prompt attends
bidirectionally to the whole canvas; the two coincide when the prompt is ``<s>`` alone and one
block covers the canvas (tested).

A later block never changes an earlier one, so with ``stop_at_eos`` the sampler stops after the
block that holds ``</s>``: the same output in fewer passes (the blocks after it stay masked).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dual_lm.inference.diffusion import (
    DiffusionConfig,
    DiffusionResult,
    _candidates,
    after_step,
    choose_commits,
    step_counts,
    steps_per_block,
)
from dual_lm.tokens import EOS_ID, MASK_ID


def window_allowed(written: int, pending: int, width: int, device=None) -> torch.Tensor:
    """Bool [1, 1, Q, written + Q] of a pass with Q = ``pending`` + ``width`` rows after a cache of
    ``written`` positions: the pending committed rows causal, the window's rows seeing every row."""
    q = pending + width
    allowed = torch.zeros(q, written + q, dtype=torch.bool, device=device)
    allowed[:, :written] = True
    causal = torch.ones(pending, pending, dtype=torch.bool, device=device).tril()
    allowed[:pending, written : written + pending] = causal
    allowed[pending:, written:] = True
    return allowed[None, None]


def _keep(cache: DynamicCache, length: int) -> None:
    """Crop ``cache`` to its first ``length`` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def window_hidden(model, cache: DynamicCache, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Hidden states [stop - start + 1, H] of the window of block [start, stop) in one pass.

    The committed positions after the cache and before ``start - 1`` run as causal rows and stay in
    the cache (exact causal keys); the window's keys are cropped away again."""
    written = cache.get_seq_length()
    pending = start - 1 - written
    ids = x[written:stop][None]
    if pending == 0:  # nothing to write: every row sees every key, no mask needed
        out = model.run_trunk(input_ids=ids, cache=cache, use_cache=True, attention_mode="bidirectional")
    else:
        allowed = window_allowed(written, pending, stop - start + 1, x.device)
        out = model.run_trunk(
            input_ids=ids,
            position_ids=torch.arange(written, stop, device=x.device)[None],
            attention_mask=model._mask_for_backend(allowed),
            cache=cache,
            use_cache=True,
        )
    _keep(cache, start - 1)
    return out.last_hidden_state[0, pending:]


def denoise_block(
    model,
    cache,
    x,
    start: int,
    stop: int,
    steps: int,
    cfg: DiffusionConfig,
    generator,
    result,
    trace=False,
    on_step=None,
) -> bool:
    """Fill the masked slots of ``x[start:stop]`` over the cache, one window pass per step; True when
    ``on_step`` asked to stop."""
    for count in step_counts(stop - start, steps, cfg):
        still = (x[start:stop] == MASK_ID).nonzero().flatten() + start
        if not still.numel():
            break
        hidden = window_hidden(model, cache, x, start, stop)  # row j is position start - 1 + j
        result.forwards += 1
        token, conf = _candidates(model.lm_head(hidden[still - start]), cfg.temperature, generator)
        chosen = choose_commits(conf, count, cfg, generator)
        x[still[chosen]] = token[chosen]
        if after_step(result, x, still[chosen], trace, on_step):
            return True
    return False


@torch.no_grad()
def block_generate(
    model, prompt_ids: torch.Tensor, new_tokens: int, cfg: DiffusionConfig, trace=False, cache=None, on_step=None
) -> DiffusionResult:
    """Fill ``new_tokens`` masks after ``prompt_ids`` [P] (``<s>`` first) block by block over a causal
    KV cache (see the module docstring). ``cache``: an empty ``DynamicCache`` to fill, kept by the
    caller (e.g. to inspect it); by default a fresh one. ``on_step``: see ``diffusion.after_step``.
    Call ``diffusion_generate`` for the checks and the cut at ``</s>``."""
    cfg.validate(new_tokens)
    if prompt_ids.numel() < 1:
        raise ValueError("the prompt must hold at least <s>: the first new token is read at the position before it")
    length = cfg.block_length or new_tokens
    p = prompt_ids.numel()
    x = torch.cat([prompt_ids, torch.full((new_tokens,), MASK_ID, dtype=prompt_ids.dtype)]).to(model.device)
    result = DiffusionResult(x, list(range(p, p + new_tokens)))
    cache = DynamicCache(config=model.config) if cache is None else cache
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = range(p, p + new_tokens, length)
    for start, steps in zip(starts, steps_per_block(cfg.steps, len(starts)), strict=True):
        stop = min(start + length, p + new_tokens)
        if denoise_block(model, cache, x, start, stop, steps, cfg, generator, result, trace, on_step):
            break
        if cfg.stop_at_eos and bool((x[start:stop] == EOS_ID).any()):
            break
    return result
