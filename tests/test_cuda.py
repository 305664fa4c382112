"""The same model on a GPU: SDPA masks against the eager twin, bf16 against fp32, cached generation.

Skipped without CUDA; run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import copy

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PATTERNS = [
    {},
    {"attention_mode": "bidirectional"},
    {"prefix_lengths": torch.tensor([5, 9])},
    {"document_ids": torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 21])},
]


@pytest.fixture
def pair(tiny_config):
    model = DLMLlamaForCausalLM(tiny_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    eager = copy.deepcopy(model)
    eager.config = copy.deepcopy(model.config)
    eager.config._attn_implementation = "eager"
    return model.cuda().eval(), eager.cuda().eval()


@pytest.mark.parametrize("kwargs", PATTERNS, ids=["causal", "bidirectional", "prefix", "documents"])
def test_sdpa_equals_eager_on_gpu(pair, kwargs):
    sdpa, eager = pair
    ids = torch.randint(16, 512, (2, 24), device="cuda")
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    with torch.no_grad():
        fast, slow = sdpa(ids, **kwargs).logits, eager(ids, **kwargs).logits
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
        half = copy.deepcopy(sdpa).to(torch.bfloat16)(ids, **kwargs).logits.float()
    assert (half - slow).abs().max() < 0.1


def test_cached_generate_on_gpu(pair):
    sdpa, _ = pair
    ids = torch.randint(16, 512, (1, 6), device="cuda")
    with torch.no_grad():
        out = sdpa.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, sdpa(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
