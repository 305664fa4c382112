"""Likelihood scoring: batched equals one request at a time; masked equals an explicit per-token loop."""

import math

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import PRESETS, llama_config
from dual_lm.inference.scoring import masked_rows, score_requests
from dual_lm.tokens import MASK_ID
from weights import perturbed

REQUESTS = [
    ([1, 20, 30, 40], [50, 60]),
    ([1, 21], [31, 41, 51, 61, 71]),
    ([1, 22, 32, 42, 52, 62], [72]),
    ([1, 23], [33]),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DLMLlamaForCausalLM(llama_config(PRESETS["tiny"])).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("mode", ["causal", "prefix", "masked"])
def test_batched_equals_one_at_a_time(model, mode):
    batched = score_requests(model, REQUESTS, mode, n=2, batch_size=3)
    for request, got in zip(REQUESTS, batched, strict=True):
        alone = score_requests(model, [request], mode, n=2, batch_size=1)[0]
        assert got.logprob == pytest.approx(alone.logprob, abs=1e-4) and got.tokens == len(request[1])


def test_causal_and_prefix_against_direct_computation(model):
    context, continuation = REQUESTS[0]
    ids = torch.tensor([context + continuation])
    for mode, extra in (("causal", {}), ("prefix", {"prefix_lengths": torch.tensor([len(context)])})):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, **extra).logits[0].float(), -1)
        expected = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
        assert score_requests(model, [REQUESTS[0]], mode)[0].logprob == pytest.approx(expected, abs=1e-5)
    assert score_requests(model, [REQUESTS[0]], "prefix")[0].logprob != pytest.approx(
        score_requests(model, [REQUESTS[0]], "causal")[0].logprob, abs=1e-6
    )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_masked_equals_an_explicit_loop(model, n):
    context, continuation = REQUESTS[1]
    expected = 0.0
    for i, token in enumerate(continuation):
        ids = torch.tensor(context + continuation)
        j = len(context) + i
        ids[j : j + n] = MASK_ID
        with torch.no_grad():
            logits = model(ids[None], attention_mode="bidirectional").logits[0, j - 1]
        expected += torch.log_softmax(logits.float(), -1)[token].item()
    assert score_requests(model, [REQUESTS[1]], "masked", n=n)[0].logprob == pytest.approx(expected, abs=1e-4)
    assert all(len(ids) == len(context) + len(continuation) for ids, _, _ in masked_rows(context, continuation, n))


def test_bad_requests(model):
    with pytest.raises(ValueError, match="unknown scoring mode"):
        score_requests(model, REQUESTS, "sideways")
    with pytest.raises(ValueError, match="must both be non-empty"):
        score_requests(model, [([1], [])])
    with pytest.raises(ValueError, match="exceed the context"):
        score_requests(model, [([1] * 3000, [2])])


