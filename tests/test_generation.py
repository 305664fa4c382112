"""Masked fill and diffusion sampling on a small random model with a real tokenizer."""

import copy
import dataclasses
import re

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import PRESETS, llama_config
from dual_lm.inference.diffusion import DiffusionConfig, commit_counts, diffusion_generate, infill, sample_canvas
from dual_lm.inference.generation import (
    TextPrinter,
    continuation_text,
    encode_with_masks,
    fill_masks,
    generate_batch,
    generate_text,
)
from dual_lm.inference.sampling import cut_at_eos
from dual_lm.tokens import MASK_ID
from weights import peaked_tiny_model, perturbed


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer_51200):
    from transformers import PreTrainedTokenizerFast

    from dual_lm.tokenizer import load_tokenizer_file
    from dual_lm.tokens import ROLE_TOKENS

    torch.manual_seed(0)
    model = perturbed(DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200))), 0.05)
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


def test_infill_picks_the_length_whose_span_scores_best(model_and_tokenizer):
    """Against a plain loop: each candidate canvas filled, its span scored by mean log-probability read at i-1."""
    model, _ = model_and_tokenizer
    before, after = torch.tensor([1, 300, 301]), torch.tensor([302, 303])
    cfg = DiffusionConfig(steps=3)
    span, length, score = infill(model, before, after, [1, 2, 3], cfg)
    by_hand = {}
    for n in (1, 2, 3):
        filled = sample_canvas(model, torch.cat([before, torch.full((n,), MASK_ID), after]), cfg).tokens
        assert torch.equal(filled[:3], before) and torch.equal(filled[3 + n :], after)
        with torch.no_grad():
            logp = model(filled[None], attention_mode="bidirectional").logits[0].log_softmax(-1)
        by_hand[n] = (filled[3 : 3 + n].tolist(), sum(logp[2 + j, filled[3 + j]].item() for j in range(n)) / n)
    best = max(by_hand, key=lambda n: by_hand[n][1])
    assert (span, length) == (by_hand[best][0], best) and score == pytest.approx(by_hand[best][1], abs=1e-6)
    assert MASK_ID not in span and len({round(v[1], 6) for v in by_hand.values()}) == 3  # a real choice
    assert infill(model, before, after, 2, cfg)[:2] == (by_hand[2][0], 2)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7, 2]) == [5, 6] and cut_at_eos([5, 6]) == [5, 6] and cut_at_eos([2, 5]) == []


def test_diffusion_generate_cuts_at_eos_and_checks_the_context(model_and_tokenizer):
    model, _ = model_and_tokenizer
    model = copy.deepcopy(model)
    prompt = torch.tensor([1, 300])
    with torch.no_grad():  # raise </s> until a canvas holds it after some other tokens
        for _ in range(40):
            canvas = sample_canvas(model, torch.cat([prompt, torch.full((6,), MASK_ID)]), DiffusionConfig(steps=6))
            full = canvas.tokens[2:].tolist()
            if 2 in full[1:] and full[0] != 2:
                break
            model.lm_head.output.bias[2] += 0.5
    assert 2 in full[1:] and full[0] != 2, full
    new, _ = diffusion_generate(model, prompt, 6, DiffusionConfig(steps=6))
    assert new == full[: full.index(2)]
    kept, _ = diffusion_generate(model, prompt, 6, DiffusionConfig(steps=6, stop_at_eos=False))
    assert kept == full
    with pytest.raises(ValueError, match="exceed the context"):
        diffusion_generate(model, prompt, 5000, DiffusionConfig())
    with pytest.raises(ValueError, match="unknown strategy"):
        diffusion_generate(model, prompt, 4, DiffusionConfig(strategy="best"))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        diffusion_generate(model, prompt, 4, DiffusionConfig(steps=0))


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
    assert causal == continuation_text(tokenizer, ids[0].tolist(), expected.tolist())
    assert causal and (causal.startswith(" ") or causal[0] in ",.;:!?'")  # the space before the next word survives
    prefix = generate_text(model, tokenizer, "Hello there", "prefix", 5, do_sample=False)
    seq = ids
    for _ in range(5):
        nxt = model(seq, prefix_lengths=torch.tensor([ids.shape[1]])).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert prefix == continuation_text(tokenizer, ids[0].tolist(), seq[0, ids.shape[1] :].tolist())
    assert isinstance(generate_text(model, tokenizer, "Hello", "diffusion", 4, steps=2), str)
    text, result = generate_text(model, tokenizer, "Hello there", "speculative", 5, k=3, stop_at_eos=False)
    assert text == causal and 0 <= result.acceptance_rate <= 1 and result.forwards >= 1
    with pytest.raises(ValueError, match="unknown mode"):
        generate_text(model, tokenizer, "Hello", "sideways")
    with pytest.raises(ValueError, match="exceed the context"):
        generate_text(model, tokenizer, "Hello", "causal", 100_000)


