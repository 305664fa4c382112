"""Presets and the reference-config mapping."""

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import PRESETS, llama_config, load_reference_config, parameter_counts, preset
from dual_lm.errors import UserError


def test_470m_has_the_model_cards_parameter_counts():
    with torch.device("meta"):
        model = DLMLlamaForCausalLM(llama_config(PRESETS["470m"]))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel() + sum(p.numel() for p in model.lm_head.output.parameters())
    assert round(total / 1e7) * 10 == 470  # "470M total"
    assert round((total - embedding) / 1e7) * 10 == 360  # "360M non-embedding"
    counts = parameter_counts(PRESETS["470m"])
    assert counts["total"] == total and counts["non_embedding"] == total - embedding


def test_reference_470m_config_maps_to_the_preset(parity_dir):
    shape = load_reference_config(parity_dir.parent / "config-470m.json")
    assert shape == PRESETS["470m"]


def test_tiny_preset_is_the_fixture_shape(parity_dir):
    shape = load_reference_config(parity_dir / "config.json")
    assert shape.hidden_size == PRESETS["tiny"].hidden_size and shape.head_dim == PRESETS["tiny"].head_dim


def test_unknown_preset_and_field_suggest_the_closest():
    with pytest.raises(UserError, match="did you mean '470m'"):
        preset("470M")
    with pytest.raises(UserError, match="did you mean 'num_layers'"):
        preset("tiny", num_layer=3)
