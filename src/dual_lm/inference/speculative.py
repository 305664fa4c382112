"""Self-speculative decoding: the bidirectional mode drafts k tokens at once, the causal mode verifies them.

``draft="one-pass"`` (the default) makes a round cost one forward pass, with TiDAR's idea (Liu et al.,
arXiv 2511.08923): the pass that verifies this round's k drafts also drafts the next round, for
every acceptance length at once. Its rows are

* the verification rows: the last accepted token and the k drafts, causal over the KV cache of the
  accepted sequence, which give the causal distribution p at each draft position and one after;
* one draft block per acceptance length a = 0..k: k ``<mask>`` slots at the positions after
  ``d_1..d_a`` and the token the verifier adds there, attending to the cache, to the verification
  rows of the last accepted token and ``d_1..d_a`` (exact causal keys), and to each other
  (bidirectionally). Slot j's output is the draft for the token after slot j (MNTP, read at i-1).

The drafts are accepted with the speculative-sampling rule; the verifier's own token (a
correction or the bonus) follows them, and block a (a = the number accepted) holds the next
round's k drafts, which need no pass of their own. Only the verification rows of the accepted
tokens stay in the KV cache, so it is exactly the causal cache. The head (projection + vocabulary)
runs on the k+1 verification rows and on the chosen block's k rows, not on the other blocks.

``draft="cached"`` is the two-pass scheme (one bidirectional pass over the last accepted token and
k ``<mask>`` over the causal cache, then one causal verification pass), ``draft="full"`` the same
with the draft pass recomputing the whole sequence bidirectionally, as in training.

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
    forwards: int = 0  # forward passes after the prompt's (the prefill is not counted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / self.forwards if self.forwards else 0.0

    def stats_line(self, k: int) -> str:
        """The line ``dual-lm generate --mode speculative`` prints with its output."""
        return (
            f"[speculative: tokens per forward: {self.tokens_per_forward:.2f} ({len(self.tokens)} tokens in "
            f"{self.forwards} passes), acceptance rate: {self.acceptance_rate:.1%} of {self.drafted} drafts checked, "
            f"k={k}]"
        )


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


def round_allowed(past: int, drafts: int, k: int, device=None) -> torch.Tensor:
    """Bool [1, 1, Q, past + Q] of a one-pass round: ``drafts + 1`` causal verification rows, then
    ``drafts + 1`` blocks of ``k`` slots, block a seeing verification rows 0..a and itself."""
    rows = drafts + 1
    q = rows + rows * k
    allowed = torch.zeros(q, past + q, dtype=torch.bool, device=device)
    allowed[:, :past] = True  # the cache of the accepted sequence
    allowed[:rows, past : past + rows] = torch.ones(rows, rows, dtype=torch.bool, device=device).tril()
    for a in range(rows):
        block = slice(rows + a * k, rows + (a + 1) * k)
        allowed[block, past : past + a + 1] = True
        allowed[block, past + block.start : past + block.stop] = True
    return allowed[None, None]


def round_positions(n: int, drafts: int, k: int, device=None) -> torch.Tensor:
    """Rotary positions [Q] of a one-pass round after a sequence of ``n`` tokens: the verification rows
    at n-1 .. n-1+drafts, block a's slots at n+a .. n+a+k-1."""
    verify = torch.arange(n - 1, n + drafts, device=device)
    blocks = n + torch.arange(drafts + 1, device=device)[:, None] + torch.arange(k, device=device)[None]
    return torch.cat([verify, blocks.flatten()])


def one_pass_round(model, cache, seq: torch.Tensor, drafts: torch.Tensor, k: int):
    """One forward over the cache (of ``seq[:-1]``): hidden states of the verification rows [d+1, H]
    and of the draft blocks [d+1, k, H]. Every row's keys and values are appended to ``cache``; the
    caller crops it back to the accepted tokens' verification rows."""
    n, d = seq.numel(), drafts.numel()
    slots = torch.full(((d + 1) * k,), MASK_ID, dtype=seq.dtype, device=seq.device)
    ids = torch.cat([seq[-1:], drafts, slots])[None]
    allowed = round_allowed(cache.get_seq_length(), d, k, seq.device)
    hidden = model.run_trunk(
        input_ids=ids,
        position_ids=round_positions(n, d, k, seq.device)[None],
        attention_mask=model._mask_for_backend(allowed),
        cache=cache,
        use_cache=True,
    ).last_hidden_state[0]
    return hidden[: d + 1], hidden[d + 1 :].view(d + 1, k, -1)


