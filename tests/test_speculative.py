"""One-pass self-speculative decoding: the round's rows against slow twins (uncached, eager, one
pattern at a time), the exact causal cache, greedy = causal greedy on 200 prompts, and the causal
distribution when sampling with rejections."""

import random

import pytest
import torch
from transformers import DynamicCache

from dual_lm.config import PRESETS, llama_config
from dual_lm.inference.speculative import (
    _Decoding,
    _one_pass_rounds,
    one_pass_round,
    round_allowed,
    speculative_generate,
)
from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM
from dual_lm.tokens import MASK_ID
from weights import peaked_tiny_model, perturbed


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(DLMLlamaForCausalLM(llama_config(PRESETS["tiny"])), scale=0.05, seed=2)


def eager_twin(model):
    twin = DLMLlamaForCausalLM(llama_config(PRESETS["tiny"], attn_implementation="eager")).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_round_rows_equal_their_slow_twins(model):
    """Verification rows = causal logits of the whole sequence; block a = the accepted prefix
    (causal) with k masks after it that see it and each other: both without a cache, eager attention."""
    twin = eager_twin(model)
    seq, drafts, k = torch.tensor([1, 300, 41, 77, 9]), torch.tensor([500, 12, 99]), 4
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(seq[None, :-1], cache=cache, use_cache=True)
        verified, blocks = one_pass_round(model, cache, seq, drafts, k)
        full = torch.cat([seq, drafts])
        causal = twin(full[None]).logits[0, seq.numel() - 1 :]
        torch.testing.assert_close(model.lm_head(verified), causal, atol=1e-5, rtol=1e-5)
        for a in range(drafts.numel() + 1):
            prefix = torch.cat([seq, drafts[:a]])
            ids = torch.cat([prefix, torch.full((k,), MASK_ID)])
            n = prefix.numel()
            allowed = torch.ones(n + k, n + k, dtype=torch.bool).tril()
            allowed[n:, :] = True  # the block sees the prefix and itself
            out = twin(ids[None], attention_mask=twin._mask_for_backend(allowed[None, None])).logits[0, n:]
            torch.testing.assert_close(model.lm_head(blocks[a]), out, atol=1e-5, rtol=1e-5)


def test_round_mask_shape_and_blocks():
    allowed = round_allowed(past=3, drafts=2, k=2)[0, 0]
    assert allowed.shape == (3 + 2 * 3, 3 + 3 + 2 * 3)  # 3 verification rows, 3 blocks of 2
    assert allowed[:, :3].all()  # the cache
    rows = 3
    assert torch.equal(allowed[:rows, 3 : 3 + rows], torch.ones(3, 3, dtype=torch.bool).tril())
    # block 1 (rows 5, 6): verification rows 0..1 and itself, nothing else
    assert allowed[5, 3:].tolist() == [True, True, False, False, False, True, True, False, False]


def test_the_cache_stays_the_exact_causal_cache(model):
    """After every round the cache holds exactly a fresh causal prefill of all tokens but the last."""
    seq = torch.tensor([1, 300, 400, 500])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(seq[None, :-1], cache=cache, use_cache=True)
        state = _Decoding(model, seq, cache, seq.numel(), 0.0, torch.Generator().manual_seed(0))
        rounds = _one_pass_rounds(state, 3)
        for _ in range(5):
            next(rounds)
            fresh = DynamicCache(config=model.config)
            model(state.seq[None, :-1], cache=fresh, use_cache=True)
            assert cache.get_seq_length() == state.seq.numel() - 1
            for ours, theirs in zip(cache.layers, fresh.layers, strict=True):
                torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)


def test_greedy_equals_causal_greedy_on_200_prompts(model):
    rng = random.Random(0)
    forwards = tokens = 0
    for i in range(200):
        prompt = torch.tensor([1] + [rng.randrange(16, 512) for _ in range(rng.randint(0, 12))])
        new, k = rng.randint(1, 14), (1, 2, 4, 8)[i % 4]
        expected = model.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=None)
        result = speculative_generate(model, prompt, new, k=k, stop_at_eos=False)
        assert result.tokens == expected[0, prompt.numel() :].tolist(), (i, k)
        forwards, tokens = forwards + result.forwards, tokens + len(result.tokens)
    assert forwards <= tokens  # never more passes than tokens


