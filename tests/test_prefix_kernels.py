"""Prefix attention without a dense mask: ``prefix_attention``'s kernels and ``run_trunk``'s routing to them.

The fast path (one prefix length for the batch, no padding, sdpa, eager) must give the logits of the
dense-mask path (``split_prefix_attention = False``, the slow twin) and of eager attention; everything
else must keep taking the dense mask."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import dual_lm.modeling_dlm_llama as modeling
from dual_lm import DLMLlamaForCausalLM, DLMLlamaForSequenceClassification
from dual_lm.inference.scoring import score_requests
from dual_lm.modeling_dlm_llama import PREFIX_KERNELS, allowed_attention, prefix_attention
from weights import perturbed

T = 12
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


def dense_reference(q, k, v, prefix_length, **kwargs):
    allowed = allowed_attention(
        "prefix", q.shape[0], q.shape[2], prefix_lengths=torch.full((q.shape[0],), prefix_length)
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kwargs)


@pytest.fixture
def calls(monkeypatch):
    """Every ``prefix_attention`` call of the models, as (prefix length, kernel)."""
    seen = []

    def counted(query, key, value, prefix_length, scale=None, dropout=0.0, kernel=None):
        seen.append((prefix_length, kernel or modeling.prefix_kernel(query, key, value, dropout)))
        return prefix_attention(query, key, value, prefix_length, scale=scale, dropout=dropout, kernel=kernel)

    monkeypatch.setattr(modeling, "prefix_attention", counted)
    return seen


def triplets(config):
    """The same perturbed weights: the fast path, its dense-mask twin (sdpa) and eager attention."""
    torch.manual_seed(0)
    fast = perturbed(DLMLlamaForCausalLM(copy.deepcopy(config)))
    dense = copy.deepcopy(fast)
    dense.split_prefix_attention = False
    eager = copy.deepcopy(fast)
    eager.config._attn_implementation = "eager"
    assert fast.config._attn_implementation == dense.config._attn_implementation == "sdpa"
    return fast, dense, eager


@pytest.fixture
def models(tiny_config):
    return triplets(tiny_config)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def random_ids(batch, length=T):
    torch.manual_seed(1)
    ids = torch.randint(16, 512, (batch, length))
    ids[:, 0] = 1
    return ids


# ----------------------------------------------------------------------------- the kernels alone


@pytest.mark.parametrize("kernel", PREFIX_KERNELS)
@pytest.mark.parametrize("prefix_length", [0, 1, 5, T - 1, T])
def test_each_kernel_equals_the_dense_mask(kernel, prefix_length):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8) for _ in range(3))
    out = prefix_attention(q, k, v, prefix_length, scale=0.3, kernel=kernel)
    torch.testing.assert_close(out, dense_reference(q, k, v, prefix_length, scale=0.3), **TIGHT)


def test_lse_kernel_in_bfloat16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.bfloat16) for _ in range(3))
    want = dense_reference(q, k, v, 5)
    out = prefix_attention(q, k, v, 5, kernel="lse")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kernel", ["split", "lower_right"])
def test_autograd_kernels_give_the_dense_gradients(kernel):
    torch.manual_seed(0)
    leaves = [torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3)]
    weights = torch.randn(1, 2, T, 8)
    (prefix_attention(*leaves, 5, kernel=kernel) * weights).sum().backward()
    fast = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    (dense_reference(*leaves, 5) * weights).sum().backward()
    for got, want in zip(fast, (leaf.grad for leaf in leaves), strict=True):
        torch.testing.assert_close(got, want, **TIGHT)


def test_default_kernel_choice():
    q = torch.randn(1, 1, 4, 8)
    assert modeling.prefix_kernel(q, q, q) == "lse"
    assert modeling.prefix_kernel(q, q, q, dropout=0.1) == "split"
    leaf = q.clone().requires_grad_()
    assert modeling.prefix_kernel(leaf, q, q) == "split"
    with torch.no_grad():
        assert modeling.prefix_kernel(leaf, q, q) == "lse"
    with pytest.raises(ValueError, match="unknown prefix kernel"):
        prefix_attention(q, q, q, 2, kernel="nope")
    with pytest.raises(ValueError, match="0 <= P <= T"):
        prefix_attention(q, q, q, 5)
    with pytest.raises(ValueError, match="no gradient"):
        prefix_attention(leaf, q, q, 2, kernel="lse")


# ----------------------------------------------------------------------------- the models


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prefix_length", [0, 1, 5, T - 1, T])
def test_fast_path_equals_dense_mask_and_eager(models, calls, batch, prefix_length):
    fast, dense, eager = models
    ids = random_ids(batch)
    pattern = {"prefix_lengths": torch.full((batch,), prefix_length)}
    got = logits(fast, ids, **pattern)
    assert calls == [(prefix_length, "lse")] * fast.config.num_hidden_layers  # taken, once a layer
    calls.clear()
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)
    torch.testing.assert_close(got, logits(eager, ids, **pattern), **TIGHT)
    assert not calls  # the twins never take it


def test_all_ones_padding_mask_takes_the_fast_path(models, calls):
    fast, dense, _ = models
    ids, mask = random_ids(2), torch.ones(2, T, dtype=torch.long)
    got = logits(fast, ids, attention_mask=mask, prefix_lengths=torch.tensor([4, 4]))
    assert len(calls) == fast.config.num_hidden_layers
    torch.testing.assert_close(
        got, logits(dense, ids, attention_mask=mask, prefix_lengths=torch.tensor([4, 4])), **TIGHT
    )


@pytest.mark.parametrize(
    "pattern",
    [
        {"prefix_lengths": torch.tensor([3, 7])},  # unequal prefix lengths
        {"prefix_lengths": torch.tensor([4, 4]), "attention_mask": torch.tensor([[0, 0] + [1] * (T - 2), [1] * T])},
        {"prefix_lengths": torch.tensor([4, 4]), "attention_mask": torch.tensor([[1] * (T - 3) + [0] * 3, [1] * T])},
        {"prefix_lengths": torch.tensor([4, 4]), "document_ids": torch.tensor([[0] * 6 + [1] * 6] * 2)},
    ],
    ids=["unequal", "left-padding", "right-padding", "documents"],
)
def test_other_prefix_calls_keep_the_dense_mask(models, calls, pattern):
    fast, dense, eager = models
    ids = random_ids(2)
    got = logits(fast, ids, **pattern)
    assert not calls
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)
    torch.testing.assert_close(got, logits(eager, ids, **pattern), **TIGHT)


def test_other_modes_never_take_it(models, calls):
    fast, _, _ = models
    ids = random_ids(2)
    logits(fast, ids)
    logits(fast, ids, attention_mode="bidirectional")
    logits(fast, ids, row_causal=torch.tensor([True, False]))
    assert not calls


def test_compiled_and_exported_calls_keep_the_dense_mask(models, calls, monkeypatch):
    fast, dense, _ = models
    ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([5, 5])}
    monkeypatch.setattr(modeling, "_eager", lambda: False)  # what torch.compile and torch.export see
    got = logits(fast, ids, **pattern)
    assert not calls
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)


def test_export_after_the_fast_path_traces_the_dense_mask(models, calls):
    fast, _, _ = models
    ids, prefix = random_ids(2), torch.tensor([5, 5])
    want = logits(fast, ids, prefix_lengths=prefix)  # eager: the fast path, which registers it
    calls.clear()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = fast

        def forward(self, input_ids, prefix_lengths):
            return self.model(input_ids, use_cache=False, prefix_lengths=prefix_lengths).logits

    exported = torch.export.export(Logits(), (ids, prefix))
    assert not calls  # traced without it: no branch on the prefix lengths' values
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids, prefix), want, **TIGHT)


def test_training_takes_the_autograd_kernel_with_the_dense_gradients(models, calls):
    fast, dense, _ = models
    ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([5, 5])}
    grads = []
    for model in (fast, dense):
        model.zero_grad()
        model(ids, labels=ids, **pattern).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == [(5, "split")] * fast.config.num_hidden_layers
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], **TIGHT, msg=name)


def test_the_accelerator_kernel_in_the_model(models, calls, monkeypatch):
    fast, dense, _ = models
    monkeypatch.setattr(modeling, "prefix_kernel", lambda *args, **kwargs: "lower_right")
    ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([5, 5])}
    got = logits(fast, ids, **pattern)
    assert calls == [(5, "lower_right")] * fast.config.num_hidden_layers
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)


def test_grouped_query_attention(tiny_config, calls):
    fast, dense, eager = triplets(_gqa(tiny_config))
    ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([7, 7])}
    got = logits(fast, ids, **pattern)
    assert calls
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)
    torch.testing.assert_close(got, logits(eager, ids, **pattern), **TIGHT)


def _gqa(config):
    config = copy.deepcopy(config)
    config.num_key_value_heads = 2  # 4 query heads share 2 key/value heads
    return config


def test_one_pass_models_take_it_too(tiny_config, calls):
    torch.manual_seed(0)
    fast = perturbed(DLMLlamaForSequenceClassification(copy.deepcopy(tiny_config)))
    dense = copy.deepcopy(fast)
    dense.split_prefix_attention = False
    ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([6, 6])}
    got = logits(fast, ids, **pattern)
    assert calls
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)


# ----------------------------------------------------------------------------- caches, generation, scoring


@pytest.mark.parametrize("prefix_length", [1, 4, 6])
def test_generate_with_a_shared_prefix(models, calls, prefix_length):
    fast, dense, _ = models
    ids = random_ids(2, 6)
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    pattern = {"prefix_lengths": torch.full((2,), prefix_length)}
    with torch.no_grad():
        got = fast.generate(ids, **pattern, **options)
        prefill_only = len(calls)
        assert torch.equal(got, dense.generate(ids, **pattern, **options))
        seq = ids
        for _ in range(6):  # uncached recomputation through the fast path
            seq = torch.cat([seq, fast(seq, **pattern).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert prefill_only == fast.config.num_hidden_layers  # the prompt only: one new token sees everything anyway
    assert torch.equal(got, seq)


def test_prefix_attention_generate(models, calls):
    fast, dense, _ = models
    ids = random_ids(1, 5)
    options = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None, "prefix_attention": True}
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, **options), dense.generate(ids, **options))
    assert calls[0] == (5, "lse")


def test_static_cache_prefill(models, calls):
    fast, dense, _ = models
    ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([5, 5])}
    cache = StaticCache(config=fast.config, max_cache_len=T + 4)
    with torch.no_grad():
        got = fast(ids, cache=cache, use_cache=True, **pattern).logits
    assert calls
    torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)


def test_a_ready_made_4d_mask_inside_the_prefix_is_refused(models):
    """generate builds a 4-D mask for a static cache with padding; it says only what is causal, so the prefix
    would silently attend causally: refused. Without padding (no 4-D mask) the static cache gives prefix tokens."""
    fast, _, _ = models
    ids, mask = random_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    options = {"max_new_tokens": 3, "do_sample": False, "eos_token_id": None, "prefix_attention": True}
    with torch.no_grad(), pytest.raises(ValueError, match="prefix mode needs the \\[B, T\\] padding mask"):
        fast.generate(ids, attention_mask=mask, cache_implementation="static", pad_token_id=3, **options)
    with torch.no_grad():
        static = fast.generate(ids[:1], cache_implementation="static", **options)
        assert torch.equal(static, fast.generate(ids[:1], **options))


def test_scoring_benefits_when_its_batches_qualify(models, calls):
    fast, dense, _ = models
    torch.manual_seed(2)
    context = [1, *torch.randint(16, 512, (5,)).tolist()]
    requests = [(context, torch.randint(16, 512, (n,)).tolist()) for n in (3, 3, 4)]
    got = score_requests(fast, requests, mode="prefix", batch_size=2)  # rows of 10, 9 (padded), then 9 tokens
    assert calls  # the batch without padding took the fast path, the padded one its dense mask
    want = score_requests(dense, requests, mode="prefix", batch_size=2)
    for a, b in zip(got, want, strict=True):
        assert a.greedy == b.greedy and a.tokens == b.tokens
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


# ----------------------------------------------------------------------------- the sdpa registration


def test_sdpa_stays_transformers_own_for_everything_else(models):
    fast, _, _ = models
    logits(fast, random_ids(1), prefix_lengths=torch.tensor([3]))  # registers it
    registered = ALL_ATTENTION_FUNCTIONS.get("sdpa")
    assert registered._dlm_base is modeling.sdpa_attention_forward
    assert fast.config._attn_implementation == "sdpa"
    q, k, v = (torch.randn(1, 4, 6, 16) for _ in range(3))
    module = fast.model.layers[0].self_attn
    for kwargs in ({}, {"is_causal": False}):
        want, _ = modeling.sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.25, **kwargs)
        got, _ = registered(module, q, k, v, None, dropout=0.0, scaling=0.25, **kwargs)
        assert torch.equal(got, want)


def test_a_foreign_sdpa_override_keeps_the_dense_mask(models, calls):
    fast, dense, _ = models

    def foreign(*args, **kwargs):
        return modeling.sdpa_attention_forward(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = foreign  # a local override of the shared instance
    try:
        ids, pattern = random_ids(2), {"prefix_lengths": torch.tensor([5, 5])}
        got = logits(fast, ids, **pattern)
        assert not calls
        torch.testing.assert_close(got, logits(dense, ids, **pattern), **TIGHT)
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
