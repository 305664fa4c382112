"""Model folders: Auto classes through remote code in a process without dual_lm, tokenizers, atomic saves."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from dual_lm import DLMLlamaForCausalLM
from dual_lm.folder import check_folder, save_folder
from dual_lm.modeling_dlm_llama import AUTO_MAP
from weights import perturbed

FRESH_PROCESS = r"""
import sys, json
sys.modules["dual_lm"] = None          # make `import dual_lm` fail: only the folder's own file may be used
sys.modules["hf_model_llama"] = None
import torch, transformers
folder, ids, out = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
roles = (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token, tok.mask_token)
assert roles == ("<s>", "</s>", "<unk>", "<pad>", "<mask>"), roles
assert tok("a b")["input_ids"][0] == 1
found = {}
for auto in json.loads(sys.argv[4]):
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        output = model(ids)
    found[auto] = {
        "class": type(model).__name__,
        "state": model.state_dict(),
        "outputs": {k: v for k, v in output.items() if torch.is_tensor(v)},
    }
fill = transformers.pipeline("fill-mask", model=folder, trust_remote_code=True)
assert type(fill).__module__.startswith("transformers_modules"), type(fill).__module__
found["fill"] = [(c["token_str"], c["score"]) for c in fill("The king <mask> the crown", top_k=3)]
torch.save(found, out)
"""


@pytest.fixture(scope="module")
def folder(tokenizer_51200, tmp_path_factory):
    import dataclasses

    from dual_lm.config import PRESETS, llama_config

    config = llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200), num_labels=3)
    model = perturbed(DLMLlamaForCausalLM(config))
    return save_folder(model, tmp_path_factory.mktemp("auto") / "model", tokenizer_51200)


def test_config_loads_as_llama_with_auto_map(folder):
    config = LlamaConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.mask_token_id == 4
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_auto_classes_load_in_fresh_process_without_dual_lm(folder, tmp_path):
    """Every Auto class, in one process that cannot import dual_lm: the folder's weights are loaded
    (the heads the folder lacks are new), and each output equals our class on the same weights."""
    import dual_lm

    ids = [[1, 20, 30, 40, 50], [1, 60, 70, 80, 90]]
    dumped = tmp_path / "found.pt"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), json.dumps(ids), str(dumped), json.dumps(sorted(AUTO_MAP))],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = torch.load(dumped, weights_only=True)
    from dual_lm.folder import load_folder
    from dual_lm.inference.generation import fill_masks

    model, tokenizer = load_folder(folder)
    expected_fill = fill_masks(model, tokenizer, "The king <mask> the crown", top_k=3)[0].candidates
    fill = found.pop("fill")  # the folder's own pipeline, in a process without dual_lm
    assert [t for t, _ in fill] == [t for t, _ in expected_fill]
    assert [p for _, p in fill] == pytest.approx([p for _, p in expected_fill], abs=1e-7)
    saved = load_file(folder / "model.safetensors")
    assert sorted(found) == sorted(AUTO_MAP)
    for auto, got in found.items():
        name = AUTO_MAP[auto].split(".")[-1]
        assert got["class"] == name
        state = got["state"]
        trunk = sorted(k for k in saved if k.startswith("model."))  # the heads that the folder lacks are new
        assert trunk and all(torch.equal(state[k], saved[k]) for k in trunk), auto
        if auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM"):
            assert all(torch.equal(state[k], saved[k]) for k in saved), auto
        ours = getattr(dual_lm, name)(DLMLlamaForCausalLM.config_class.from_pretrained(folder)).eval()
        ours.load_state_dict(state)
        with torch.no_grad():
            expected = ours(torch.tensor(ids))
        assert sorted(got["outputs"]) == sorted(k for k, v in expected.items() if torch.is_tensor(v)), auto
        for key, value in got["outputs"].items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_save_folder_replaces_atomically_only_when_allowed(tiny_config, tmp_path):
    from dual_lm.errors import UserError

    out = tmp_path / "m"
    save_folder(perturbed(DLMLlamaForCausalLM(tiny_config)), out)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="refusing to replace"):
        save_folder(perturbed(DLMLlamaForCausalLM(tiny_config)), out)
    assert (out / "model.safetensors").read_bytes() == first
    save_folder(perturbed(DLMLlamaForCausalLM(tiny_config), seed=1), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copies left


def test_save_folder_failure_keeps_previous(tiny_config, tmp_path):
    out = tmp_path / "m"
    save_folder(perturbed(DLMLlamaForCausalLM(tiny_config)), out)
    before = (out / "model.safetensors").read_bytes()
    from dual_lm.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        save_folder(
            perturbed(DLMLlamaForCausalLM(tiny_config)), out, tokenizer_path=tmp_path / "missing.json", overwrite=True
        )
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_folder_without_weights_is_a_clear_error(tmp_path):
    from dual_lm.errors import UserError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no weights"):
        check_folder(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        check_folder(tmp_path / "nope")


def _rewrite(folder, rename, drop=(), extra=None):
    from safetensors.torch import save_file

    state = load_file(folder / "model.safetensors")
    state = {rename(k): v for k, v in state.items() if k not in drop} | (extra or {})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_weights_under_the_reference_names_load_as_ours(tiny_config, tmp_path):
    from dual_lm.convert import hf_to_reference_name

    model = perturbed(DLMLlamaForCausalLM(tiny_config))
    model.save_pretrained(tmp_path / "m")
    _rewrite(tmp_path / "m", lambda k: "module._orig_mod." + hf_to_reference_name(k))
    again = DLMLlamaForCausalLM.from_pretrained(tmp_path / "m")
    expected = model.state_dict()
    assert sorted(again.state_dict()) == sorted(expected)
    assert all(torch.equal(v, expected[k]) for k, v in again.state_dict().items())
    again.save_pretrained(tmp_path / "resaved")  # saved under our names, not renamed back
    assert sorted(load_file(tmp_path / "resaved" / "model.safetensors")) == sorted(expected)
    third = DLMLlamaForCausalLM.from_pretrained(tmp_path / "resaved")
    assert all(torch.equal(v, expected[k]) for k, v in third.state_dict().items())


def test_loading_never_fills_a_gap_with_random_weights(tiny_config, tmp_path):
    import dual_lm

    model = perturbed(DLMLlamaForCausalLM(tiny_config))
    model.save_pretrained(tmp_path / "m")
    for cls in ("DLMLlamaForSequenceClassification", "DLMLlamaForQuestionAnswering", "DLMLlamaForMaskedLM"):
        getattr(dual_lm, cls).from_pretrained(tmp_path / "m")  # new task heads and a dropped lm_head are fine
    _rewrite(tmp_path / "m", lambda k: k.replace("lm_head.output", "lm_head.out"))  # a head named differently
    gap = r"missing 2 tensor\(s\): lm_head\.output\.bias, lm_head\.output\.weight; "
    gap += r"unexpected 2 tensor\(s\): lm_head\.out\.bias, lm_head\.out\.weight"
    with pytest.raises(ValueError, match=gap):
        DLMLlamaForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"missing 2 tensor\(s\).*refusing to fill the gap with random weights"):
        dual_lm.DLMLlamaForMaskedLM.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "n")
    _rewrite(tmp_path / "n", lambda k: k, drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        dual_lm.DLMLlamaForTokenClassification.from_pretrained(tmp_path / "n")
