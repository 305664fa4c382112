"""Every mode traces: ``torch.export`` and ONNX (dynamo) of causal, bidirectional and prefix attention
equal the eager model; ``generate`` runs with the forward compiled ``fullgraph=True`` (no graph break);
``return_dict=False`` and packed padding-free rows with explicit positions follow transformers'
conventions."""

import dataclasses

import pytest
import torch

import dual_lm
from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import PRESETS, llama_config
from weights import perturbed

MODES = {
    "causal": ({}, ()),
    "bidirectional": ({"attention_mode": "bidirectional"}, ()),
    "prefix": ({}, (torch.tensor([5, 7]),)),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = llama_config(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64))
    return perturbed(DLMLlamaForCausalLM(config), 0.05)


def ids(batch=2, length=12):
    generator = torch.Generator().manual_seed(1)
    out = torch.randint(16, 500, (batch, length), generator=generator)
    out[:, 0] = 1
    return out


class Logits(torch.nn.Module):
    """The model under one attention pattern, as a module of tensors in and logits out."""

    def __init__(self, model, **pattern):
        super().__init__()
        self.model, self.pattern = model, pattern

    def forward(self, input_ids, *prefix_lengths):
        extra = {"prefix_lengths": prefix_lengths[0]} if prefix_lengths else {}
        return self.model(input_ids, use_cache=False, **self.pattern, **extra).logits


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_export_of_every_mode_equals_eager(model, mode):
    pattern, extra = MODES[mode]
    module = Logits(model, **pattern)
    exported = torch.export.export(module, (ids(), *extra))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids(), *extra), module(ids(), *extra), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_onnx_export_of_every_mode_equals_eager(model, mode):
    pytest.importorskip("onnxruntime", reason="the onnx extra (make setup installs it)")
    pattern, extra = MODES[mode]
    module = Logits(model, **pattern)
    program = torch.onnx.export(module, (ids(), *extra), dynamo=True, verbose=False)
    (got,) = program(ids(), *extra)
    with torch.no_grad():
        torch.testing.assert_close(got, module(ids(), *extra), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", [False, True])
def test_generate_with_the_forward_compiled_fullgraph(model, prefix):
    import copy

    compiled = copy.deepcopy(model)
    # fullgraph=True fails on any graph break; the eager backend keeps the test fast on a CPU
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend="eager", dynamic=True)
    prompt = ids(1, 8)
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, prefix_attention=prefix)
    got = compiled.generate(prompt, max_new_tokens=6, do_sample=False, prefix_attention=prefix)
    assert torch.equal(got, want)


def test_the_masked_lm_compiles_fullgraph(model):
    masked = dual_lm.DLMLlamaForMaskedLM(model.config).eval()
    masked.load_state_dict(model.state_dict())
    compiled = torch.compile(masked.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids()).logits, masked(ids()).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in dual_lm.__all__ if n.startswith("DLMLlamaFor")])
def test_return_dict_false_gives_the_tuple(model, name):
    import copy

    config = copy.deepcopy(model.config)
    config.num_labels = 2
    torch.manual_seed(0)
    cls = getattr(dual_lm, name)
    other = perturbed(cls(config))
    with torch.no_grad():
        as_dict = other(ids(), use_cache=False) if name == "DLMLlamaForCausalLM" else other(ids())
        as_tuple = (
            other(ids(), use_cache=False, return_dict=False)
            if name == "DLMLlamaForCausalLM"
            else other(ids(), return_dict=False)
        )
    expected = as_dict.to_tuple()
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected)
    for a, b in zip(as_tuple, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_packed_row_with_explicit_positions_may_exceed_the_context(model):
    """Two 40-token documents in one padding-free row of 80 (context 64): the positions restart, so
    the row is accepted, and each document's logits equal the document run alone."""
    first, second = ids(1, 40), ids(1, 40) + 3
    row = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(40), torch.arange(40)])[None]
    documents = torch.cat([torch.zeros(40), torch.ones(40)]).long()[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions, document_ids=documents, use_cache=False).logits
        alone = [model(doc, use_cache=False).logits for doc in (first, second)]
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position_ids reach 79, past the position limit max_position_embeddings=64"):
        model(row, position_ids=torch.arange(80)[None], use_cache=False)
    with pytest.raises(ValueError, match="sequence of 80 tokens is longer than the position limit"):
        model(row, use_cache=False)
