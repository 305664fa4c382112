"""The one trunk entry (per-row patterns, the forwards' shared signature) and the one scoring loop."""

import copy
import inspect
import random

import pytest
import torch

from dual_lm import (
    DLMLlamaForCausalLM,
    DLMLlamaForMaskedLM,
    DLMLlamaForQuestionAnswering,
    DLMLlamaForSequenceClassification,
    DLMLlamaForTokenClassification,
)
from dual_lm.inference.scoring import md_bound, score_requests, score_texts

PATTERN = ["attention_mode", "prefix_lengths", "document_ids"]
ONE_PASS = ["input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", *PATTERN, "kwargs"]
SIGNATURES = {  # what transformers' generate, pipelines, Trainer and PEFT see; a refactor must not move a name
    DLMLlamaForCausalLM: [
        "input_ids",
        "attention_mask",
        "position_ids",
        "cache",
        "inputs_embeds",
        "labels",
        "use_cache",
        "logits_to_keep",
        *PATTERN,
        "past_key_values",
        "label_weights",
        "kwargs",
    ],
    DLMLlamaForMaskedLM: ONE_PASS,
    DLMLlamaForSequenceClassification: ONE_PASS,
    DLMLlamaForTokenClassification: ONE_PASS,
    DLMLlamaForQuestionAnswering: [
        "input_ids",
        "attention_mask",
        "position_ids",
        "inputs_embeds",
        "start_positions",
        "end_positions",
        *PATTERN,
        "kwargs",
    ],
}


def twins(config):
    """The same perturbed weights under SDPA and under eager attention (the slow twin), each with its own config."""
    torch.manual_seed(0)
    fast = DLMLlamaForCausalLM(copy.deepcopy(config)).eval()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    slow = DLMLlamaForCausalLM(copy.deepcopy(config)).eval()
    slow.config._attn_implementation = "eager"
    slow.load_state_dict(fast.state_dict())
    assert fast.config._attn_implementation == "sdpa"
    return fast, slow


def hidden(model, **kwargs):
    with torch.no_grad():
        return model.run_trunk(**kwargs).last_hidden_state


@pytest.mark.parametrize("cls", list(SIGNATURES))
def test_forward_signatures_are_the_public_ones(cls):
    assert list(inspect.signature(cls.forward).parameters)[1:] == SIGNATURES[cls]


@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_row_causal_equals_each_row_alone_in_the_eager_twin(tiny_config, with_documents, with_padding):
    fast, slow = twins(tiny_config)
    ids = torch.randint(16, 512, (4, 10))
    row_causal = torch.tensor([True, False, False, True])
    docs = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3, [0] * 10, [0] * 2 + [1] * 8])
    mask = torch.ones_like(ids)
    mask[1, 7:] = mask[3, 8:] = 0  # right padding
    extra = {"document_ids": docs if with_documents else None, "attention_mask": mask if with_padding else None}
    mixed = hidden(fast, input_ids=ids, row_causal=row_causal, **extra)
    for b in range(4):
        mode = "causal" if row_causal[b] else "bidirectional"
        alone = {k: v[b : b + 1] for k, v in extra.items() if v is not None}
        expected = hidden(slow, input_ids=ids[b : b + 1], attention_mode=mode, **alone)[0]
        real = mask[b].bool() if with_padding else slice(None)
        torch.testing.assert_close(mixed[b][real], expected[real], atol=1e-5, rtol=1e-5)


def test_uniform_row_causal_is_exactly_the_batch_mode(tiny_config):
    fast, _ = twins(tiny_config)
    ids = torch.randint(16, 512, (3, 9))
    for causal, mode in ((True, "causal"), (False, "bidirectional")):
        rows = torch.full((3,), causal)
        assert torch.equal(
            hidden(fast, input_ids=ids, row_causal=rows), hidden(fast, input_ids=ids, attention_mode=mode)
        )


