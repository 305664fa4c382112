"""Masked fill and diffusion sampling on a small random model with a real tokenizer."""

import dataclasses

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import MASK_ID, PRESETS, llama_config
from dual_lm.diffusion import DiffusionConfig, commit_counts, diffusion_generate, infill, sample_canvas
from dual_lm.generation import encode_with_masks, fill_masks, generate_text


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer_51200):
    from transformers import PreTrainedTokenizerFast

    from dual_lm.tokenizer import ROLE_TOKENS, load_tokenizer_file

    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer_file(tokenizer_51200), **ROLE_TOKENS)
    return model, tokenizer


def test_commit_counts_cover_every_position():
    assert commit_counts(10, 4) == [3, 3, 2, 2]
    assert commit_counts(3, 8) == [1, 1, 1]


@pytest.mark.parametrize("strategy", ["confidence", "random"])
@pytest.mark.parametrize("block_length", [None, 4])
def test_diffusion_keeps_the_prompt_fills_everything_and_is_deterministic(model_and_tokenizer, strategy, block_length):
    model, _ = model_and_tokenizer
    prompt = torch.tensor([1, 300, 400, 500])
    cfg = DiffusionConfig(steps=5, temperature=0.7, strategy=strategy, block_length=block_length, seed=3)
    canvas = torch.cat([prompt, torch.full((10,), MASK_ID)])
    first = sample_canvas(model, canvas, cfg, trace=True)
    again = sample_canvas(model, canvas, cfg)
    assert torch.equal(first.tokens[:4], prompt)
    assert not (first.tokens == MASK_ID).any()
    assert torch.equal(first.tokens, again.tokens)
    assert len(first.trace) >= 5 and all(torch.equal(t[:4], prompt) for t in first.trace)
    masked_counts = [int((t == MASK_ID).sum()) for t in first.trace]
    assert masked_counts == sorted(masked_counts, reverse=True) and masked_counts[-1] == 0


def test_greedy_confidence_commits_the_argmax_read_at_the_previous_position(model_and_tokenizer):
    model, _ = model_and_tokenizer
    canvas = torch.tensor([1, 300, 400, MASK_ID])
    out = sample_canvas(model, canvas, DiffusionConfig(steps=1)).tokens
    logits = model(canvas[None], attention_mode="bidirectional").logits[0, 2].clone()
    logits[MASK_ID] = -float("inf")
    assert out[3].item() == logits.argmax().item()


def test_infill_keeps_both_sides_and_picks_a_length(model_and_tokenizer):
    model, _ = model_and_tokenizer
    before, after = torch.tensor([1, 300, 301]), torch.tensor([302, 303])
    span, length, score = infill(model, before, after, [1, 2, 3], DiffusionConfig(steps=3))
    assert length in (1, 2, 3) and len(span) == length and MASK_ID not in span and score < 0


def test_diffusion_generate_cuts_at_eos_and_checks_the_context(model_and_tokenizer):
    model, _ = model_and_tokenizer
    new, _ = diffusion_generate(model, torch.tensor([1, 300]), 6, DiffusionConfig(steps=6))
    assert len(new) <= 6 and 2 not in new
    with pytest.raises(ValueError, match="exceed the context"):
        diffusion_generate(model, torch.tensor([1, 300]), 5000, DiffusionConfig())
    with pytest.raises(ValueError, match="unknown strategy"):
        diffusion_generate(model, torch.tensor([1, 300]), 4, DiffusionConfig(strategy="best"))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        diffusion_generate(model, torch.tensor([1, 300]), 4, DiffusionConfig(steps=0))


def test_fill_reads_each_mask_at_the_previous_position(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = encode_with_masks(tokenizer, "The capital of <mask> is <mask> Paris")
    assert ids[0] == 1 and (ids == MASK_ID).sum() == 2
    assert tokenizer.decode(ids[ids != MASK_ID][1:]) == "The capital of is Paris"
    results = fill_masks(model, tokenizer, "The capital of <mask> is <mask> Paris", top_k=3)
    logits = model(ids[None], attention_mode="bidirectional").logits[0]
    for result in results:
        expected = torch.softmax(logits[result.position - 1], -1).max().item()
        assert result.candidates[0][1] == pytest.approx(expected, rel=1e-5) and len(result.candidates) == 3
    with pytest.raises(ValueError, match="has no <mask>"):
        fill_masks(model, tokenizer, "nothing to fill")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        fill_masks(model, tokenizer, "a <mask>", top_k=0)


def test_generate_text_modes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    causal = generate_text(model, tokenizer, "Hello there", "causal", 5, do_sample=False)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :]
    assert causal == tokenizer.decode(expected, skip_special_tokens=True)
    prefix = generate_text(model, tokenizer, "Hello there", "prefix", 5, do_sample=False)
    seq = ids
    for _ in range(5):
        nxt = model(seq, prefix_lengths=torch.tensor([ids.shape[1]])).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert prefix == tokenizer.decode(seq[0, ids.shape[1] :], skip_special_tokens=True)
    assert isinstance(generate_text(model, tokenizer, "Hello", "diffusion", 4, steps=2), str)
    text, rate = generate_text(model, tokenizer, "Hello there", "speculative", 5, k=3, stop_at_eos=False)
    assert text == causal and 0 <= rate <= 1
    with pytest.raises(ValueError, match="unknown mode"):
        generate_text(model, tokenizer, "Hello", "sideways")
    with pytest.raises(ValueError, match="exceed the context"):
        generate_text(model, tokenizer, "Hello", "causal", 100_000)


def test_cli_fill_needs_a_tokenizer(converted, capsys):
    from dual_lm.cli import main

    assert main(["fill", str(converted), "--text", "a <mask>"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_speculative_greedy_equals_causal_greedy(model_and_tokenizer):
    from dual_lm.speculative import speculative_generate

    model, _ = model_and_tokenizer
    prompt = torch.tensor([1, 300, 400, 500])
    expected = model.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 4:].tolist()
    for k in (1, 3, 5):
        result = speculative_generate(model, prompt, 12, k=k, stop_at_eos=False)
        assert result.tokens == expected, k
        assert 0.0 <= result.acceptance_rate <= 1.0 and result.drafted >= 12 // (k + 1)


def test_speculative_sampling_has_the_causal_distribution():
    from dual_lm.speculative import speculative_generate

    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(PRESETS["tiny"])).eval()
    with torch.no_grad():  # peaked, and different in the two modes, so rejections happen
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.output.weight.mul_(30)
        prompt = torch.tensor([1, 300])
        p = torch.softmax(model(prompt[None]).logits[0, -1].float(), -1)
        p[MASK_ID] = 0
        p = p / p.sum()
    assert p.max() > 0.3
    counts, drafted, accepted = torch.zeros_like(p), 0, 0
    for seed in range(2000):
        result = speculative_generate(model, prompt, 1, k=2, temperature=1.0, seed=seed, stop_at_eos=False)
        counts[result.tokens[0]] += 1
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
    assert 0.05 < accepted / drafted < 0.95  # both the accept and the residual path are exercised
    for token in p.topk(3).indices:
        assert counts[token] / 2000 == pytest.approx(p[token].item(), abs=0.035)
    with pytest.raises(ValueError, match="k \\(drafted tokens per round\\)"):
        speculative_generate(model, prompt, 4, k=0)
