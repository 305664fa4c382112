"""The five usage snippets of the public model card run verbatim against a local model folder.

The snippets below are the card's, character for character, except that ``model_id`` points at
a folder holding a random 51,200-vocabulary ``tiny`` model with the published tokenizer.
"""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import PRESETS, llama_config
from dual_lm.folder import save_folder
from weights import perturbed

LOADING = """
from transformers import AutoTokenizer, LlamaConfig
from hf_model_llama.modeling_dlm_llama import DLMLlamaForCausalLM
model_id = "ltg/dual-lm-470m"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
config = LlamaConfig.from_pretrained(model_id)
model = DLMLlamaForCausalLM.from_pretrained(model_id, config=config, trust_remote_code=True)
"""

GENERATION = """
import torch
from transformers import AutoTokenizer, LlamaConfig
from hf_model_llama.modeling_dlm_llama import DLMLlamaForCausalLM
model_id = "ltg/dual-lm-470m"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
config = LlamaConfig.from_pretrained(model_id)
model = DLMLlamaForCausalLM.from_pretrained(model_id, config=config, trust_remote_code=True)
model.eval()
prompt = "The history of artificial intelligence begins with"
inputs = tokenizer(prompt, return_tensors="pt")
with torch.no_grad():
    outputs = model.generate(
        **inputs,
        max_new_tokens=100,
        do_sample=True,
        top_p=0.95,
        temperature=0.8,
    )
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
"""

MASKED = """
import torch
from transformers import AutoTokenizer, LlamaConfig
from hf_model_llama.modeling_dlm_llama import DLMLlamaForMaskedLM
model_id = "ltg/dual-lm-470m"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
config = LlamaConfig.from_pretrained(model_id)
model = DLMLlamaForMaskedLM.from_pretrained(model_id, config=config, trust_remote_code=True)
model.eval()
# Mask token id
mask_id = tokenizer.convert_tokens_to_ids("<mask>")
# Predict masked tokens with bidirectional context
text = "The capital of <mask> is Paris"
inputs = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
# The model uses MNTP: prediction at position i is for token i+1
# Find the mask position and get the prediction from position before it
mask_pos = (inputs["input_ids"] == mask_id).nonzero(as_tuple=True)[1].item()
predicted_id = outputs.logits[0, mask_pos - 1].argmax(dim=-1)
print(f"Predicted: {tokenizer.decode(predicted_id)}")
"""

PERPLEXITY = """
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig
from hf_model_llama.modeling_dlm_llama import DLMLlamaForCausalLM
model_id = "ltg/dual-lm-470m"
tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
config = LlamaConfig.from_pretrained(model_id)
model = DLMLlamaForCausalLM.from_pretrained(model_id, config=config, trust_remote_code=True)
model.eval()
text = "Language models predict the next token in a sequence."
inputs = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs, labels=inputs["input_ids"])
print(f"Loss (NLL per token): {outputs.loss.item():.4f}")
print(f"Perplexity: {torch.exp(outputs.loss).item():.2f}")
"""

BRANCH = """
from transformers import LlamaConfig
from hf_model_llama.modeling_dlm_llama import DLMLlamaForCausalLM
# Load the data-constrained model (α=3/4, 32 repetitions)
model_id = "ltg/dual-lm-470m"
config = LlamaConfig.from_pretrained(model_id, revision="alpha_0.750_n-reps=32")
model = DLMLlamaForCausalLM.from_pretrained(
    model_id,
    revision="alpha_0.750_n-reps=32",
    config=config,
    trust_remote_code=True,
)
"""

SNIPPETS = {"loading": LOADING, "generation": GENERATION, "masked": MASKED, "perplexity": PERPLEXITY, "branch": BRANCH}


@pytest.fixture(scope="module")
def card_folder(tokenizer_51200, tmp_path_factory):
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=51200)
    model = perturbed(DLMLlamaForCausalLM(llama_config(shape)))
    return save_folder(model, tmp_path_factory.mktemp("card") / "dual-lm-470m", tokenizer_51200)


# Runs every snippet in one fresh process, each in its own namespace, and reports what each printed.
RUNNER = r"""
import contextlib, io, json, sys
printed = {}
for name, code in json.loads(sys.argv[1]).items():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    printed[name] = out.getvalue()
print(json.dumps(printed))
"""


@pytest.fixture(scope="module")
def printed(card_folder):
    codes = {}
    for name, snippet in SNIPPETS.items():
        codes[name] = snippet.replace('"ltg/dual-lm-470m"', repr(str(card_folder)))
        assert codes[name].count(repr(str(card_folder))) == 1
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(codes)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(SNIPPETS))
def test_model_card_snippet_runs_verbatim(printed, card_folder, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(card_folder)
    model = DLMLlamaForCausalLM.from_pretrained(card_folder).eval()
    if name == "perplexity":
        ids = tokenizer("Language models predict the next token in a sequence.", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
        assert printed[name] == f"Loss (NLL per token): {loss:.4f}\nPerplexity: {math.exp(loss):.2f}\n"
    elif name == "masked":
        ids = tokenizer("The capital of <mask> is Paris", return_tensors="pt")["input_ids"]
        at = ids[0].tolist().index(tokenizer.mask_token_id)
        with torch.no_grad():
            logits = model(ids, attention_mode="bidirectional").logits
        assert printed[name] == f"Predicted: {tokenizer.decode(logits[0, at - 1].argmax())}\n"
    elif name == "generation":
        text = printed[name]
        assert text.startswith("The history of artificial intelligence begins with") and len(text) > 60
    else:
        assert printed[name] == ""