def test_cli_fill_needs_a_tokenizer(converted, capsys):
    from dual_lm.cli import main

    assert main(["fill", str(converted), "--text", "a <mask>"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_speculative_greedy_equals_causal_greedy(model_and_tokenizer):
    from dual_lm.inference.speculative import speculative_generate

    model, _ = model_and_tokenizer
    prompt = torch.tensor([1, 300, 400, 500])
    expected = model.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 4:].tolist()
    for k, draft in ((1, "cached"), (3, "cached"), (5, "cached"), (3, "full"), (1, "one-pass"), (4, "one-pass")):
        result = speculative_generate(model, prompt, 12, k=k, stop_at_eos=False, draft=draft)
        assert result.tokens == expected, (k, draft)
        assert 0.0 <= result.acceptance_rate <= 1.0 and result.drafted >= 12 // (k + 1)


def test_speculative_sampling_has_the_causal_distribution():
    from dual_lm.inference.speculative import speculative_generate

    model = peaked_tiny_model()
    with torch.no_grad():
        prompt = torch.tensor([1, 300])
        p = torch.softmax(model(prompt[None]).logits[0, -1].float(), -1)
        p[MASK_ID] = 0
        p = p / p.sum()
    assert p.max() > 0.3
    counts, drafted, accepted = torch.zeros_like(p), 0, 0
    for seed in range(1200):  # half with each draft: the rule is exact for any draft distribution
        draft = ("cached", "full")[seed % 2]
        result = speculative_generate(model, prompt, 1, k=2, temperature=1.0, seed=seed, stop_at_eos=False, draft=draft)
        counts[result.tokens[0]] += 1
        drafted, accepted = drafted + result.drafted, accepted + result.accepted
    assert 0.05 < accepted / drafted < 0.95  # both the accept and the residual path are exercised
    for token in p.topk(3).indices:
        assert counts[token] / 1200 == pytest.approx(p[token].item(), abs=0.045)  # > 3 standard errors
    with pytest.raises(ValueError, match="unknown draft"):
        speculative_generate(model, prompt, 4, draft="psychic")
    with pytest.raises(ValueError, match="k \\(drafted tokens per round\\)"):
        speculative_generate(model, prompt, 4, k=0)


def test_continuation_text_keeps_the_space_the_decoder_strips(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompt, whole = tokenizer("Hello there")["input_ids"], tokenizer("Hello there friend")["input_ids"]
    new = whole[len(prompt) :]
    assert tokenizer.decode(new) == "friend" and continuation_text(tokenizer, prompt, new) == " friend"


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_batched_generation_equals_one_prompt_at_a_time(model_and_tokenizer, mode):
    model, tokenizer = model_and_tokenizer
    prompts = ["Hello there", "A much longer prompt that needs left padding", "Once", "The king said"]
    batched = generate_batch(model, tokenizer, prompts, mode, 6, batch_size=3, do_sample=False)
    alone = [generate_text(model, tokenizer, p, mode, 6, do_sample=False) for p in prompts]
    assert batched == alone
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    via_flag = model.generate(ids, max_new_tokens=4, do_sample=False, prefix_attention=True)
    via_lengths = model.generate(ids, max_new_tokens=4, do_sample=False, prefix_lengths=torch.tensor([ids.shape[1]]))
    assert torch.equal(via_flag, via_lengths)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_batch(model, tokenizer, prompts, mode, 6, batch_size=0)


@pytest.mark.parametrize("mode", ["causal", "prefix", "speculative"])
def test_streamed_text_equals_the_returned_text(model_and_tokenizer, mode):
    model, tokenizer = model_and_tokenizer
    pieces = []
    options = {"k": 3, "stop_at_eos": False} if mode == "speculative" else {"do_sample": False}
    out = generate_text(
        model, tokenizer, "Hello there", mode, 9, streamer=TextPrinter(tokenizer, pieces.append), **options
    )
    text = out[0] if mode == "speculative" else out
    assert len(pieces) > 2 and "".join(pieces) == text + "\n"
    pieces.clear()
    bad = {"k": 0} if mode == "speculative" else {}
    with pytest.raises(ValueError):
        generate_text(
            model, tokenizer, "Hello", mode, 100_000 if not bad else 4, TextPrinter(tokenizer, pieces.append), **bad
        )
    assert pieces == []  # a bad option fails before anything is written


def test_cli_generate_streams_one_prompt_and_batches_a_file(tokenizer_51200, tmp_path, capsys):
    import json

    from dual_lm.cli import main
    from dual_lm.folder import save_folder

    torch.manual_seed(0)
    model = perturbed(DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200))))
    folder = str(save_folder(model, tmp_path / "m", tokenizer_51200))
    assert main(["generate", folder, "--prompt", "Hello there", "--max-new-tokens", "5"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("Hello there") and streamed.endswith("\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nOnce upon a time\n\nThe king\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", folder, "--prompts", str(prompts), "--max-new-tokens", "5", "--mode", "prefix"]
    assert main([*args, "--output", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello there", "Once upon a time", "The king"]
    assert main(["generate", folder, "--prompt", "Hello there", "--max-new-tokens", "5", "--mode", "prefix"]) == 0
    assert capsys.readouterr().out == "Hello there" + rows[0]["text"] + "\n"
    speculative = ["generate", folder, "--prompt", "Hello there", "--max-new-tokens", "5", "--mode", "speculative"]
    assert main([*speculative, "--k", "2"]) == 0
    captured = capsys.readouterr()
    causal_line = main(["generate", folder, "--prompt", "Hello there", "--max-new-tokens", "5"]) == 0
    assert causal_line and capsys.readouterr().out == captured.out  # greedy: the causal text
    stats = re.search(r"^\[speculative: tokens per forward: (\d\.\d\d) \((\d+) tokens in (\d+) passes\), "
                         r"acceptance rate: [\d.]+% of \d+ drafts checked, k=2\]$", captured.err, re.M)  # fmt: skip
    assert stats and float(stats[1]) == pytest.approx(int(stats[2]) / int(stats[3]), abs=0.005)
    sampled = ["generate", folder, "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0.8", "--top-k", "5"]
    assert main(sampled) == 0
    capsys.readouterr()
    assert main([*sampled[:-1], "-1"]) == 2
    assert "argument --top-k: must be >= 0, got -1" in capsys.readouterr().err
    assert main(["generate", folder]) == 2
    assert "exactly one of --prompt TEXT or --prompts FILE" in capsys.readouterr().err
    assert main(["generate", folder, "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_accept_drafts_gives_every_position_the_target_distribution():
    """With fixed p and q, the token at position j (when the round reaches it) is distributed as p_j:
    accepted drafts and residual samples at j = 0 and j > 0, and the bonus token after k drafts."""
    from dual_lm.inference.speculative import accept_drafts

    torch.manual_seed(0)
    k, vocab, trials = 2, 5, 20000
    p = torch.softmax(torch.randn(k + 1, vocab) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab) * 1.5, -1)
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(k + 1, vocab)
    for _ in range(trials):
        drafts = torch.multinomial(q, 1, generator=generator).squeeze(1)
        for j, token in enumerate(accept_drafts(p, q, drafts, generator)):
            counts[j, token] += 1
    reached = counts.sum(1)
    assert reached[0] == trials and reached[2] > 1000  # the bonus position is exercised
    for j in range(k + 1):
        assert torch.allclose(counts[j] / reached[j], p[j], atol=4 / reached[j].sqrt())
