"""The converted reference checkpoint reproduces the reference implementation's logits."""

import pytest
import torch
from safetensors.torch import load_file

from dual_lm import DLMLlamaForCausalLM, DLMLlamaForMaskedLM

TOL = 1e-4


@pytest.fixture(scope="module")
def expected(parity_dir):
    return load_file(str(parity_dir / "expected.safetensors"))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_five_patterns_match_reference(converted, expected, impl):
    causal = DLMLlamaForCausalLM.from_pretrained(converted, attn_implementation=impl).eval()
    masked = DLMLlamaForMaskedLM.from_pretrained(converted, attn_implementation=impl).eval()
    ids, mids = expected["input_ids"], expected["input_ids_masked"]
    docs = expected["document_ids_two_documents"].long()
    with torch.no_grad():
        got = {
            "causal": causal(ids).logits,
            "bidirectional": masked(mids).logits,
            "prefix": causal(ids, prefix_lengths=torch.tensor([9, 9])).logits,
            "causal_two_documents": causal(ids, document_ids=docs).logits,
            "bidirectional_two_documents": masked(mids, document_ids=docs).logits,
        }
    for name, logits in got.items():
        torch.testing.assert_close(logits, expected[f"logits_{name}"], atol=TOL, rtol=TOL, msg=name)


def test_masked_class_reads_mask_at_previous_position(converted, expected):
    """Bidirectional MNTP: the logits at i-1 of a <mask> at i are the reference's logits there."""
    model = DLMLlamaForMaskedLM.from_pretrained(converted).eval()
    mids = expected["input_ids_masked"]
    rows, cols = (mids == 4).nonzero(as_tuple=True)
    with torch.no_grad():
        logits = model(mids).logits
    ref = expected["logits_bidirectional"]
    torch.testing.assert_close(logits[rows, cols - 1], ref[rows, cols - 1], atol=TOL, rtol=TOL)


def test_converted_folder_has_no_tokenizer_and_says_so(converted, capsys):
    from dual_lm.cli import main

    assert not (converted / "tokenizer.json").exists()
    assert main(["info", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer" in out and "none" in out
    assert "DLMLlamaForMaskedLM" in out and "prefix" in out