def check_options(prompt_tokens: int, max_new_tokens: int, limit: int, k: int, temperature: float, draft: str) -> None:
    """One ValueError naming the first bad option of ``speculative_generate``."""
    if not isinstance(k, int) or not 1 <= k <= 64:
        raise ValueError(f"k (drafted tokens per round) must be a whole number in [1, 64], got {k}")
    if draft not in DRAFTS:
        raise ValueError(f"unknown draft {draft!r}; choose one of {', '.join(DRAFTS)}")
    if not math.isfinite(temperature) or temperature < 0:  # nan would compare as neither < 0 nor >= 0
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    # one-pass: a round started with n < prompt + max_new tokens puts its last block slot at position
    # n + 2k - 1, so prompt + max_new + 2k - 1 positions must fit
    check_room(prompt_tokens, max_new_tokens, limit, lookahead=2 * k - 1 if draft == "one-pass" else k)


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


@dataclass
class _Decoding:
    """The state shared by both schemes' rounds: the sequence, its causal cache and the statistics."""

    model: object
    seq: torch.Tensor
    cache: DynamicCache
    start: int
    temperature: float
    generator: torch.Generator
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0

    def draw(self, q: torch.Tensor) -> torch.Tensor:
        """Drafts [k] from the draft distributions q [k, V] (their argmax when greedy)."""
        if self.temperature == 0:
            return q.argmax(-1)
        return torch.multinomial(q.cpu(), 1, generator=self.generator).squeeze(1).to(self.seq.device)

    def take(self, new: list[int], drafts: int) -> None:
        """Append a round's tokens; count the drafts examined (up to the first rejection) and accepted."""
        self.drafted += min(len(new), drafts)
        self.accepted += len(new) - 1
        self.seq = torch.cat([self.seq, torch.tensor(new, dtype=self.seq.dtype, device=self.seq.device)])


def _keep(cache: DynamicCache, length: int) -> None:
    """Crop ``cache`` to its first ``length`` positions (transformers crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _two_pass_rounds(state: _Decoding, k: int, draft: str):
    """Rounds of a draft pass and a causal verification pass; yields each round's new tokens."""
    model, cache = state.model, state.cache
    while True:
        q = _distribution(_draft_logits(model, state.seq, cache, k, draft), state.temperature)
        drafts = state.draw(q)
        verify = torch.cat([state.seq[-1:], drafts])[None]  # one cached causal pass: p at positions n-1 .. n+k-1
        p = _distribution(model(verify, cache=cache, use_cache=True).logits[0], state.temperature)  # [k+1, V]
        state.forwards += 2
        new = accept_drafts(p, q, drafts, state.generator)
        state.take(new, k)
        _keep(cache, state.seq.numel() - 1)  # drop the rejected drafts' keys and values
        yield drafts.tolist(), new


def _one_pass_rounds(state: _Decoding, k: int):
    """Rounds of one pass each (see the module docstring); yields each round's new tokens."""
    model, cache = state.model, state.cache
    drafts = state.seq.new_empty(0)
    q = torch.empty(0)
    while True:
        n, d = state.seq.numel(), drafts.numel()
        verified, blocks = one_pass_round(model, cache, state.seq, drafts, k)
        state.forwards += 1
        p = _distribution(model.lm_head(verified), state.temperature)  # [d+1, V]
        new = accept_drafts(p, q, drafts, state.generator)
        _keep(cache, n + len(new) - 1)  # the cache of every accepted token but the verifier's last one
        state.take(new, d)
        q = _distribution(model.lm_head(blocks[len(new) - 1]), state.temperature)  # the block of this outcome
        checked = drafts.tolist()
        drafts = state.draw(q)
        yield checked, new


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
    draft: str = "one-pass",
    on_round=None,
) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` [P] drafting ``k`` tokens per round.

    A transformers ``streamer`` gets the prompt once the options are checked, then each round's new
    tokens (cut at the limit and at ``</s>``), then ``end()``, as ``model.generate`` drives it.
    ``on_round(drafts, new)`` sees each round's checked drafts and the tokens it adds (the accepted
    drafts, then the verifier's token; uncut) and stops the decoding by returning True."""
    check_options(prompt_ids.numel(), max_new_tokens, model.config.max_position_embeddings, k, temperature, draft)
    if streamer is not None:
        streamer.put(prompt_ids)
    seq = prompt_ids.to(model.device).clone()
    cache = DynamicCache(config=model.config)
    if seq.numel() > 1:  # the causal cache always covers every token but the last one
        model(seq[None, :-1], cache=cache, use_cache=True)
    state = _Decoding(model, seq, cache, seq.numel(), temperature, torch.Generator().manual_seed(seed))
    rounds = _one_pass_rounds(state, k) if draft == "one-pass" else _two_pass_rounds(state, k, draft)
    for drafts, new in rounds:
        if streamer is not None:
            _stream(streamer, new, state.seq.numel() - len(new) - state.start, max_new_tokens, stop_at_eos)
        if on_round is not None and on_round(drafts, new):
            break
        if state.seq.numel() - state.start >= max_new_tokens or (stop_at_eos and EOS_ID in new):
            break
    if streamer is not None:
        streamer.end()
    out = state.seq[state.start : state.start + max_new_tokens].tolist()
    out = cut_at_eos(out) if stop_at_eos else out
    return SpeculativeResult(out, state.drafted, state.accepted, state.forwards)
