"""Likelihood scoring: batched equals one request at a time; masked equals an explicit per-token loop."""

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import MASK_ID, PRESETS, llama_config
from dual_lm.scoring import masked_rows, score_requests

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
    from dual_lm.scoring import split_pair

    torch.manual_seed(0)
    folder = save_folder(
        DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200))),
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
    assert main(["score", str(folder), str(file), "--mode", "masked", "--n", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens"] == 1
    file.write_text("not json\n")
    assert main(["score", str(folder), str(file)]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
