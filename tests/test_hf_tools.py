"""The masked mode in transformers' own tools: the fill-mask pipeline of a folder, the model card's
recipe, ``DataCollatorForLanguageModeling(mlm=True)`` labels, and ``DualObjectiveCollator`` under
``Trainer``; on a small trained model, so that right and wrong answers differ."""

import dataclasses
import warnings

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from conftest import sentences
from dual_lm import DLMLlamaForCausalLM, DLMLlamaForMaskedLM, DualObjectiveCollator, MNTPFillMaskPipeline
from dual_lm.cli import main
from dual_lm.config import ObjectiveConfig
from dual_lm.inference.generation import fill_masks
from dual_lm.tokens import MASK_ID
from dual_lm.training.objectives import DualObjective


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """The tiny preset trained for 80 steps (alpha 1/2) on the suite's corpus, exported to a folder."""
    root = tmp_path_factory.mktemp("trained")
    settings = {"data.path": data_dir, "output": root / "run", "data.seq_len": 32, "train.micro_batch_rows": 8,
                "train.global_batch_tokens": 256, "train.steps": 80, "eval.every": 40, "checkpoint.every": 80,
                "optim.lr": 0.01, "objective.alpha": 0.5}  # fmt: skip
    assert main(["train", *[f"{k}={v}" for k, v in settings.items()]]) == 0
    assert main(["export", str(root / "run"), str(root / "model")]) == 0
    return root / "model"


def held_out_masks(tokenizer, count=40):
    """Texts with one single-token word masked, and that word's id, from sentences the model never saw."""
    cases = []
    for text in sentences(30, seed=99):
        words = text.split(" ")
        for i in range(1, len(words)):
            ids = tokenizer(words[i], add_special_tokens=False)["input_ids"]  # the normaliser adds the space
            if len(ids) == 1 and words[i].isalpha():
                cases.append((" ".join([*words[:i], "<mask>", *words[i + 1 :]]), ids[0]))
    return cases[:count]


