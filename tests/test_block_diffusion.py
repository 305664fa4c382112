"""Cached block diffusion (issue 16): the cached sampler against an uncached slow twin (the whole
sequence recomputed at every step under a dense mask, eager attention), the exact causal cache, the
confidence-threshold rule, the stop at </s> and the options. Tiny models in float64, so that no
near-tie in a confidence ranking can flip between two equal computations."""

import copy
import itertools

import pytest
import torch
from transformers import DynamicCache

from dual_lm.config import PRESETS, llama_config
from dual_lm.inference.block_diffusion import block_generate, window_allowed
from dual_lm.inference.diffusion import (
    DiffusionConfig,
    _candidates,
    choose_commits,
    diffusion_generate,
    sample_canvas,
    step_counts,
    steps_per_block,
)
from dual_lm.inference.sampling import cut_at_eos
from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM
from dual_lm.tokens import EOS_ID, MASK_ID
from hostile import refuses
from weights import perturbed

PROMPT = torch.tensor([1, 300, 41, 77])


@pytest.fixture(scope="module")
def model():
    """A tiny random model whose head is scaled up, so confidences spread over (0, 1)."""
    torch.manual_seed(0)
    model = perturbed(DLMLlamaForCausalLM(llama_config(PRESETS["tiny"])), scale=0.05, seed=2).double()
    with torch.no_grad():
        model.lm_head.output.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def twin(model):
    twin = DLMLlamaForCausalLM(llama_config(PRESETS["tiny"], attn_implementation="eager")).double().eval()
    twin.load_state_dict(model.state_dict())
    return twin


def pattern(length: int, window_start: int) -> torch.Tensor:
    """Bool [1, 1, L, L]: rows before ``window_start`` causal, the window's rows see every position."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[window_start:, :] = True
    return allowed[None, None]


def twin_logits(twin, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Logits [stop, V] of ``x[:stop]`` recomputed whole: committed text causal, window s-1 .. e-1 bidirectional."""
    seq = x[:stop]
    return twin(seq[None], attention_mask=twin._mask_for_backend(pattern(stop, start - 1))).logits[0]


@torch.no_grad()
def slow_block_generate(twin, prompt, new_tokens, cfg):
    """The block sampler without a cache: (canvas, forward passes)."""
    p = prompt.numel()
    x = torch.cat([prompt, torch.full((new_tokens,), MASK_ID)])
    generator, forwards, length = torch.Generator().manual_seed(cfg.seed), 0, cfg.block_length or new_tokens
    starts = range(p, p + new_tokens, length)
    for start, steps in zip(starts, steps_per_block(cfg.steps, len(starts)), strict=True):
        stop = min(start + length, p + new_tokens)
        for count in step_counts(stop - start, steps, cfg):
            still = (x[start:stop] == MASK_ID).nonzero().flatten() + start
            if not still.numel():
                break
            token, conf = _candidates(twin_logits(twin, x, start, stop)[still - 1], cfg.temperature, generator)
            chosen = choose_commits(conf, count, cfg, generator)
            x[still[chosen]] = token[chosen]
            forwards += 1
        if cfg.stop_at_eos and bool((x[start:stop] == EOS_ID).any()):
            break
    return x, forwards


TWIN_CASES = {
    "greedy": DiffusionConfig(steps=6, block_length=4, stop_at_eos=False),
    "sampled": DiffusionConfig(steps=7, block_length=4, temperature=0.8, seed=5, stop_at_eos=False),
    "random": DiffusionConfig(steps=5, block_length=3, temperature=0.8, strategy="random", seed=1, stop_at_eos=False),
    "one-block": DiffusionConfig(steps=4, block_length=10, stop_at_eos=False),
    "one-block-sampled": DiffusionConfig(steps=10, block_length=10, temperature=1.0, seed=2, stop_at_eos=False),
    "few-steps": DiffusionConfig(steps=2, block_length=3, stop_at_eos=False),  # fewer steps than blocks
    "threshold": DiffusionConfig(block_length=4, threshold=0.3, stop_at_eos=False),
    "threshold-sampled": DiffusionConfig(block_length=4, threshold=0.2, temperature=0.7, seed=4, stop_at_eos=False),
}


@pytest.mark.parametrize("name", list(TWIN_CASES))
def test_cached_sampler_equals_its_uncached_twin(model, twin, name):
    cfg = TWIN_CASES[name]
    _, result = diffusion_generate(model, PROMPT, 10, cfg)
    expected, forwards = slow_block_generate(twin, PROMPT, 10, cfg)
    assert result.tokens.tolist() == expected.tolist()
    assert result.forwards == forwards and not (result.tokens == MASK_ID).any()
    assert result.passes_per_token == pytest.approx(forwards / 10)