def best(logits: torch.Tensor) -> list[int]:
    """Greedy choices, ``<mask>`` never (as every sampler of ours)."""
    return logits.index_fill(-1, torch.tensor([MASK_ID]), -float("inf")).argmax(-1).tolist()


def reference_one_pass(twin, prompt: list[int], new: int, k: int) -> tuple[list[int], int, int]:
    """A plain greedy loop of the one-pass scheme, without a cache, one pattern per call: verify the
    drafts causally, accept the agreeing ones plus the causal token, then draft from k masks after
    the accepted drafts (the causal token not yet known). Returns (tokens, accepted, passes)."""
    seq, drafts, accepted, passes = list(prompt), [], 0, 0
    while len(seq) - len(prompt) < new:
        n = len(seq)
        causal = best(twin(torch.tensor([seq + drafts])).logits[0, n - 1 :])
        a = 0
        while a < len(drafts) and drafts[a] == causal[a]:
            a += 1
        known = seq + drafts[:a]
        ids = torch.tensor(known + [MASK_ID] * k)
        allowed = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        allowed[len(known) :, :] = True
        mask = twin._mask_for_backend(allowed[None, None])
        drafts = best(twin(ids[None], attention_mask=mask).logits[0, len(known) :])
        seq, accepted, passes = [*known, causal[a]], accepted + a, passes + 1
    return seq[len(prompt) : len(prompt) + new], accepted, passes


def test_the_right_block_drafts_the_next_round(model):
    """Which block becomes the next round's drafts is invisible in the output (any drafts are lossless):
    the accepted counts and passes must equal the plain reference loop's."""
    twin = eager_twin(model)
    rng = random.Random(1)
    with torch.no_grad():
        for i in range(12):
            prompt = [1] + [rng.randrange(16, 512) for _ in range(rng.randint(1, 8))]
            k = (1, 2, 3, 5)[i % 4]
            result = speculative_generate(model, torch.tensor(prompt), 16, k=k, stop_at_eos=False)
            tokens, accepted, passes = reference_one_pass(twin, prompt, 16, k)
            assert (result.tokens, result.accepted, result.forwards) == (tokens, accepted, passes), (i, k)


def test_sampling_keeps_the_causal_distribution_through_rejections():
    """The second token passes the acceptance rule (the first comes from the verifier alone): its
    frequencies over 1,500 seeds match the exact causal marginal sum_x1 p(x1) p(x2 | x1)."""
    model = peaked_tiny_model()
    with torch.no_grad():
        prompt = torch.tensor([1, 300])
        first = torch.softmax(model(prompt[None]).logits[0, -1].float(), -1)
        first[MASK_ID] = 0
        first = first / first.sum()
        pairs = torch.cat([prompt.expand(512, 2), torch.arange(512)[:, None]], 1)
        second = torch.softmax(model(pairs).logits[:, -1].float(), -1)
        second[:, MASK_ID] = 0
        second = second / second.sum(-1, keepdim=True)
        marginal = first @ second
    counts, drafted, accepted = torch.zeros(512), 0, 0
    runs = 1500
    for seed in range(runs):
        result = speculative_generate(model, prompt, 2, k=2, temperature=1.0, seed=seed, stop_at_eos=False)
        counts[result.tokens[1]] += 1
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
    assert 0.05 < accepted / drafted < 0.95  # both the accept and the residual path are exercised
    for token in marginal.topk(4).indices:
        assert counts[token] / runs == pytest.approx(marginal[token].item(), abs=0.04)  # > 3 standard errors


def test_stats_line():
    from dual_lm.inference.speculative import SpeculativeResult

    line = SpeculativeResult(tokens=[5] * 12, drafted=20, accepted=9, forwards=5).stats_line(4)
    assert "tokens per forward: 2.40" in line and "acceptance rate: 45.0% of 20 drafts checked" in line
