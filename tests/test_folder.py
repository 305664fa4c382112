"""Model folders: Auto classes through remote code in a process without dual_lm, tokenizers, atomic saves."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig

from dual_lm import DLMLlamaForCausalLM
from dual_lm.folder import check_folder, save_folder
from dual_lm.modeling_dlm_llama import AUTO_MAP

FRESH_PROCESS = r"""
import sys, json
sys.modules["dual_lm"] = None          # make `import dual_lm` fail: only the folder's own file may be used
sys.modules["hf_model_llama"] = None
import torch, transformers
folder, auto, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
cls = getattr(transformers, auto)
model = cls.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
roles = (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token, tok.mask_token)
assert roles == ("<s>", "</s>", "<unk>", "<pad>", "<mask>"), roles
assert tok("a b")["input_ids"][0] == 1
with torch.no_grad():
    out = model(ids)
value = out.logits if hasattr(out, "logits") else out.start_logits
print(json.dumps({"class": type(model).__name__, "sum": value.double().sum().item()}))
"""


@pytest.fixture(scope="module")
def folder(tokenizer_51200, tmp_path_factory):
    import dataclasses

    from dual_lm.config import PRESETS, llama_config

    config = llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200), num_labels=3)
    model = DLMLlamaForCausalLM(config)
    return save_folder(model, tmp_path_factory.mktemp("auto") / "model", tokenizer_51200)


def test_config_loads_as_llama_with_auto_map(folder):
    config = LlamaConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.mask_token_id == 4
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP


@pytest.mark.parametrize("auto", sorted(AUTO_MAP))
def test_auto_classes_load_in_fresh_process_without_dual_lm(folder, auto):
    ids = [[1, 20, 30, 40, 50]]
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), auto, json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == AUTO_MAP[auto].split(".")[-1]
    if auto == "AutoModelForCausalLM":
        model = DLMLlamaForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            expected = model(torch.tensor(ids)).logits.double().sum().item()
        assert result["sum"] == pytest.approx(expected, rel=1e-6)


def test_save_folder_replaces_atomically_only_when_allowed(tiny_config, tmp_path):
    from dual_lm.errors import UserError

    out = tmp_path / "m"
    save_folder(DLMLlamaForCausalLM(tiny_config), out)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="refusing to replace"):
        save_folder(DLMLlamaForCausalLM(tiny_config), out)
    assert (out / "model.safetensors").read_bytes() == first
    save_folder(DLMLlamaForCausalLM(tiny_config), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copies left


def test_save_folder_failure_keeps_previous(tiny_config, tmp_path):
    out = tmp_path / "m"
    save_folder(DLMLlamaForCausalLM(tiny_config), out)
    before = (out / "model.safetensors").read_bytes()
    from dual_lm.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        save_folder(DLMLlamaForCausalLM(tiny_config), out, tokenizer_path=tmp_path / "missing.json", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_folder_without_weights_is_a_clear_error(tmp_path):
    from dual_lm.errors import UserError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no weights"):
        check_folder(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        check_folder(tmp_path / "nope")