def test_split_pair_and_cli(tokenizer_51200, tmp_path, capsys):
    import dataclasses
    import json

    from dual_lm.cli import main
    from dual_lm.folder import save_folder
    from dual_lm.inference.scoring import split_pair

    torch.manual_seed(0)
    folder = save_folder(
        perturbed(DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200)))),
        tmp_path / "m",
        tokenizer_51200,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ctx, cont = split_pair(tokenizer, "The capital of France", " is Paris")
    assert ctx == tokenizer("The capital of France")["input_ids"] and tokenizer.decode(cont) == "is Paris"
    assert len(cont) == 2  # " is", " Paris": the leading space stays with the word
    file = tmp_path / "r.jsonl"
    file.write_text(json.dumps({"context": "a b", "continuation": " c"}) + "\n")
    assert main(["score", str(folder), str(file), "--mode", "masked", "--mask-n", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens"] == 1
    file.write_text("not json\n")
    assert main(["score", str(folder), str(file)]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_rolling_windows_cover_every_token_once():
    from dual_lm.inference.scoring import rolling_windows

    for length, window, stride in [(10, 4, 2), (10, 4, 3), (3, 8, 4), (17, 5, 1)]:
        spans = rolling_windows(length, window, stride)
        scored = [t for _, first, end in spans for t in range(first, end)]
        assert scored == list(range(1, length))
        assert all(
            end - start <= window and first - start >= min(first, window - stride) for start, first, end in spans
        )
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(10, 4, 4)


def test_text_scores_equal_a_full_pass_and_an_explicit_window_loop(model):
    from dual_lm.inference.scoring import score_texts

    torch.manual_seed(1)
    texts = [[1, *torch.randint(16, 500, (n,)).tolist()] for n in (30, 9)]
    with torch.no_grad():
        full = [torch.log_softmax(model(torch.tensor([t])).logits[0].float(), -1) for t in texts]
    exact = [sum(lp[i - 1, t[i]].item() for i in range(1, len(t))) for lp, t in zip(full, texts, strict=True)]
    got = score_texts(model, texts, batch_size=2)
    assert [g.logprob for g in got] == pytest.approx(exact, abs=1e-4) and [g.tokens for g in got] == [30, 9]
    assert got[0].perplexity == pytest.approx(math.exp(-exact[0] / 30))
    windowed = score_texts(model, texts, window=8, stride=3)[0]
    text, expected = texts[0], 0.0
    for i in range(1, len(text)):  # token i sees the window the rule gives it: at most 8 tokens ending at its chunk
        end = 8 if i < 8 else min(len(text), 8 + 3 * ((i - 8) // 3 + 1))
        start = max(0, end - 8)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([text[start:end]])).logits[0].float(), -1)
        expected += lp[i - 1 - start, text[i]].item()
    assert windowed.logprob == pytest.approx(expected, abs=1e-4)
    assert windowed.logprob != pytest.approx(exact[0], abs=1e-3)  # shorter context really changes the score


def _exact_bound(model, context, continuation):
    """E over k ~ U{1..L} and a uniform k-subset of (L/k) x sum of masked log p, by enumeration."""
    from itertools import combinations

    length, total = len(continuation), 0.0
    for k in range(1, length + 1):
        subsets = list(combinations(range(length), k))
        for subset in subsets:
            ids = list(context) + list(continuation)
            for i in subset:
                ids[len(context) + i] = MASK_ID
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids]), attention_mode="bidirectional").logits[0].float(), -1)
            value = sum(lp[len(context) + i - 1, continuation[i]].item() for i in subset) * length / k
            total += value / (length * len(subsets))
    return total


def test_md_bound_is_unbiased_for_the_enumerated_bound(model):
    from dual_lm.inference.scoring import md_bound

    context, continuation = REQUESTS[0][0], [50, 60, 70]
    single = md_bound(model, [(context, [50])], samples=4)[0]
    masked = score_requests(model, [(context, [50])], "masked", n=1)[0].logprob
    assert single.logprob == pytest.approx(masked, abs=1e-4) and single.stderr == pytest.approx(0, abs=1e-9)
    estimate = md_bound(model, [(context, continuation), REQUESTS[1]], samples=400, seed=1, batch_size=64)[0]
    exact = _exact_bound(model, context, continuation)
    assert abs(estimate.logprob - exact) < 4 * estimate.stderr and estimate.stderr > 0
    assert md_bound(model, [(context, continuation)], samples=8, seed=3) == md_bound(
        model, [(context, continuation)], samples=8, seed=3
    )
    with pytest.raises(ValueError, match="samples must be >= 2"):
        md_bound(model, [(context, continuation)], samples=1)


def test_cli_scores_texts_and_the_md_bound(tokenizer_51200, tmp_path, capsys):
    import dataclasses
    import json

    from dual_lm.cli import main
    from dual_lm.folder import save_folder

    folder = save_folder(
        perturbed(
            DLMLlamaForCausalLM(
                llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200, max_position_embeddings=64))
            )
        ),
        tmp_path / "m",
        tokenizer_51200,
    )
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"text": " ".join(["word"] * 150)}) + "\n" + json.dumps({"text": "a short one"}) + "\n")
    assert main(["score", str(folder), str(texts), "--window", "32", "--stride", "8"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["tokens"] == 150 and rows[1]["perplexity"] > 1 and "perplexity" in err
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"context": "a b", "continuation": " c d e"}) + "\n")
    assert main(["score", str(folder), str(pairs), "--mode", "md-bound", "--samples", "4"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["stderr"] >= 0 and "an upper bound" in err
    assert main(["score", str(folder), str(texts), "--mode", "masked"]) == 2  # 150 tokens exceed the context of 64
    assert "only --mode causal scores long texts" in capsys.readouterr().err
    assert main(["score", str(folder), str(pairs), "--window", "16"]) == 2
    assert "--window and --stride apply to 'text' records in causal mode only" in capsys.readouterr().err
    pairs.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"context": "a", "continuation": " b"}) + "\n")
    assert main(["score", str(folder), str(pairs)]) == 2
    assert "mixes 'text' records" in capsys.readouterr().err