def test_fixed_steps_follow_the_schedule_and_one_pass_per_step(model):
    cfg = DiffusionConfig(steps=6, block_length=4, stop_at_eos=False)  # blocks of 4, 4, 2: two steps each
    _, result = diffusion_generate(model, PROMPT, 10, cfg, trace=True)
    masked = [10] + [int((t == MASK_ID).sum()) for t in result.trace]
    assert [a - b for a, b in itertools.pairwise(masked)] == [2, 2, 2, 2, 1, 1]
    assert result.forwards == len(result.trace) == 6 and result.passes_per_token == pytest.approx(0.6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_one_block_over_a_bare_bos_prompt_is_the_whole_canvas_sampler(model, temperature, strategy):
    """With only <s> before the canvas nothing is cached and the one window is the whole canvas,
    fully bidirectional: the same computation as ``sample_canvas``."""
    prompt = torch.tensor([1])
    cfg = DiffusionConfig(steps=5, temperature=temperature, strategy=strategy, seed=3, stop_at_eos=False)
    today = sample_canvas(model, torch.cat([prompt, torch.full((9,), MASK_ID)]), cfg)
    _, cached = diffusion_generate(model, prompt, 9, DiffusionConfig(**{**cfg.__dict__, "block_length": 9}))
    assert cached.tokens.tolist() == today.tokens.tolist() and cached.forwards == today.forwards == 5


def test_the_cache_after_each_block_is_a_fresh_causal_prefill(model):
    """Runs of 1, 2 and 3 blocks (two steps each): a later block never changes an earlier one, and
    the cache holds the causal keys and values of every committed token but the last."""
    canvases = []
    for blocks in (1, 2, 3):
        cache = DynamicCache(config=model.config)
        cfg = DiffusionConfig(steps=2 * blocks, block_length=4, temperature=0.9, seed=7, stop_at_eos=False)
        result = block_generate(model, PROMPT, 4 * blocks, cfg, cache=cache)
        canvases.append(result.tokens)
        committed = PROMPT.numel() + 4 * (blocks - 1) - 1  # the last block's window starts at its last token
        assert cache.get_seq_length() == committed
        fresh = DynamicCache(config=model.config)
        with torch.no_grad():
            model(result.tokens[None, :committed], cache=fresh, use_cache=True)
        for ours, theirs in zip(cache.layers, fresh.layers, strict=True):
            torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(ours.values, theirs.values, atol=1e-10, rtol=1e-10)
    assert canvases[1][: canvases[0].numel()].tolist() == canvases[0].tolist()
    assert canvases[2][: canvases[1].numel()].tolist() == canvases[1].tolist()


def test_window_mask_writes_causal_rows_and_a_bidirectional_window():
    allowed = window_allowed(written=2, pending=2, width=3)[0, 0]
    assert allowed.shape == (5, 7)
    assert allowed[:2].tolist() == [[True, True, True, False, False, False, False], [True] * 4 + [False] * 3]
    assert allowed[2:].all()


@pytest.mark.parametrize("sampler", ["cached", "whole-canvas"])
def test_threshold_commits_what_passes_it_and_at_least_one(model, twin, sampler):
    """Replays each greedy step: the committed slots are exactly those whose confidence exceeds the
    threshold, or the most confident one when none does."""
    threshold, n = 0.3, 10
    cfg = DiffusionConfig(block_length=4 if sampler == "cached" else None, threshold=threshold, stop_at_eos=False)
    _, result = diffusion_generate(model, PROMPT, n, cfg, trace=True)
    p, before = PROMPT.numel(), torch.cat([PROMPT, torch.full((n,), MASK_ID)])
    for after in result.trace:
        still = (before == MASK_ID).nonzero().flatten()
        if sampler == "cached":
            start = int(still[0])
            stop = min(p + (start - p) // 4 * 4 + 4, p + n)
            still = still[still < stop]
            logits = twin_logits(twin, before, start, stop)
        else:
            logits = twin(before[None], attention_mode="bidirectional").logits[0]
        token, conf = _candidates(logits[still - 1], 0.0, None)
        expected = still[conf > threshold] if (conf > threshold).any() else still[conf.argmax()][None]
        changed = (after != before).nonzero().flatten()
        assert changed.tolist() == sorted(expected.tolist()) and len(changed) >= 1
        assert after[changed].tolist() == token[torch.isin(still, changed)].tolist()
        before = after
    assert not (before == MASK_ID).any()


@pytest.mark.parametrize("block_length", [4, None])
def test_a_lower_threshold_finishes_in_fewer_passes(model, block_length):
    passes = {}
    for threshold in (1.0, 0.2, 1e-9):
        cfg = DiffusionConfig(block_length=block_length, threshold=threshold, stop_at_eos=False)
        _, result = diffusion_generate(model, PROMPT, 12, cfg)
        passes[threshold] = result.forwards
        assert not (result.tokens == MASK_ID).any()
    blocks = 3 if block_length else 1
    assert passes[1.0] == 12 and passes[0.2] < 12 and passes[1e-9] == blocks, passes


def test_stops_after_the_block_holding_eos_with_the_same_output(model):
    model = copy.deepcopy(model)
    cfg = DiffusionConfig(steps=12, block_length=4)
    with torch.no_grad():  # raise </s> until the second block holds it
        for _ in range(60):
            kept, full = diffusion_generate(
                model, PROMPT, 12, DiffusionConfig(**{**cfg.__dict__, "stop_at_eos": False})
            )
            if EOS_ID in kept[4:8] and EOS_ID not in kept[:4]:
                break
            model.lm_head.output.bias[EOS_ID] += 0.25
    assert EOS_ID in kept[4:8] and EOS_ID not in kept[:4], kept
    new, result = diffusion_generate(model, PROMPT, 12, cfg)
    assert new == cut_at_eos(kept) and len(new) < 8
    assert result.forwards == 8 < full.forwards == 12  # the third block never ran
    assert (result.tokens[PROMPT.numel() + 8 :] == MASK_ID).all() and result.committed == 8


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"threshold": 0.0}, r"threshold must be a number in \(0, 1\]"),
        ({"threshold": -0.5}, r"threshold must be a number in \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold must be a number in \(0, 1\]"),
        ({"threshold": float("nan")}, r"threshold must be a number in \(0, 1\]"),
        ({"threshold": True}, r"threshold must be a number"),
        ({"threshold": "0.5"}, r"threshold must be a number"),
        ({"threshold": 0.5, "strategy": "random"}, r"use strategy 'confidence'"),
        ({"block_length": 0}, r"block_length must be >= 1"),
        ({"block_length": -2}, r"block_length must be >= 1"),
        ({"block_length": 2.5}, r"block_length must be >= 1"),
        ({"block_length": 9}, r"block_length \(9\) must be <= max_new_tokens \(8\)"),
        ({"cache": "dual"}, r"unknown cache 'dual'"),
    ],
)
def test_bad_options_are_refused(model, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        diffusion_generate(model, PROMPT, 8, DiffusionConfig(**options))


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--block-length", "0"], r"--block-length: must be >= 1, got 0"),
        (["--block-length", "-4"], r"--block-length: must be >= 1, got -4"),
        (["--block-length", "51"], r"--block-length \(51\) must be <= --max-new-tokens \(50\)"),
        (["--threshold", "0"], r"--threshold: must be a finite number in \(0, 1\], got 0"),
        (["--threshold", "-0.1"], r"--threshold: must be a finite number in \(0, 1\]"),
        (["--threshold", "1.01"], r"--threshold: must be a finite number in \(0, 1\]"),
        (["--threshold", "nan"], r"--threshold: must be a finite number in \(0, 1\], got nan"),
        (["--threshold", "0.5", "--strategy", "random"], r"--threshold commits by confidence"),
        (["--cache", "bidirectional"], r"--cache: invalid choice"),
    ],
)
def test_bad_diffusion_flags_exit_2_before_the_model_loads(tmp_path, argv, pattern):
    refuses(
        ["generate", "no-such-folder", "--prompt", "hi", "--mode", "diffusion", *argv], "generate", pattern, tmp_path
    )


