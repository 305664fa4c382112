"""The ``README.md`` model card every model folder carries: Hub front matter, what the model is and
how it was made, and usage snippets for every mode that run against the folder as written.

The first lines a reader sees say that the folder needs ``trust_remote_code=True``: without it
transformers builds its plain ``LlamaForCausalLM``, which has another head, fills that head with
random weights and generates fluent-looking nonsense.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

CARD_FILE = "README.md"
LICENSE = "apache-2.0"  # the published model's and the reference code's terms
TAGS = ("dual-lm", "llama", "masked-diffusion", "mntp", "custom_code")
PROMPT = "The king"  # what the snippets run on


@dataclass(frozen=True)
class CardFacts:
    """What a card says about where the weights came from (None: not known to the writer)."""

    source: str  # one sentence: "Trained with dual-lm ..." / "Converted from ..."
    alpha: float | None = None
    repetitions: int | None = None
    tokens: int | None = None
    validation: dict[str, float] = field(default_factory=dict)  # final val_* figures, nats/token


def model_card(folder: Path, facts: CardFacts, config: dict) -> str:
    """The card's Markdown; ``folder`` is the path the snippets load (the folder's final place)."""
    return "\n".join([_front_matter(), _head(folder.name), _facts(facts, config), _usage(folder), ""])


def _front_matter() -> str:
    tags = "".join(f"\n  - {t}" for t in TAGS)
    return f"---\nlibrary_name: transformers\nlicense: {LICENSE}\npipeline_tag: text-generation\ntags:{tags}\n---\n"


def _head(name: str) -> str:
    return (
        f"# {name}\n\n"
        "**Load it with `trust_remote_code=True`.** Without it transformers builds its plain `LlamaForCausalLM`, "
        "whose head differs from this model's: it fills that head with random weights and generates "
        "fluent-looking nonsense. The folder's own `modeling_dlm_llama.py` is the code that runs.\n\n"
        "A dual-objective language model: one LLaMA-style transformer trained with a mix of autoregressive "
        "and masked-diffusion objectives, usable as a causal LM, as a masked (MNTP) LM, or with prefix "
        "attention. In every mode position i predicts token i+1, so a `<mask>` at i is read at i-1; the "
        "folder's fill-mask pipeline does that for you.\n"
    )


def _facts(facts: CardFacts, config: dict) -> str:
    rows = [("source", facts.source)]
    if facts.alpha is not None:
        rows.append(("alpha (AR share)", f"{facts.alpha:.6g}"))
    if facts.repetitions is not None:
        rows.append(("data repetitions", str(facts.repetitions)))
    if facts.tokens is not None:
        rows.append(("tokens trained", f"{facts.tokens:,}"))
    rows += [(k, f"{v:.4f}") for k, v in sorted(facts.validation.items())]
    rows += [
        (
            "layers / hidden / heads",
            f"{config['num_hidden_layers']} / {config['hidden_size']} / {config['num_attention_heads']}",
        ),
        ("vocabulary / context", f"{config['vocab_size']:,} / {config['max_position_embeddings']:,}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## The model\n\n| | |\n|---|---|\n{table}\n"


def _usage(folder: Path) -> str:
    model_id = repr(str(folder))
    python = f"""import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model_id = {model_id}  # this folder; on the Hub, its repository name
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True).eval()
inputs = tokenizer({PROMPT!r}, return_tensors="pt")

# causal decoding
out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))

# prefix attention: the prompt attends bidirectionally, then cached causal decoding
out = model.generate(**inputs, max_new_tokens=20, do_sample=False, prefix_attention=True)
print(tokenizer.decode(out[0], skip_special_tokens=True))

# masked (MNTP): the folder's fill-mask pipeline reads each <mask> at the position before it
fill = pipeline("fill-mask", model=model_id, trust_remote_code=True)
print(fill("The capital of <mask> is Paris", top_k=3))

# scoring: the causal log-likelihood of a text
with torch.no_grad():
    loss = model(**inputs, labels=inputs["input_ids"]).loss
print(f"perplexity {{loss.exp().item():.2f}}")"""
    command = f"dual-lm generate {shlex.quote(str(folder))} --prompt {shlex.quote(PROMPT)} --max-new-tokens 16"
    shell = "\n".join(
        f"{command} --mode {mode}{extra}" for mode, extra in (("diffusion", " --steps 8"), ("speculative", " --k 4"))
    )
    return (
        "## Usage\n\n```python\n" + python + "\n```\n\n"
        "Diffusion sampling and self-speculative decoding come with the `dual-lm` package:\n\n"
        "```bash\n" + shell + "\n```\n"
    )