def test_row_causal_with_the_eager_backend_and_with_forward(tiny_config):
    fast, slow = twins(tiny_config)
    ids = torch.randint(16, 512, (2, 8))
    rows = torch.tensor([False, True])
    torch.testing.assert_close(
        hidden(slow, input_ids=ids, row_causal=rows), hidden(fast, input_ids=ids, row_causal=rows), atol=1e-5, rtol=1e-5
    )
    with torch.no_grad():
        logits = fast(ids, row_causal=rows).logits  # forwards pass it through to run_trunk
    torch.testing.assert_close(logits, fast.lm_head(hidden(fast, input_ids=ids, row_causal=rows)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention_mode": "causal"}, "without attention_mode and prefix_lengths"),
        ({"prefix_lengths": torch.tensor([2, 2])}, "without attention_mode and prefix_lengths"),
    ],
)
def test_row_causal_excludes_a_batch_pattern(tiny_config, kwargs, message):
    fast, _ = twins(tiny_config)
    with pytest.raises(ValueError, match=message):
        fast.run_trunk(input_ids=torch.randint(16, 512, (2, 5)), row_causal=torch.tensor([True, False]), **kwargs)


@pytest.mark.parametrize("rows", [torch.tensor([True]), torch.tensor([1, 0])])
def test_row_causal_must_be_a_bool_per_row(tiny_config, rows):
    fast, _ = twins(tiny_config)
    with pytest.raises(ValueError, match=r"row_causal must be a BoolTensor \[B=2\]"):
        fast.run_trunk(input_ids=torch.randint(16, 512, (2, 5)), row_causal=rows)


def test_run_trunk_is_keyword_only(tiny_config):
    fast, _ = twins(tiny_config)
    with pytest.raises(TypeError):
        fast.run_trunk(torch.randint(16, 512, (1, 4)))


# ----------------------------------------------------------------------------- the scoring loop


@pytest.fixture(scope="module")
def scorer():
    import dataclasses

    from dual_lm.config import PRESETS, llama_config

    model, _ = twins(llama_config(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64)))
    return model


def random_requests(count=21, seed=0):
    rng = random.Random(seed)
    return [
        (
            [1] + [rng.randrange(16, 512) for _ in range(rng.randrange(0, 9))],
            [rng.randrange(16, 512) for _ in range(rng.randrange(1, 6))],
        )
        for _ in range(count)
    ]


def assert_same_scores(got, expected):
    assert [s.tokens for s in got] == [s.tokens for s in expected]
    assert [s.greedy for s in got] == [s.greedy for s in expected]
    torch.testing.assert_close(
        torch.tensor([s.logprob for s in got]), torch.tensor([s.logprob for s in expected]), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("mode", ["causal", "prefix", "masked"])
def test_request_scores_do_not_depend_on_batch_size_or_order(scorer, mode):
    requests = random_requests()
    reference = score_requests(scorer, requests, mode, n=2, batch_size=16)
    assert_same_scores(score_requests(scorer, requests, mode, n=2, batch_size=1), reference)
    order = list(range(len(requests)))
    random.Random(1).shuffle(order)
    shuffled = score_requests(scorer, [requests[i] for i in order], mode, n=2, batch_size=16)
    assert_same_scores([shuffled[order.index(i)] for i in range(len(requests))], reference)


def test_text_scores_do_not_depend_on_batch_size_or_order(scorer):
    rng = random.Random(2)
    texts = [[1] + [rng.randrange(16, 512) for _ in range(rng.randrange(1, 40))] for _ in range(7)]
    reference = score_texts(scorer, texts, window=12, stride=5, batch_size=16)
    one = score_texts(scorer, texts, window=12, stride=5, batch_size=1)
    shuffled = score_texts(scorer, texts[::-1], window=12, stride=5, batch_size=16)[::-1]
    for got in (one, shuffled):
        assert [s.tokens for s in got] == [len(t) - 1 for t in texts]
        torch.testing.assert_close(
            torch.tensor([s.logprob for s in got]), torch.tensor([s.logprob for s in reference]), atol=1e-5, rtol=1e-5
        )


def test_md_bound_does_not_depend_on_batch_size(scorer):
    requests = random_requests(count=5, seed=3)
    small, large = (md_bound(scorer, requests, samples=6, seed=4, batch_size=b) for b in (1, 16))
    assert [b.samples for b in small] == [b.samples for b in large] == [6] * 5
    for field in ("logprob", "stderr"):
        torch.testing.assert_close(
            torch.tensor([getattr(b, field) for b in small]),
            torch.tensor([getattr(b, field) for b in large]),
            atol=1e-5,
            rtol=1e-5,
        )
