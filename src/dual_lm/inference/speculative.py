"""Self-speculative decoding: the bidirectional mode drafts k tokens at once, the causal mode verifies them.

Each round reads k drafts from one bidirectional pass over the last accepted token and k ``<mask>``
(token i read at position i-1, MNTP); one causal pass of k+1 tokens over the KV cache of the
accepted sequence then gives the causal distribution p at every draft position (the cache is
cropped back after rejections). The draft pass (``draft="cached"``, the default) also runs over
that causal KV cache: only the k+1 new positions attend bidirectionally, to each other and to the
cache, so a round costs two short cached passes; ``draft="full"`` recomputes the whole sequence
bidirectionally, as in training (on the demo model both accept about as often, see BENCHMARKS.md).
Drafts are accepted left to right with the speculative-sampling rule (Leviathan et al. 2023; Chen
et al. 2023): accept x with probability min(1, p(x)/q(x)), else sample from normalise(max(0, p - q))
and stop the round; when all k pass, one more token comes from p. Greedy (temperature 0) accepts a
draft iff it is the causal argmax, so the output is token for token the causal greedy output;
sampled output has the causal distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dual_lm.inference import DRAFTS
from dual_lm.inference.sampling import check_room, cut_at_eos
from dual_lm.tokens import EOS_ID, MASK_ID


@dataclass
class SpeculativeResult:
    tokens: list[int]  # the new tokens
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float().clone()
    logits[..., MASK_ID] = -float("inf")
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, -1)


def _draft_logits(model, seq: torch.Tensor, cache, k: int, draft: str) -> torch.Tensor:
    """[k, V] bidirectional logits for the k tokens after ``seq``, read at the positions before them."""
    masks = torch.full((k,), MASK_ID, dtype=seq.dtype, device=seq.device)
    if draft == "full":
        n = seq.numel()
        return model(torch.cat([seq, masks])[None], attention_mode="bidirectional").logits[0, n - 1 : n + k - 1]
    block = torch.cat([seq[-1:], masks])[None]  # positions n-1 .. n+k-1, over the cache of 0 .. n-2
    logits = model(block, cache=cache, use_cache=True, attention_mode="bidirectional").logits[0, :k]
    cache.crop(-(k + 1))  # the draft's keys and values are not the causal ones: drop them
    return logits


def check_options(prompt_tokens: int, max_new_tokens: int, limit: int, k: int, temperature: float, draft: str) -> None:
    """One ValueError naming the first bad option of ``speculative_generate``."""
    if not isinstance(k, int) or not 1 <= k <= 64:
        raise ValueError(f"k (drafted tokens per round) must be a whole number in [1, 64], got {k}")
    if draft not in DRAFTS:
        raise ValueError(f"unknown draft {draft!r}; choose one of {', '.join(DRAFTS)}")
    if not math.isfinite(temperature) or temperature < 0:  # nan would compare as neither < 0 nor >= 0
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    check_room(prompt_tokens, max_new_tokens, limit, lookahead=k)


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator) -> list[int]:
    """The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) for one round.

    p [k+1, V]: target (causal) distributions at the k draft positions and one after; q [k, V]: the
    draft distributions the drafts [k] were drawn from. Draft j is accepted with probability
    min(1, p_j(x) / q_j(x)); the first rejection is replaced by a sample of normalise(max(0, p_j - q_j))
    and ends the round; if all k pass, one more token comes from p_k. Returns the new tokens (1 to
    k+1 of them; the accepted drafts are all but the last), each distributed as p at its position.
    """
    new, k = [], drafts.numel()
    for j in range(k):
        x = int(drafts[j])
        if torch.rand((), generator=generator).item() < min(1.0, (p[j, x] / q[j, x]).item()):
            new.append(x)
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[j]
        return [*new, int(torch.multinomial(residual.cpu(), 1, generator=generator))]
    return [*new, int(torch.multinomial(p[k].cpu(), 1, generator=generator))]


def _stream(streamer, new: list[int], before: int, max_new_tokens: int, stop_at_eos: bool) -> None:
    shown = new[: max(0, max_new_tokens - before)]
    shown = cut_at_eos(shown) if stop_at_eos else shown
    if shown:
        streamer.put(torch.tensor(shown))


@torch.no_grad()
def speculative_generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 0.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    streamer=None,
    draft: str = "cached",
) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` [P] drafting ``k`` tokens per round.

    A transformers ``streamer`` gets the prompt once the options are checked, then each round's new
    tokens (cut at the limit and at ``</s>``), then ``end()``, as ``model.generate`` drives it."""
    check_options(prompt_ids.numel(), max_new_tokens, model.config.max_position_embeddings, k, temperature, draft)
    if streamer is not None:
        streamer.put(prompt_ids)
    generator = torch.Generator().manual_seed(seed)
    seq = prompt_ids.to(model.device).clone()
    start, drafted, accepted = seq.numel(), 0, 0
    cache = DynamicCache(config=model.config)
    if seq.numel() > 1:  # the causal cache always covers every token but the last one
        model(seq[None, :-1], cache=cache, use_cache=True)
    while seq.numel() - start < max_new_tokens:
        q = _distribution(_draft_logits(model, seq, cache, k, draft), temperature)
        drafts = q.argmax(-1) if temperature == 0 else torch.multinomial(q.cpu(), 1, generator=generator).squeeze(1)
        drafts = drafts.to(seq.device)
        verify = torch.cat([seq[-1:], drafts])[None]  # one cached causal pass: p at positions n-1 .. n+k-1
        p = _distribution(model(verify, cache=cache, use_cache=True).logits[0], temperature)  # [k+1, V]
        new = accept_drafts(p, q, drafts, generator)
        drafted, accepted = drafted + min(len(new), k), accepted + len(new) - 1
        seq = torch.cat([seq, torch.tensor(new, dtype=seq.dtype, device=seq.device)])
        rejected = cache.get_seq_length() - (seq.numel() - 1)
        if rejected > 0:
            cache.crop(-rejected)  # drop the rejected drafts' keys and values
        if streamer is not None:
            _stream(streamer, new, seq.numel() - len(new) - start, max_new_tokens, stop_at_eos)
        if stop_at_eos and EOS_ID in new:
            break
    if streamer is not None:
        streamer.end()
    out = seq[start : start + max_new_tokens].tolist()
    out = cut_at_eos(out) if stop_at_eos else out
    return SpeculativeResult(out, drafted, accepted)
