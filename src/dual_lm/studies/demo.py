"""``make demo``: the main job end to end on this CPU.

1. (when the reference fixture is there: tests/fixtures/reference) check parity with the reference logits;
2. train the tokenizer recipe on the embedded Shakespeare corpus and prepare token shards;
3. train a small dual model (configs/tiny.yaml) with a progress bar, resumable if interrupted;
4. export a model folder and use it in every mode: a causal continuation, a prefix-mode
   continuation, a ``<mask>`` fill, and validation perplexity.

Every stage is skipped when its output already exists, so a second ``make demo`` is quick and an
interrupted one continues where it stopped.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from dual_lm.config import load_train_config
from dual_lm.tokens import MASK_ID

DEFAULT_FIXTURE = Path("tests/fixtures/reference/parity-tiny")  # the in-repository copy
DEMO_CONFIG = Path("configs/tiny.yaml")
PROMPTS = ["ROMEO.\nBut soft, what light", "KING.\nMy lord, the"]
FILLS = ["To be, or not to be, that is the question", "Now is the winter of our discontent"]


def parity_check(fixture: Path) -> bool:
    """Convert the reference parity checkpoint (into a temporary folder: the demo keeps nothing of it)
    and compare all five attention patterns (1e-4)."""
    from dual_lm.convert import convert_reference
    from dual_lm.folder import load_model

    with tempfile.TemporaryDirectory(prefix="dual-lm-parity-") as tmp:
        out_dir = convert_reference(fixture / "config.json", fixture / "state_dict.bin", Path(tmp) / "parity-tiny")
        model = load_model(out_dir)
    expected = load_file(str(fixture / "expected.safetensors"))
    ids, masked = expected["input_ids"], expected["input_ids_masked"]
    docs = expected["document_ids_two_documents"].long()
    patterns = {
        "causal": (ids, {}),
        "bidirectional": (masked, {"attention_mode": "bidirectional"}),
        "prefix": (ids, {"prefix_lengths": torch.tensor([9, 9])}),
        "causal_two_documents": (ids, {"document_ids": docs}),
        "bidirectional_two_documents": (masked, {"attention_mode": "bidirectional", "document_ids": docs}),
    }
    worst = 0.0
    with torch.no_grad():
        for name, (inputs, kwargs) in patterns.items():
            worst = max(worst, (model(inputs, **kwargs).logits - expected[f"logits_{name}"]).abs().max().item())
    ok = worst < 1e-4
    verdict = "PASS" if ok else "FAIL"
    print(f"   five attention patterns vs the reference logits: worst difference {worst:.1e} -> {verdict}")
    return ok


def prepare(workdir: Path) -> Path:
    """Tokenizer and shards for the embedded corpus (skipped when already there)."""
    from dual_lm.data.corpus import ReadStats, expand_sources, iter_documents
    from dual_lm.data.prepare import PrepareRequest, prepare_data
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    tokenizer = workdir / "tokenizer.json"
    if not tokenizer.is_file():
        stats = ReadStats()
        trained = train_tokenizer(iter_documents(expand_sources(["corpus:shakespeare"]), stats=stats), 4096)
        save_tokenizer(trained, tokenizer)
        print(f"   trained a 4,096-token BPE tokenizer on {stats.documents} acts of 42 plays and poems")
    data = workdir / "data"
    manifest = prepare_data(PrepareRequest(str(tokenizer), ("corpus:shakespeare",), str(data), 30_000, 1))
    print(f"   {manifest['train_tokens']:,} training and {manifest['valid']['tokens']:,} validation tokens in {data}")
    return data


def train(workdir: Path, data: Path):
    """Train (or resume, or skip when finished) the demo run; returns its config."""
    from dual_lm.training.checkpoint import list_checkpoints
    from dual_lm.training.train import run_training

    cfg = load_train_config(DEMO_CONFIG, [f"output={workdir / 'run'}", f"data.path={data}"])
    done = list_checkpoints(Path(cfg.output))
    if done and done[-1][0] == cfg.train.steps:
        print(f"   already trained ({cfg.train.steps} steps in {cfg.output}); delete it to train again")
    else:
        run_training(cfg, resume=bool(done))
    return cfg


def show(folder: Path, cfg, device: str = "cpu", dtype: str = "float32") -> None:
    """Use the exported model in every mode, on ``device`` in ``dtype``."""
    from dual_lm.folder import load_folder
    from dual_lm.inference.generation import generate_text
    from dual_lm.studies.heldout import scoring_gap
    from dual_lm.training.runlog import final_metrics

    model, tokenizer = load_folder(folder, device, dtype)
    torch.manual_seed(0)
    sampling = {"do_sample": True, "top_p": 0.9, "temperature": 0.8}
    with torch.no_grad():
        for prompt in PROMPTS:
            for mode in ("causal", "prefix"):
                print(f"   [{mode:>6}] {prompt!r} ->{generate_text(model, tokenizer, prompt, mode, 40, **sampling)!r}")
        prompt = PROMPTS[0]
        text = generate_text(model, tokenizer, prompt, "diffusion", 24, steps=12, temperature=0.7)
        print(f"   [diffusion, 24 tokens in 12 passes] {prompt!r} ->{text!r}")
        text, result = generate_text(model, tokenizer, prompt, "speculative", 40, k=1)  # the fastest k on a CPU
        print(f"   [speculative, greedy = causal greedy] {prompt!r} ->{text!r}")
        print(f"   {result.stats_line(1)}")
        for sentence in FILLS:
            _fill(model, tokenizer, sentence)
    gap = scoring_gap(model, cfg.data.path, 64, cfg.data.seq_len)
    print(
        f"   held-out continuations: {gap['causal_nll']:.3f} nats/token scored causally, "
        f"{gap['prefix_nll']:.3f} with prefix attention over the context ({gap['windows']} windows)"
    )
    last = final_metrics(Path(cfg.output))[0]
    ar, md = last["val_ar_nll"], last["val_md_loss"]
    print(f"   validation perplexity (causal): {math.exp(ar):.1f}  (AR {ar:.3f} nats/token, MD loss {md:.3f})")


def _fill(model, tokenizer, sentence: str) -> None:
    """Mask one word of ``sentence`` and read it from the position before the mask (MNTP)."""
    ids = tokenizer(sentence, return_tensors="pt")["input_ids"].to(model.device)
    position = ids.shape[1] // 2
    truth = tokenizer.decode(ids[0, position])
    masked = ids.clone()
    masked[0, position] = MASK_ID
    logits = model(masked, attention_mode="bidirectional").logits[0, position - 1]
    top = torch.softmax(logits.float(), -1).topk(5)
    shown = f"{tokenizer.decode(ids[0, 1:position])} [___] {tokenizer.decode(ids[0, position + 1 :]).lstrip()}"
    guesses = ", ".join(f"{tokenizer.decode(i)!r} {p:.2f}" for p, i in zip(top.values, top.indices, strict=True))
    print(f"   [  fill] {shown!r}: {guesses} (truth {truth!r})")


def run_demo(
    fixture: Path = DEFAULT_FIXTURE, workdir: Path = Path("runs/demo"), device: str = "cpu", dtype: str = "float32"
) -> int:
    """The whole main job (its inference step on ``device`` in ``dtype``); returns the process exit status."""
    print("0. parity with the reference implementation")
    if (fixture / "state_dict.bin").is_file():
        if not parity_check(fixture):
            return 1
    else:
        print(f"   skipped: no reference fixture at {fixture}")
    print("1. tokenizer and token shards from the embedded corpus (corpus:shakespeare)")
    data = prepare(workdir)
    print(f"2. training a dual model ({DEMO_CONFIG})")
    cfg = train(workdir, data)
    print("3. export")
    from dual_lm.training.checkpoint import branch_name, export_checkpoint

    folder = export_checkpoint(
        cfg.output, workdir / branch_name(cfg.objective.alpha, cfg.data.repetitions), overwrite=True
    )  # a rerun of the demo replaces its own model folder
    print(f"   model folder {folder} (dual-lm info {folder})")
    print("4. the model in every mode")
    show(folder, cfg, device, dtype)
    from dual_lm.studies.plot import plot_run

    print(f"   loss curves: {plot_run(cfg.output)}")
    return 0