def test_whole_canvas_sampler_without_blocks_is_unchanged_by_the_cache_option(model):
    cfg = DiffusionConfig(steps=4, stop_at_eos=False)
    a, ra = diffusion_generate(model, PROMPT, 8, cfg)
    b, rb = diffusion_generate(model, PROMPT, 8, DiffusionConfig(steps=4, cache="none", stop_at_eos=False))
    assert a == b and ra.forwards == rb.forwards == 4
    uncached = DiffusionConfig(steps=4, block_length=4, cache="none", stop_at_eos=False)
    canvas = torch.cat([PROMPT, torch.full((8,), MASK_ID)])
    assert (
        diffusion_generate(model, PROMPT, 8, uncached)[1].tokens.tolist()
        == sample_canvas(model, canvas, uncached).tokens.tolist()
    )


def test_generate_text_takes_the_new_options(tokenizer_51200):
    import dataclasses

    from transformers import PreTrainedTokenizerFast

    from dual_lm.inference.generation import generate_text
    from dual_lm.tokenizer import load_tokenizer_file
    from dual_lm.tokens import ROLE_TOKENS

    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200))).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer_file(tokenizer_51200), **ROLE_TOKENS)
    for options in ({"block_length": 3, "threshold": 0.5}, {"block_length": 3, "steps": 2, "cache": "none"}):
        assert isinstance(generate_text(model, tokenizer, "Hello", "diffusion", 6, **options), str)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--mode", "causal", "--k", "3"], r"--k applies only to --mode speculative, not causal"),
        (["--mode", "prefix", "--draft", "full"], r"--draft applies only to --mode speculative"),
        (["--mode", "speculative", "--steps", "4"], r"--steps applies only to --mode diffusion, not speculative"),
        (["--mode", "causal", "--threshold", "0.5"], r"--threshold applies only to --mode diffusion"),
        (["--mode", "diffusion", "--cache", "none"], r"--cache applies only to block decoding"),
    ],
)
def test_options_of_another_mode_are_refused(tmp_path, argv, pattern):
    from hostile import refuses

    refuses(["generate", "no-such-folder", "--prompt", "hi", *argv], "generate", pattern, tmp_path)
