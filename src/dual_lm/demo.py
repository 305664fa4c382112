"""``make demo`` at this stage: convert the reference parity checkpoint and run it in every mode."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from dual_lm.convert import convert_reference
from dual_lm.folder import describe_folder, load_model

DEFAULT_FIXTURE = Path("../shared/reference/parity-tiny")


def _patterns(ids, masked, docs, prefix_length):
    batch = ids.shape[0]
    prefix = torch.full((batch,), prefix_length, dtype=torch.long)
    return {
        "causal": (ids, {}),
        "bidirectional": (masked, {"attention_mode": "bidirectional"}),
        "prefix": (ids, {"prefix_lengths": prefix}),
        "causal_two_documents": (ids, {"document_ids": docs}),
        "bidirectional_two_documents": (masked, {"attention_mode": "bidirectional", "document_ids": docs}),
    }


def run_demo(fixture: Path = DEFAULT_FIXTURE, out_dir: Path = Path("runs/demo/parity-tiny")) -> int:
    """Convert the fixture, check all five attention patterns against the reference logits, show each mode."""
    if not (fixture / "state_dict.bin").is_file():
        print(f"the reference parity fixture is not at {fixture}; nothing to convert.")
        print("Pass --fixture DIR pointing at a folder with config.json, state_dict.bin and expected.safetensors.")
        return 1
    if out_dir.exists():
        shutil.rmtree(out_dir)
    print(f"1. convert-reference {fixture} -> {out_dir}")
    convert_reference(fixture / "config.json", fixture / "state_dict.bin", out_dir)
    print(describe_folder(out_dir))
    model = load_model(out_dir)
    expected = load_file(str(fixture / "expected.safetensors"))
    ids, masked = expected["input_ids"], expected["input_ids_masked"]
    docs = expected["document_ids_two_documents"].long()

    print("\n2. the five attention patterns against the reference implementation's logits")
    print(f"   {'pattern':<30} {'max |ours - reference|':>24}")
    worst = 0.0
    with torch.no_grad():
        for name, (inputs, kwargs) in _patterns(ids, masked, docs, prefix_length=9).items():
            diff = (model(inputs, **kwargs).logits - expected[f"logits_{name}"]).abs().max().item()
            worst = max(worst, diff)
            print(f"   {name:<30} {diff:>24.2e}")

        print("\n3. the model in each mode (token ids; the fixture has no tokenizer)")
        prompt = ids[:1, :9]
        greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, 9:].tolist()
        print(f"   causal generate (KV cache), prompt {prompt[0].tolist()} -> {greedy}")
        prefix = model(ids[:1], prefix_lengths=torch.tensor([9])).logits[0, 8].argmax().item()
        print(f"   prefix mode: first 9 tokens bidirectional, next-token prediction at position 8 -> {prefix}")
        masked_logits = model(masked[:1], attention_mode="bidirectional").logits[0]
        for pos in (masked[0] == 4).nonzero().flatten().tolist():
            guess = masked_logits[pos - 1].argmax().item()
            print(
                f"   masked mode: <mask> at position {pos} read at {pos - 1} -> {guess} (original {ids[0, pos].item()})"
            )
    verdict = "PASS" if worst < 1e-4 else "FAIL"
    print(f"\nparity with the reference: {verdict} (worst difference {worst:.2e}, tolerance 1e-4)")
    return 0 if verdict == "PASS" else 1