def card_recipe(model, tokenizer, text):
    """The model card's fill recipe, verbatim in substance: tokenizer(text), read at mask_pos - 1."""
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    mask_pos = (inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<mask>")).nonzero(as_tuple=True)[1].item()
    return logits[0, mask_pos - 1].argmax(-1).item()


def test_pipeline_card_recipe_and_fill_agree_on_every_masked_word(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    masked = DLMLlamaForMaskedLM.from_pretrained(trained).eval()
    fill_mask = pipeline("fill-mask", model=str(trained), trust_remote_code=True)
    assert type(fill_mask).__name__ == "MNTPFillMaskPipeline"
    cases = held_out_masks(tokenizer)
    assert len(cases) == 40
    right = 0
    for text, gold in cases:
        ours = fill_masks(masked, tokenizer, text, top_k=3)[0].candidates
        theirs = fill_mask(text, top_k=3)
        assert [c["token_str"] for c in theirs] == [c[0] for c in ours], text
        assert [c["score"] for c in theirs] == pytest.approx([c[1] for c in ours], abs=1e-6)
        assert card_recipe(masked, tokenizer, text) == theirs[0]["token"], text
        right += theirs[0]["token"] == gold
    assert right >= 12, right  # trained: well above chance (1 in 320); the stock read gets far fewer


def test_pipeline_fills_several_masks_as_fill_does(trained):
    tokenizer = AutoTokenizer.from_pretrained(trained)
    masked = DLMLlamaForMaskedLM.from_pretrained(trained).eval()
    fill_mask = pipeline("fill-mask", model=str(trained), trust_remote_code=True)
    text = "the king <mask> the crown. my lord <mask> us"
    theirs = fill_mask(text, top_k=2)
    ours = fill_masks(masked, tokenizer, text, top_k=2)
    assert len(theirs) == len(ours) == 2
    for row, result in zip(theirs, ours, strict=True):
        assert [(c["token_str"], round(c["score"], 6)) for c in row] == [(t, round(p, 6)) for t, p in result.candidates]


def test_the_stock_pipeline_warns_and_pipeline_class_is_right(trained):
    from transformers import FillMaskPipeline

    tokenizer = AutoTokenizer.from_pretrained(trained)
    masked = DLMLlamaForMaskedLM.from_pretrained(trained).eval()
    text = held_out_masks(tokenizer, 1)[0][0]
    with pytest.warns(UserWarning, match="stock FillMaskPipeline reads the prediction at the <mask>"):
        FillMaskPipeline(model=masked, tokenizer=tokenizer)(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our class: no warning
        right = pipeline("fill-mask", model=masked, tokenizer=tokenizer, pipeline_class=MNTPFillMaskPipeline)(text)
        assert right[0]["token_str"] == fill_masks(masked, tokenizer, text, 1)[0].candidates[0][0]
        masked(**tokenizer(text, return_tensors="pt"))  # a plain call does not warn either


def test_mlm_collator_labels_train_the_mntp_objective(trained):
    """``DataCollatorForLanguageModeling(mlm=True)`` labels (aligned with input_ids): the loss is the
    cross-entropy of logits[:, i-1] against the original token at each masked i."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(trained)
    masked = DLMLlamaForMaskedLM.from_pretrained(trained).eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.3, seed=0)
    batch = collator([tokenizer(t) for t in sentences(8, seed=5)])
    assert (batch["labels"] != -100).sum() > 10
    with torch.no_grad():
        out = masked(**batch)
    rows, cols = (batch["labels"] != -100).nonzero(as_tuple=True)
    assert bool((cols > 0).all())  # <s> is special: never masked, so every label has a position before it
    by_hand = torch.nn.functional.cross_entropy(out.logits[rows, cols - 1], batch["labels"][rows, cols])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    aligned = masked(batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=batch["labels"])
    assert aligned.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)  # shift_labels: no shift applied


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_dual_objective_collator_loss_equals_dual_objective(trained, alpha):
    model = DLMLlamaForCausalLM.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    rows = [tokenizer(t)["input_ids"] for t in sentences(40, seed=7)]
    rows = [r[:17] for r in rows if len(r) >= 17][:8]  # equal lengths: packed rows, as DualObjective sees them
    assert len(rows) == 8
    batch = DualObjectiveCollator(alpha=alpha, seed=3)(rows)
    ar_rows = batch["row_causal"]
    assert int(ar_rows.sum()) == {0.0: 0, 0.5: 4, 1.0: 8}[alpha]
    inputs = torch.tensor(rows)[:, :-1]
    targets = torch.tensor(rows)[:, 1:]
    replay = (batch["input_ids"] == MASK_ID) & ~ar_rows[:, None]
    objective = DualObjective(model, dataclasses.replace(ObjectiveConfig(), z_loss=0.0, ar_weight=2.0))
    with torch.no_grad():
        expected, _ = objective(inputs, targets, torch.zeros_like(inputs), ar_rows, replay=replay)
        got = model(**batch).loss
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    if alpha < 1:
        md = ~ar_rows
        assert bool((batch["label_weights"][md] >= 1).all()) and bool(replay[md].any(1).all())


def test_dual_objective_collator_under_trainer(trained, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = DLMLlamaForCausalLM.from_pretrained(trained)
    stream = [t for text in sentences(64, seed=11) for t in tokenizer(text)["input_ids"]]
    texts = Dataset.from_dict({"input_ids": [[1, *stream[i : i + 24]] for i in range(0, len(stream) - 24, 24)][:48]})
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=texts, data_collator=DualObjectiveCollator(0.5, seed=0))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(0 < v < 30 for v in losses) and result.training_loss > 0


def test_dual_objective_collator_refuses_bad_settings():
    with pytest.raises(ValueError, match="alpha must lie in"):
        DualObjectiveCollator(alpha=1.5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        DualObjectiveCollator(alpha=0.5)([[1]])
    with pytest.raises(ValueError, match=r"needs examples of one length .* got lengths \[3, 5\]"):
        DualObjectiveCollator(alpha=0.5)([[1, 20, 21], [1, 20, 21, 22, 23]])


# ---------------------------------------------------------------------------- --device and --dtype


def test_inference_commands_take_device_and_dtype(trained, tmp_path, monkeypatch):
    from dual_lm import folder as folder_module
    from hostile import run_cli

    loaded = []
    load = folder_module.load_model
    monkeypatch.setattr(folder_module, "load_model", lambda f: loaded.append(f) or load(f))
    (tmp_path / "s.jsonl").write_text('{"context": "the king", "continuation": " loves us"}\n')
    commands = {
        "fill": ["fill", trained, "--text", "the king <mask> the crown"],
        "generate": ["generate", trained, "--prompt", "the king", "--max-new-tokens", "4"],
        "score": ["score", trained, tmp_path / "s.jsonl"],
    }
    for name, argv in commands.items():
        plain = run_cli(argv)
        half = run_cli([*argv, "--device", "auto", "--dtype", "bfloat16"])
        assert plain.code == half.code == 0, (name, plain.err, half.err)
        if name == "fill":  # the same top candidate in bf16; the probabilities differ in the last digits
            assert plain.out.split("'")[1] == half.out.split("'")[1]
        if name == "score":
            first, second = (float(o.out.split('"logprob": ')[1].split(",")[0]) for o in (plain, half))
            assert first != second and abs(first - second) < 0.2  # bf16 really ran
    assert len(loaded) == 6


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--device", "cuda"], r"argument --device: device 'cuda': CUDA is not available"),
        (["--device", "cuda:3"], r"argument --device: device 'cuda:3': CUDA is not available"),
        (["--device", "mps"], r"argument --device: device 'mps': MPS is not available"),
        (["--device", "tpu"], r"argument --device: unknown device 'tpu'.*use cpu, cuda, cuda:N, mps or auto"),
        (["--device", "meta"], r"argument --device: device 'meta' is not supported"),
        (["--device", "cpu:1"], r"argument --device: device 'cpu:1': there is one CPU device"),
        (["--dtype", "float8"], r"argument --dtype: choose one of float32, bfloat16, float16, auto, got 'float8'"),
    ],
)
@pytest.mark.parametrize("command", ["fill", "generate", "score", "eval"])
def test_a_device_or_dtype_that_is_not_there_is_one_line(trained, tmp_path, command, extra, pattern):
    from hostile import refuses

    if extra[1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rest = {"fill": ["--text", "a <mask>"], "generate": ["--prompt", "a"], "score": [tmp_path / "s.jsonl"],
            "eval": ["--tasks", "arc_easy"]}[command]  # fmt: skip
    refuses([command, trained, *rest, *extra], command, pattern, trained, tmp_path)


# ---------------------------------------------------------------------------- the folder's model card


CARD_RUNNER = r"""
import sys
sys.modules["dual_lm"] = None  # the card's Python needs transformers and the folder only
exec(compile(sys.argv[1], "README.md", "exec"), {"__name__": "__main__"})
"""


def test_exported_folder_carries_a_card_whose_snippets_run(trained, capsys):
    import json
    import re
    import shlex
    import subprocess
    import sys

    import yaml

    from hostile import run_cli

    text = (trained / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["license"] == "apache-2.0"
    assert front["pipeline_tag"] == "text-generation" and "dual-lm" in front["tags"]
    first = [line for line in text.split("---\n", 2)[2].splitlines() if line][1]  # the first line after the title
    assert "trust_remote_code=True" in first and "random weights" in first
    assert "| alpha (AR share) | 0.5 |" in text and "| data repetitions | 1 |" in text
    assert "| tokens trained | 20,480 |" in text and re.search(r"\| val_ar_nll \| \d+\.\d{4} \|", text)
    generation = json.loads((trained / "generation_config.json").read_text())
    context = json.loads((trained / "config.json").read_text())["max_position_embeddings"]
    assert generation["max_length"] == context and generation["do_sample"] is False
    python = text.split("```python\n")[1].split("```")[0]
    proc = subprocess.run(
        [sys.executable, "-c", CARD_RUNNER, python], capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("The king") and lines[1].startswith("The king") and "'score'" in lines[2]
    assert re.fullmatch(r"perplexity \d+\.\d\d", lines[3])
    for command in text.split("```bash\n")[1].split("```")[0].splitlines():
        argv = shlex.split(command)
        assert argv[0] == "dual-lm"
        outcome = run_cli(argv[1:])
        assert outcome.code == 0 and outcome.out.startswith("The king"), (command, outcome.err)


def test_a_converted_folder_carries_a_card(converted):
    text = (converted / "README.md").read_text()
    assert "Converted from the reference trainer's checkpoint state_dict.bin" in text
    assert "alpha" not in text.split("## Usage")[0].lower().split("| source |")[1]  # unknown: not claimed


# ---------------------------------------------------------------------------- the CLI's finish


def test_version_info_json_and_progress_bars(trained, tmp_path):
    import json

    import dual_lm
    from hostile import run_cli

    assert run_cli(["--version"]).out == f"dual-lm {dual_lm.__version__}\n"
    record = json.loads(run_cli(["info", trained, "--json"]).out)
    config = json.loads((trained / "config.json").read_text())
    assert record["config"]["num_hidden_layers"] == 2 and record["config"]["vocab_size"] == config["vocab_size"]
    assert record["parameters"]["total"] == record["parameters"]["non_embedding"] + record["parameters"]["embedding"]
    assert record["tokenizer"] is True and record["classes"]["AutoModelForMaskedLM"] == "DLMLlamaForMaskedLM"
    assert record["attention_modes"] == ["causal", "bidirectional", "prefix"]
    (tmp_path / "s.jsonl").write_text('{"context": "the king", "continuation": " loves us"}\n' * 3)
    scored = run_cli(["score", trained, tmp_path / "s.jsonl", "--mode", "masked", "--mask-n", "2"])
    assert scored.code == 0 and "scoring: 100%" in scored.err and "[masked n=2] 3 requests" in scored.err
    (tmp_path / "p.txt").write_text("the king\nmy lord\n")
    generated = run_cli(["generate", trained, "--prompts", tmp_path / "p.txt", "--max-new-tokens", "3"])
    assert generated.code == 0 and "generating: 100%" in generated.err and len(generated.out.splitlines()) == 2
