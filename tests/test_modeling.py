"""Model behaviour against transformers' Llama, uncached recomputation and the attention-mode definitions."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from dual_lm import (
    DLMLlamaForCausalLM,
    DLMLlamaForMaskedLM,
    DLMLlamaForQuestionAnswering,
    DLMLlamaForSequenceClassification,
    DLMLlamaForTokenClassification,
)
from dual_lm.modeling_dlm_llama import allowed_attention
from weights import perturbed


def random_ids(batch=2, length=12, vocab=512):
    ids = torch.randint(16, vocab, (batch, length))
    ids[:, 0] = 1
    return ids


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return perturbed(DLMLlamaForCausalLM(tiny_config))


def test_causal_trunk_equals_transformers_llama(model, tiny_config):
    llama = LlamaForCausalLM(tiny_config).eval()
    missing, _ = llama.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["lm_head.weight"]
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True)
        theirs = llama.model(ids).last_hidden_state
        torch.testing.assert_close(model.lm_head(theirs), ours.logits, atol=1e-5, rtol=1e-5)


def test_labels_give_llama_causal_loss(model):
    ids = random_ids()
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_cached_generate_equals_uncached_greedy(model):
    ids = random_ids(batch=1, length=5)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
        seq = ids
        for _ in range(10):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_prefix_generate_with_cache_equals_uncached(model):
    ids = random_ids(batch=1, length=6)
    prefix = torch.tensor([6])
    with torch.no_grad():
        cached = model.generate(ids, prefix_lengths=prefix, max_new_tokens=6, do_sample=False, eos_token_id=None)
        seq = ids
        for _ in range(6):
            nxt = model(seq, prefix_lengths=prefix).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def _changes_earlier(model, position, **kwargs):
    ids = random_ids(batch=1)
    other = ids.clone()
    other[0, position] = (ids[0, position] + 7) % 500 + 16
    with torch.no_grad():
        a, b = model(ids, **kwargs).logits[0], model(other, **kwargs).logits[0]
    return (a - b).abs().amax(-1) > 1e-6  # [T]: which positions changed


def test_bidirectional_later_tokens_change_earlier_outputs(model):
    changed = _changes_earlier(model, 8, attention_mode="bidirectional")
    assert changed[:8].all()


def test_causal_later_tokens_do_not_change_earlier_outputs(model):
    changed = _changes_earlier(model, 8)
    assert not changed[:8].any() and changed[8:].all()


def test_prefix_semantics(model):
    changed = _changes_earlier(model, 4, prefix_lengths=torch.tensor([6]))
    assert changed.all()  # inside the prefix, earlier tokens see token 4
    changed = _changes_earlier(model, 8, prefix_lengths=torch.tensor([6]))
    assert not changed[:8].any()  # after the prefix, attention is causal
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prefix_lengths=torch.tensor([0, 0])).logits, model(ids).logits)
        full = torch.tensor([ids.shape[1]] * 2)
        torch.testing.assert_close(
            model(ids, prefix_lengths=full).logits, model(ids, attention_mode="bidirectional").logits
        )


def test_documents_do_not_see_each_other(model):
    ids = random_ids(batch=1, length=12)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    for mode in ("causal", "bidirectional"):
        with torch.no_grad():
            packed = model(ids, document_ids=docs, attention_mode=mode).logits
            first = model(ids[:, :5], attention_mode=mode).logits
        torch.testing.assert_close(packed[:, :5], first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "prefix"])
def test_left_and_right_padding_match_unpadded(model, mode):
    ids = random_ids(batch=1, length=7)
    pad = torch.full((1, 3), 3)
    ones, zeros = torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    extra = lambda offset: {"prefix_lengths": torch.tensor([4 + offset])} if mode == "prefix" else {}  # noqa: E731
    kwargs = {} if mode == "prefix" else {"attention_mode": mode}
    with torch.no_grad():
        plain = model(ids, **kwargs, **extra(0)).logits
        right = model(torch.cat([ids, pad], 1), attention_mask=torch.cat([ones, zeros], 1), **kwargs, **extra(0))
        left = model(torch.cat([pad, ids], 1), attention_mask=torch.cat([zeros, ones], 1), **kwargs, **extra(3))
    torch.testing.assert_close(right.logits[:, :7], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left.logits[:, 3:], plain, atol=1e-5, rtol=1e-5)


def test_sdpa_mask_equals_eager_twin(model, tiny_config):
    eager = DLMLlamaForCausalLM(copy.deepcopy(tiny_config)).eval()  # its own config: the twin must not share it
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    assert model.config._attn_implementation == "sdpa"
    ids = random_ids()
    docs = torch.tensor([[0] * 6 + [1] * 6, [0] * 3 + [1] * 9])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    for kwargs in (
        {},
        {"attention_mode": "bidirectional"},
        {"prefix_lengths": torch.tensor([5, 7])},
        {"document_ids": docs},
        {"attention_mask": mask, "prefix_lengths": torch.tensor([4, 6])},
    ):
        with torch.no_grad():
            torch.testing.assert_close(model(ids, **kwargs).logits, eager(ids, **kwargs).logits, atol=1e-5, rtol=1e-5)


def test_allowed_attention_prefix_with_cache_offsets():
    allowed = allowed_attention("prefix", 1, 2, past_len=3, prefix_lengths=torch.tensor([4]))
    # queries at absolute positions 3 and 4; position 3 is inside the prefix and sees key 3 (itself) and 0..3
    assert allowed[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_reference_initialisation(tiny_config):
    model = DLMLlamaForCausalLM(tiny_config)
    h, v = tiny_config.hidden_size, tiny_config.vocab_size
    std_in, std_vocab = (2 / (5 * h)) ** 0.5, (2 / (h + v)) ** 0.5
    layer0, layer1 = model.model.layers
    checks = {
        model.model.embed_tokens.weight: std_vocab,
        model.lm_head.output.weight: std_vocab,
        model.lm_head.projection.weight: std_in,
        layer0.self_attn.q_proj.weight: std_in,
        layer1.mlp.gate_proj.weight: std_in * (1 / 4) ** 0.5,
        layer1.mlp.up_proj.weight: std_in * (1 / 4) ** 0.5,
        layer0.mlp.up_proj.weight: std_in * (1 / 2) ** 0.5,
    }
    for weight, std in checks.items():
        assert weight.abs().max() <= 2 * std + 1e-7
        # a normal truncated at 2 sigma has standard deviation 0.880 sigma
        assert abs(weight.std().item() / std - 0.880) < 0.06
    for zero in (layer0.self_attn.o_proj.weight, layer1.mlp.down_proj.weight, model.lm_head.output.bias):
        assert torch.count_nonzero(zero) == 0
    assert torch.all(model.model.norm.weight == 1) and torch.all(layer0.input_layernorm.weight == 1)


@pytest.mark.parametrize(
    "cls",
    [
        DLMLlamaForCausalLM,
        DLMLlamaForMaskedLM,
        DLMLlamaForSequenceClassification,
        DLMLlamaForTokenClassification,
        DLMLlamaForQuestionAnswering,
    ],
)
def test_save_and_reload_round_trip(cls, tiny_config, tmp_path):
    from dual_lm.folder import save_folder

    model = perturbed(cls(tiny_config))
    save_folder(model, tmp_path / "m")
    again = cls.from_pretrained(tmp_path / "m").eval()
    ids = random_ids()
    with torch.no_grad():
        a, b = model(ids), again(ids)
    for key in [k for k in a if k != "cache"]:
        torch.testing.assert_close(a[key], b[key])
    assert (tmp_path / "m" / "modeling_dlm_llama.py").is_file()


def _train(model, batch, steps=15):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_task_heads_learn(tiny_config):
    ids = random_ids(batch=4, length=10)
    tiny_config.num_labels = 3
    batches = {
        DLMLlamaForSequenceClassification: {"labels": torch.tensor([0, 1, 2, 1])},
        DLMLlamaForTokenClassification: {"labels": ids % 3},
        DLMLlamaForQuestionAnswering: {
            "start_positions": torch.tensor([1, 2, 3, 4]),
            "end_positions": torch.tensor([5, 6, 7, 8]),
        },
        DLMLlamaForMaskedLM: {"labels": ids},  # aligned with input_ids: the shift is inside
    }
    for cls, extra in batches.items():
        torch.manual_seed(0)
        model = cls(tiny_config).train()
        losses = _train(model, {"input_ids": ids, **extra})
        assert losses[-1] < 0.5 * losses[0], (cls.__name__, losses)


def test_task_head_attention_is_configurable(tiny_config):
    ids = random_ids(batch=1)
    tiny_config.num_labels = 2
    torch.manual_seed(0)
    bidir = perturbed(DLMLlamaForTokenClassification(tiny_config))
    assert bidir.default_attention_mode == "bidirectional"
    causal_config = copy.deepcopy(tiny_config)
    causal_config.dlm_task_attention = "causal"
    causal = DLMLlamaForTokenClassification(causal_config).eval()
    causal.load_state_dict(bidir.state_dict())
    with torch.no_grad():
        differs = (bidir(ids).logits - causal(ids).logits).abs().amax(-1)[0] > 1e-6
        explicit = bidir(ids, attention_mode="causal").logits
    torch.testing.assert_close(explicit, causal(ids).logits)
    assert differs[:-1].all()  # only the last token sees the same context in both modes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention_mode": "sideways"}, "unknown attention_mode 'sideways'"),
        ({"prefix_lengths": torch.tensor([3, 13])}, r"prefix_lengths must lie in \[0, 12\]"),
        ({"prefix_lengths": torch.tensor([-1, 2])}, "prefix_lengths must lie"),
        ({"prefix_lengths": torch.tensor([3])}, r"prefix_lengths must be a LongTensor \[B=2\]"),
        (
            {"prefix_lengths": torch.tensor([3, 3]), "attention_mode": "bidirectional"},
            "only used with attention_mode='prefix'",
        ),
        ({"attention_mode": "prefix"}, "needs prefix_lengths"),
        ({"document_ids": torch.zeros(2, 11, dtype=torch.long)}, "document_ids must have the shape of input_ids"),
        ({"attention_mask": torch.ones(2, 5)}, "attention_mask has shape"),
    ],
)
def test_bad_inputs_raise_one_clear_error(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(random_ids(), **kwargs)


def test_sequence_longer_than_position_limit(model):
    with pytest.raises(ValueError, match="longer than the position limit max_position_embeddings=64"):
        model(random_ids(length=65))


def test_a_prefix_task_default_without_prefix_lengths_says_what_to_do():
    from dual_lm.config import PRESETS, llama_config

    config = llama_config(PRESETS["tiny"], task_attention="prefix", num_labels=2)
    model = DLMLlamaForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match=r"dlm_task_attention='prefix' needs prefix_lengths .* pipelines"):
        model(torch.tensor([[1, 300, 400]]))
    out = model(torch.tensor([[1, 300, 400]]), prefix_lengths=torch.tensor([2]))
    assert out.logits.shape == (1, 2)
