"""Hostile inputs for the using side of the CLI (issue 11): every numeric option, output paths checked
before the work, plots of torn metrics, eval-compare inputs, lm-eval model args, sampler inputs, and
sweeps rerun with other evaluation options or killed during a cell's evaluation.

Every refusal goes through ``hostile.refuses``: exit 2, one ``dual-lm CMD: error:`` line naming the
problem, no traceback, every pre-existing file byte-identical. Numeric options must fail in the parser:
their cases point FOLDER (or the config, the inputs) at paths that do not exist, so only a refusal by
the parser can name the option. Output checks must come before any model loads: their cases point
FOLDER at a missing path too, so a check made after loading would name the folder instead.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import sentences
from dual_lm import DLMLlamaForCausalLM, ownership
from dual_lm.config import PRESETS, llama_config
from dual_lm.studies.sweep import EVAL_KEYS
from hostile import refuses, run_cli, snapshot
from test_sweep import tiny_sweep_overrides

NOWHERE = "no-such-folder"  # FOLDER for cases that must fail before any model is looked at
SHAPE = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64)  # vocab 512, context 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny perturbed model folder with a 320-token tokenizer (context 64)."""
    from dual_lm.folder import save_folder
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("hostile-cli")
    save_tokenizer(train_tokenizer(iter(sentences(200, 1)), vocab_size=320), root / "tok.json")
    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_folder(model, root / "model", root / "tok.json")


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """The inputs and bystanders the cases refer to by name (``{name}`` in an argv)."""
    made = {"tmp": tmp_path}
    made["dir"] = tmp_path / "a-folder"
    made["dir"].mkdir()
    (made["dir"] / "keep.txt").write_text("a user's file\n")
    made["user_json"] = tmp_path / "notes.json"
    made["user_json"].write_text('{"mine": true}\n')
    made["user_png"] = tmp_path / "photo.png"
    made["user_png"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # a PNG dual-lm did not draw
    made["user_jsonl"] = tmp_path / "notes.jsonl"
    made["user_jsonl"].write_text('{"line": 1}\n')
    made["prompts"] = tmp_path / "prompts.jsonl"  # shaped like generations: only `sources` protects it
    made["prompts"].write_text('{"prompt": "the king", "text": " loves"}\n{"prompt": "a fool", "text": ""}\n')
    made["score"] = tmp_path / "score.jsonl"
    made["score"].write_text('{"text": "the king loves him"}\n')
    made["run"] = tmp_path / "run"
    made["run"].mkdir()
    records = [{"step": s, "tokens": 128 * s, "ar_nll": 6.0 - s / 4, "md_loss": 7.0 - s / 4} for s in (1, 2, 3)]
    (made["run"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    made["results"] = tmp_path / "results.json"
    made["results"].write_text(json.dumps(results_record()))
    made["model_dir"] = tmp_path / "model-folder"  # recognised as a model folder by its markers
    made["model_dir"].mkdir()
    (made["model_dir"] / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_dlm_llama.X"}}))
    (made["model_dir"] / "modeling_dlm_llama.py").write_text("# modeling\n")
    return made


def results_record(name: str = "m") -> dict:
    metrics = {"acc": 60.0, "acc_norm": 61.0, "chance": 50.0, "normalized_acc": 20.0, "normalized_acc_norm": 22.0}
    return {
        "format": "dual-lm-eval/1",
        "model": {"name": name},
        "mode": "causal",
        "tasks": {"piqa": dict(metrics)},
        "average": dict(metrics),
    }


def expand(argv: list, files: dict[str, Path]) -> list[str]:
    return [str(a).format(**{k: str(v) for k, v in files.items()}) for a in argv]


def no_leftovers(root: Path) -> None:
    """No temporary or staging file of an atomic write is left anywhere under ``root``."""
    stray = [p for p in root.rglob(".*") if ".tmp" in p.name]
    assert not stray, stray


# ----------------------------------------------------------------------------- numeric options

SCORE = ["score", NOWHERE, "{score}"]
GENERATE = ["generate", NOWHERE, "--prompt", "hi"]
EVAL = ["eval", NOWHERE, "--tasks", "piqa"]
SWEEP = ["sweep", "no-such.yaml", "--alphas", "1", "--repetitions", "1"]
RECOMMEND = ["recommend-alpha"]

NUMERIC = [
    ("score-stride-0", [*SCORE, "--stride", "0"], "score", r"--stride: must be >= 1, got 0"),
    ("score-window-0", [*SCORE, "--window", "0"], "score", r"--window: must be >= 2, got 0"),
    ("score-window-1", [*SCORE, "--window", "1"], "score", r"--window: must be >= 2"),
    ("score-mask-n-0", [*SCORE, "--mask-n", "0"], "score", r"--mask-n: must be >= 1"),
    ("score-samples-1", [*SCORE, "--mode", "md-bound", "--samples", "1"], "score", r"--samples: must be >= 2"),
    ("score-batch-size-0", [*SCORE, "--batch-size", "0"], "score", r"--batch-size: must be >= 1"),
    ("score-seed-negative", [*SCORE, "--seed", "-1"], "score", r"--seed: must be in \[0, "),
    ("score-stride-word", [*SCORE, "--stride", "half"], "score", r"--stride: expected an integer, got 'half'"),
    ("generate-max-new-0", [*GENERATE, "--max-new-tokens", "0"], "generate", r"--max-new-tokens: must be >= 1"),
    ("generate-max-new-float", [*GENERATE, "--max-new-tokens", "1e3"], "generate", r"--max-new-tokens: expected an"),
    ("generate-k-0", [*GENERATE, "--mode", "speculative", "--k", "0"], "generate", r"--k: must be in \[1, 64\]"),
    ("generate-k-65", [*GENERATE, "--mode", "speculative", "--k", "65"], "generate", r"--k: must be in \[1, 64\]"),
    ("generate-steps-0", [*GENERATE, "--mode", "diffusion", "--steps", "0"], "generate", r"--steps: must be >= 1"),
    ("generate-block-0", [*GENERATE, "--mode", "diffusion", "--block-length", "0"], "generate", r"--block-length"),
    ("generate-temp-nan", [*GENERATE, "--temperature", "nan"], "generate", r"--temperature: must be a finite number"),
    (
        "generate-diffusion-temp-nan",
        [*GENERATE, "--mode", "diffusion", "--temperature", "nan"],
        "generate",
        r"--temperature: must be a finite number >= 0, got nan",
    ),
    (
        "generate-speculative-temp-inf",
        [*GENERATE, "--mode", "speculative", "--temperature", "inf"],
        "generate",
        r"--temperature: must be a finite number >= 0, got inf",
    ),
    ("generate-temp-negative", [*GENERATE, "--temperature", "-0.5"], "generate", r"--temperature: must be"),
    ("generate-top-p-0", [*GENERATE, "--top-p", "0"], "generate", r"--top-p: must be a finite number in \(0, 1\]"),
    ("generate-top-p-1.5", [*GENERATE, "--top-p", "1.5"], "generate", r"--top-p: must be a finite number in \(0"),
    ("generate-top-p-nan", [*GENERATE, "--top-p", "nan"], "generate", r"--top-p: must be a finite number"),
    ("generate-top-k-negative", [*GENERATE, "--top-k", "-1"], "generate", r"--top-k: must be >= 0, got -1"),
    ("generate-batch-size-0", [*GENERATE, "--batch-size", "0"], "generate", r"--batch-size: must be >= 1"),
    (
        "fill-candidates-0",
        ["fill", NOWHERE, "--text", "a <mask>", "--candidates", "0"],
        "fill",
        r"--candidates: must be >= 1",
    ),
    ("eval-limit-0", [*EVAL, "--limit", "0"], "eval", r"--limit: must be >= 1, got 0"),
    ("eval-mask-n-0", [*EVAL, "--mode", "masked", "--mask-n", "0"], "eval", r"--mask-n: must be >= 1"),
    ("eval-batch-size-negative", [*EVAL, "--batch-size", "-3"], "eval", r"--batch-size: must be >= 1, got -3"),
    ("sweep-nproc-0", [*SWEEP, "--nproc", "0"], "sweep", r"--nproc: must be >= 1"),
    ("sweep-windows-negative", [*SWEEP, "--windows", "-1"], "sweep", r"--windows: must be >= 0"),
    ("sweep-limit-0", [*SWEEP, "--tasks", "piqa", "--limit", "0"], "sweep", r"--limit: must be >= 1"),
    ("recommend-reps-nan", [*RECOMMEND, "--repetitions", "nan"], "recommend-alpha", r"--repetitions: .*got nan"),
    ("recommend-reps-inf", [*RECOMMEND, "--repetitions", "inf"], "recommend-alpha", r"--repetitions: .*got inf"),
    ("recommend-reps-half", [*RECOMMEND, "--repetitions", "0.5"], "recommend-alpha", r"--repetitions: .*>= 1"),
    (
        "recommend-unique-0",
        [*RECOMMEND, "--unique-tokens", "0", "--budget-tokens", "10"],
        "recommend-alpha",
        r"--unique-tokens: must be >= 1",
    ),
    (
        "recommend-budget-negative",
        [*RECOMMEND, "--unique-tokens", "10", "--budget-tokens", "-5"],
        "recommend-alpha",
        r"--budget-tokens: must be >= 1",
    ),
    (
        "train-tokenizer-vocab-0",
        ["train-tokenizer", "--input", "no-such.txt", "--vocab-size", "0", "{tmp}/tok.json"],
        "train-tokenizer",
        r"--vocab-size: must be >= 272, got 0",
    ),
    (
        "train-tokenizer-vocab-100",
        ["train-tokenizer", "--input", "no-such.txt", "--vocab-size", "100", "{tmp}/tok.json"],
        "train-tokenizer",
        r"--vocab-size: must be >= 272",
    ),
    (
        "prepare-valid-negative",
        ["prepare-data", "--tokenizer", "no.json", "--input", "no.txt", "--output", "{tmp}/d", "--valid-tokens", "-1"],
        "prepare-data",
        r"--valid-tokens: must be >= 0",
    ),
    (
        "prepare-shards-0",
        ["prepare-data", "--tokenizer", "no.json", "--input", "no.txt", "--output", "{tmp}/d", "--num-shards", "0"],
        "prepare-data",
        r"--num-shards: must be >= 1",
    ),
]


@pytest.mark.parametrize(("argv", "command", "pattern"), [c[1:] for c in NUMERIC], ids=[c[0] for c in NUMERIC])
def test_numeric_options_are_refused_by_the_parser(files, argv, command, pattern):
    start = time.perf_counter()
    refuses(expand(argv, files), command, pattern, files["tmp"])
    assert time.perf_counter() - start < 2  # the parser, not a model load
    assert not (files["tmp"] / "tok.json").exists() and not (files["tmp"] / "d").exists()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        ([], r"give --repetitions R, or both --unique-tokens and --budget-tokens"),
        (["--unique-tokens", "10"], r"or both --unique-tokens and --budget-tokens"),
        (["--repetitions", "4", "--budget-tokens", "10"], r"not both ways"),
    ],
    ids=["neither", "half-a-budget", "both-ways"],
)
def test_recommend_alpha_needs_one_way_of_giving_r(argv, pattern, tmp_path):
    refuses(["recommend-alpha", *argv], "recommend-alpha", pattern, tmp_path)


def test_recommend_alpha_library_refuses_nan_and_inf():
    from dual_lm.training.recommend import recommend_alpha, repetitions_from_budget

    for bad in (math.nan, math.inf, 0.5):
        with pytest.raises(ValueError, match="finite number >= 1"):
            recommend_alpha(bad)
    with pytest.raises(ValueError, match="budget_tokens must be a finite number > 0"):
        repetitions_from_budget(10, math.inf)
    assert recommend_alpha(128)[0] == pytest.approx(0.125)


# ----------------------------------------------------------------------------- outputs checked first

OUTPUTS = [
    ("eval-output-folder", [*EVAL, "--output", "{dir}"], "eval", r"results file .*a-folder: it is a folder"),
    ("eval-output-missing-parent", [*EVAL, "--output", "{tmp}/new/r.json"], "eval", r"folder .*new does not exist"),
    ("eval-output-parent-is-file", [*EVAL, "--output", "{user_json}/r.json"], "eval", r"notes.json is a file, not"),
    ("eval-output-user-file", [*EVAL, "--output", "{user_json}"], "eval", r"notes.json: it exists and is a file"),
    (
        "generate-output-folder",
        ["generate", NOWHERE, "--prompts", "{prompts}", "--output", "{dir}"],
        "generate",
        r"generations file .*a-folder: it is a folder",
    ),
    (
        "generate-output-missing-parent",
        ["generate", NOWHERE, "--prompts", "{prompts}", "--output", "{tmp}/new/g.jsonl"],
        "generate",
        r"folder .*new does not exist",
    ),
    (
        "generate-output-user-file",
        ["generate", NOWHERE, "--prompts", "{prompts}", "--output", "{user_jsonl}"],
        "generate",
        r"notes.jsonl: it exists and is a file",
    ),
    (
        "generate-output-is-the-prompts",
        ["generate", NOWHERE, "--prompts", "{prompts}", "--output", "{prompts}"],
        "generate",
        r"it is the input .*prompts.jsonl itself",
    ),
    (
        "generate-output-without-prompts",
        ["generate", NOWHERE, "--prompt", "hi", "--output", "{tmp}/g.jsonl"],
        "generate",
        r"--output applies to --prompts FILE only",
    ),
    ("plot-output-folder", ["plot", "{run}", "--output", "{dir}"], "plot", r"dual-lm plot .*a-folder: it is a folder"),
    ("plot-output-user-png", ["plot", "{run}", "--output", "{user_png}"], "plot", r"photo.png: it exists and is a"),
    ("plot-output-missing-parent", ["plot", "{run}", "--output", "{tmp}/new/l.png"], "plot", r"new does not exist"),
    (
        "plot-output-is-the-metrics",
        ["plot", "{run}", "--output", "{run}/metrics.jsonl"],
        "plot",
        r"it is the input .*metrics.jsonl itself",
    ),
    ("plot-missing-run", ["plot", "{tmp}/no-run"], "plot", r"run folder .*no-run does not exist"),
    (
        "eval-compare-output-folder",
        ["eval-compare", "{results}", "--output", "{dir}"],
        "eval-compare",
        r"a-folder: it is a folder",
    ),
    (
        "eval-compare-output-user-png",
        ["eval-compare", "{results}", "--output", "{user_png}"],
        "eval-compare",
        r"photo.png: it exists and is a file",
    ),
    (
        "eval-compare-output-is-an-input",
        ["eval-compare", "{results}", "--output", "{results}"],
        "eval-compare",
        r"it is the input .*results.json itself",
    ),
]


@pytest.mark.parametrize(("argv", "command", "pattern"), [c[1:] for c in OUTPUTS], ids=[c[0] for c in OUTPUTS])
def test_outputs_are_checked_before_the_work(files, argv, command, pattern):
    refuses(expand(argv, files), command, pattern, files["tmp"])
    assert not (files["tmp"] / "new").exists()
    no_leftovers(files["tmp"])


def test_an_unwritable_output_folder_is_refused_before_the_work(files, monkeypatch):
    locked = files["dir"]
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    refuses([*EVAL, "--output", locked / "r.json"], "eval", r"permission denied in .*a-folder", files["tmp"])
    argv = ["generate", NOWHERE, "--prompts", files["prompts"], "--output", locked / "g.jsonl"]
    refuses(argv, "generate", r"permission denied", files["tmp"])


def sweep_argv(data_dir: Path, root: Path, *extra: str) -> list[str]:
    """A one-cell sweep that trains in about a second (4 steps of a 2-head, 32-wide model)."""
    overrides = tiny_sweep_overrides(data_dir, root / "base")
    return ["sweep", *overrides, "--alphas", "1/2", "--repetitions", "1", "--windows", "4", *extra]


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        ("model_dir", r"sweep folder .*model-folder: it exists and is a model folder"),
        ("dir", r"sweep folder .*a-folder: it exists and is a folder with 1 entry"),
        ("user_json", r"sweep folder .*notes.json: it exists and is a file"),
    ],
    ids=["a-model-folder", "a-user-folder", "a-file"],
)
def test_a_sweep_refuses_an_output_that_is_not_a_sweep_before_training(data_dir, files, target, pattern):
    argv = sweep_argv(data_dir, files["tmp"], "--output", str(files[target]))
    refuses(argv, "sweep", pattern, files["tmp"], data_dir)
    assert not (files["tmp"] / "base").exists()


def test_a_sweep_in_use_is_refused_with_the_holders_pid(data_dir, files):
    grid = files["tmp"] / "grid"
    with ownership.exclusive(grid, "sweep"):
        refuses(sweep_argv(data_dir, files["tmp"], "--output", str(grid)), "sweep", rf"pid {os.getpid()}", data_dir)
    assert [p.name for p in grid.iterdir()] == [ownership.LOCK_NAME]


def test_outputs_of_the_same_kind_are_replaced_atomically_and_marked(folder, files, capsys):
    out = files["tmp"] / "g.jsonl"
    argv = ["generate", folder, "--prompts", files["prompts"], "--max-new-tokens", "3", "--output", out]
    assert run_cli(argv).code == 0
    first = out.read_bytes()
    assert ownership.is_generations_file(out) and len(first.splitlines()) == 2
    out.write_text('{"prompt": "old", "text": "old"}\n')
    assert run_cli(argv).code == 0 and out.read_bytes() == first  # replaced: greedy output is the same
    png = files["tmp"] / "loss.png"
    for _ in range(2):  # the second run replaces the first run's plot
        assert run_cli(["plot", files["run"], "--output", png]).code == 0
        assert ownership.is_dual_lm_png(png)
    compare = files["tmp"] / "cmp.png"
    assert run_cli(["eval-compare", files["results"], "--output", compare]).code == 0
    assert ownership.is_dual_lm_png(compare)
    no_leftovers(files["tmp"])


def test_a_full_disk_while_writing_leaves_the_old_output_and_no_temporary_file(folder, files, monkeypatch):
    out = files["tmp"] / "g.jsonl"
    out.write_text('{"prompt": "old", "text": "old"}\n')
    png = files["tmp"] / "loss.png"
    assert run_cli(["plot", files["run"], "--output", png]).code == 0

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    argv = ["generate", folder, "--prompts", files["prompts"], "--max-new-tokens", "2", "--output", out]
    refuses(argv, "generate", r"No space left on device", files["tmp"])
    refuses(["plot", files["run"], "--output", png], "plot", r"No space left on device", files["tmp"])
    no_leftovers(files["tmp"])


# ----------------------------------------------------------------------------- plot and eval-compare inputs


def test_plot_of_a_torn_last_line_draws_the_complete_lines(files):
    metrics = files["run"] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "tokens": 51')  # a kill during the append
    kept = metrics.read_bytes()
    outcome = run_cli(["plot", files["run"]])
    assert outcome.code == 0, outcome.err
    assert ownership.is_dual_lm_png(files["run"] / "loss.png") and metrics.read_bytes() == kept
    from dual_lm.training.runlog import read_metrics

    assert [r["step"] for r in read_metrics(files["run"])] == [1, 2, 3]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (
            b'{"step": 1, "tokens": 8}\n{"step": 2, "tok\n{"step": 3, "tokens": 24}\n',
            r"metrics.jsonl:2 is not a metrics",
        ),
        (b"this is not json\nnor this\n", r"metrics.jsonl:1 is not a metrics record"),
        (b"garbage without a newline", r"metrics.jsonl:1 is not a metrics record"),
        (b"\xff\xfe\x00\x01" * 16, r"metrics.jsonl is not text"),
        (b'[1, 2]\n{"step": 2, "tokens": 8}\n', r"metrics.jsonl:1 is not a metrics record"),
        (b"", r"holds no records yet"),
    ],
    ids=["torn-in-the-middle", "garbage", "one-torn-line-only", "binary", "not-an-object", "empty"],
)
def test_plot_of_bad_metrics_is_one_line(files, content, pattern):
    (files["run"] / "metrics.jsonl").write_bytes(content)
    refuses(["plot", files["run"]], "plot", pattern, files["tmp"])
    assert not (files["run"] / "loss.png").exists()


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.json", None, r"missing.json does not exist"),
        ("torn.json", b'{"format": "dual-lm-eval/1", "tas', r"torn.json is not JSON"),
        ("binary.json", b"\xff\xfe\x00garbage", r"binary.json is not a `dual-lm eval` results file"),
        ("other.json", b'{"tasks": {}, "average": {}}', r"other.json is not a `dual-lm eval` results file"),
        ("a-folder", "dir", r"a-folder is a folder, not a results file"),
    ],
    ids=["missing", "corrupt", "binary", "not-ours", "a-folder"],
)
def test_eval_compare_of_a_bad_results_file_is_one_line(files, name, content, pattern):
    path = files["tmp"] / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    argv = ["eval-compare", files["results"], path, "--output", files["tmp"] / "cmp.png"]
    refuses(argv, "eval-compare", pattern, files["tmp"])
    assert not (files["tmp"] / "cmp.png").exists()


# ----------------------------------------------------------------------------- lm-eval model args


@pytest.fixture
def lm_eval_task(tmp_path, monkeypatch) -> Path:
    """A task YAML for lm-eval's command line, and lm-eval's task index limited to it (indexing every
    built-in task costs seconds; the model is built, and refused, before any task data is read)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__

    def local_only(self, *args, **kwargs):
        kwargs["include_defaults"] = False
        init(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "__init__", local_only)
    import logging

    for handler in logging.getLogger("lm_eval").handlers:  # set up once per process, maybe on a closed capture
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers
            monkeypatch.setattr(handler, "stream", sys.stderr)
    path = tmp_path / "mini.yaml"
    path.write_text("task: mini\ndataset_path: json\noutput_type: multiple_choice\n")
    return path


@pytest.mark.parametrize(
    ("model_args", "pattern"),
    [
        ("pretrained={folder},mode=bogus", r"model_args mode='bogus': choose one of causal, prefix, masked"),
        ("pretrained={folder},dtyp=float16", r"unknown dual-lm model_args 'dtyp' \(did you mean 'dtype'\?\)"),
        ("pretrained={folder},dtype=float8", r"unknown dtype 'float8'"),
        ("pretrained={folder},mask_n=0", r"model_args mask_n=0: expected a whole number >= 1"),
        ("pretrained={folder},mask_n=2.5", r"model_args mask_n=2.5: expected a whole number"),
        ("pretrained={folder},max_gen_toks=nan", r"model_args max_gen_toks=.*expected a whole number"),
        ("pretrained={tmp}", r"(model folder|config.json)"),
        ("mode=causal", r"need pretrained=FOLDER"),
    ],
    ids=["bad-mode", "unknown-key", "bad-dtype", "mask-n-0", "mask-n-fraction", "max-gen-nan", "not-a-model", "none"],
)
def test_lm_eval_bad_model_args_are_one_line(folder, lm_eval_task, model_args, pattern):
    args = model_args.format(folder=folder, tmp=lm_eval_task.parent)
    argv = ["lm-eval", "--model", "dual-lm", "--model_args", args, "--tasks", lm_eval_task, "--device", "cpu"]
    refuses(argv, "lm-eval", pattern, folder, lm_eval_task.parent)


def test_lm_eval_own_argument_errors_keep_their_message_without_a_traceback(lm_eval_task):
    argv = ["lm-eval", "--model", "dual-lm", "--model_args", "pretrained=x", "--tasks", "no_such_task"]
    refuses(argv, "lm-eval", r"lm-eval: Tasks not found: no_such_task", lm_eval_task.parent)


# ----------------------------------------------------------------------------- sampler and scoring inputs

LIBRARY = [
    ("generate-past-the-context", ["generate", "{folder}", "--prompt", "hi", "--max-new-tokens", "500"], "exceed"),
    (
        "speculative-k-past-the-context",
        ["generate", "{folder}", "--prompt", "hi", "--mode", "speculative", "--k", "64", "--max-new-tokens", "8"],
        r"prompt \(2 tokens\) \+ 8 new tokens \+ 127 positions the drafts look ahead exceed the context of 64",
    ),
    (
        "diffusion-past-the-context",
        ["generate", "{folder}", "--prompt", "hi", "--mode", "diffusion", "--max-new-tokens", "200"],
        r"exceed the context of 64",
    ),
]


@pytest.mark.parametrize(("argv", "pattern"), [c[1:] for c in LIBRARY], ids=[c[0] for c in LIBRARY])
def test_sampler_errors_of_the_library_are_one_line(folder, files, argv, pattern):
    refuses(expand(argv, files | {"folder": folder}), "generate", pattern, folder, files["tmp"])


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--window", "500"], r"window 500 exceeds the model's context of 64"),
        (["--window", "8", "--stride", "8"], r"1 <= stride <= window - 1"),
        (["--mode", "prefix", "--window", "8"], r"--window and --stride apply to 'text' records in causal mode"),
    ],
    ids=["window-past-the-context", "stride-equals-window", "window-in-prefix-mode"],
)
def test_scoring_windows_that_cannot_work_are_one_line(folder, files, extra, pattern):
    refuses(["score", folder, files["score"], *extra], "score", pattern, folder, files["tmp"])


def test_sampler_library_refuses_nan_and_inf(folder):
    from dual_lm.folder import load_model
    from dual_lm.inference.diffusion import DiffusionConfig, diffusion_generate
    from dual_lm.inference.generation import check_sampling
    from dual_lm.inference.scoring import score_texts
    from dual_lm.inference.speculative import speculative_generate

    model = load_model(folder)
    prompt = torch.tensor([1, 300])
    for value in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            diffusion_generate(model, prompt, 4, DiffusionConfig(temperature=value))
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            speculative_generate(model, prompt, 4, temperature=value)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        check_sampling({"temperature": 0.8, "top_p": math.nan})
    with pytest.raises(ValueError, match=r"steps must be >= 1 \(a whole number\)"):
        diffusion_generate(model, prompt, 4, DiffusionConfig(steps=2.5))
    with pytest.raises(ValueError, match="need window >= 2"):
        score_texts(model, [[1, 300, 301]], window=0)  # 0 used to mean "the context"
    with pytest.raises(ValueError, match="stride <= window - 1"):
        score_texts(model, [[1, 300, 301]], window=8, stride=0)  # 0 used to mean "half"


# ----------------------------------------------------------------------------- sweeps


def cell_result(grid: Path) -> dict:
    return json.loads((grid / "alpha_0.500_n-reps=1" / "result.json").read_text())


@pytest.fixture(scope="module")
def finished_sweep(data_dir, tmp_path_factory) -> Path:
    """A one-cell sweep run to the end without interruption (--windows 4)."""
    root = tmp_path_factory.mktemp("sweep")
    outcome = run_cli(sweep_argv(data_dir, root, "--output", str(root / "grid")))
    assert outcome.code == 0, outcome.err
    return root / "grid"


def comparable(result: dict) -> dict:
    """A cell result without what names its folder (the config's output path)."""
    return result | {"config": {k: v for k, v in result["config"].items() if k != "output"}}


def test_a_rerun_with_other_evaluation_options_recomputes_without_retraining(data_dir, finished_sweep, tmp_path):
    grid = tmp_path / "grid"
    shutil.copytree(finished_sweep, grid)
    first = cell_result(grid)
    assert first["evaluation"] == {"windows": 4, "tasks": [], "limit": None} and first["windows"] == 4
    assert ownership.is_sweep_folder(grid) and json.loads((grid / "sweep.json").read_text())["alphas"] == [0.5]
    run = grid / "alpha_0.500_n-reps=1" / "run"
    trained = {p: p.stat().st_mtime_ns for p in sorted((run / "checkpoints").rglob("*"))}
    weights = grid / "alpha_0.500_n-reps=1" / "model" / "model.safetensors"
    weights_stamp = weights.stat().st_mtime_ns

    outcome = run_cli(sweep_argv(data_dir, tmp_path, "--output", str(grid), "--windows", "2"))
    assert outcome.code == 0, outcome.err
    again = cell_result(grid)
    assert again["evaluation"]["windows"] == 2 and again["windows"] == 2
    assert again["causal_nll"] != first["causal_nll"]  # two windows, not the four of the stale result
    training = [k for k in first if k not in EVAL_KEYS]
    assert [k for k in again if k not in EVAL_KEYS] == training  # the same keys, in the same order
    assert {k: again[k] for k in training} == {k: first[k] for k in training}  # the training part is kept
    assert {p: p.stat().st_mtime_ns for p in sorted((run / "checkpoints").rglob("*"))} == trained  # not retrained
    assert weights.stat().st_mtime_ns == weights_stamp  # the export was reused
    assert "re-evaluating (no retraining)" in outcome.out
    assert json.loads((grid / "results.json").read_text())["cells"] == [again]  # the report is rewritten
    assert (
        f"{again['causal_nll']:.3f}" in (grid / "results.md").read_text()
        and f"{again['causal_nll']:.3f}" in outcome.out
    )
    assert json.loads((grid / "sweep.json").read_text())["evaluation"]["windows"] == 2

    done = grid / "alpha_0.500_n-reps=1" / "result.json"
    stamp = done.stat().st_mtime_ns
    assert run_cli(sweep_argv(data_dir, tmp_path, "--output", str(grid), "--windows", "2")).code == 0
    assert done.stat().st_mtime_ns == stamp  # same options: the finished cell is reused as it is
    refuses(
        sweep_argv(data_dir, tmp_path, "--output", str(grid), "--limit", "3"), "sweep", r"--limit applies to --tasks"
    )


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        ("changed-config", r"was run with another config"),
        ("corrupt-result", r"result.json is not valid JSON .*delete it to recompute the cell"),
        ("foreign-result", r"result.json is not a sweep cell result"),
    ],
)
def test_a_rerun_that_cannot_reuse_its_cells_changes_nothing(data_dir, finished_sweep, tmp_path, damage, pattern):
    grid = tmp_path / "grid"
    shutil.copytree(finished_sweep, grid)
    argv = sweep_argv(data_dir, tmp_path, "--output", str(grid), "--windows", "2")
    if damage == "changed-config":
        argv = [a.replace("train.steps=4", "train.steps=6") for a in argv]
    else:
        text = '{"alpha": 0.5, "repetit' if damage == "corrupt-result" else '{"alpha": 0.5}'
        (grid / "alpha_0.500_n-reps=1" / "result.json").write_text(text)
    refuses(argv, "sweep", pattern, grid)


CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
import dual_lm.studies.sweep as sweep

def stuck(*args, **kwargs):  # the cell's evaluation: the test kills the process here
    open(sys.argv[1], "w").close()
    time.sleep(600)

sweep.scoring_gap = stuck
from dual_lm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_sweep_killed_during_a_cells_evaluation_finishes_it_on_rerun(data_dir, finished_sweep, tmp_path):
    grid, marker = tmp_path / "grid", tmp_path / "evaluating"
    argv = sweep_argv(data_dir, tmp_path, "--output", str(grid))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), *argv], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the child never reached the evaluation (exit {child.poll()})"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    cell = grid / "alpha_0.500_n-reps=1"
    assert ownership.is_model_folder(cell / "model") and not (cell / "result.json").exists()
    before = snapshot(cell / "run" / "checkpoints")

    outcome = run_cli(argv)
    assert outcome.code == 0, outcome.err
    assert snapshot(cell / "run" / "checkpoints") == before  # finished from the export, not retrained
    got, expected = comparable(cell_result(grid)), comparable(cell_result(finished_sweep))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-6), key
        elif key != "curve":
            assert got[key] == value, key
    assert [c["step"] for c in got["curve"]] == [c["step"] for c in expected["curve"]]
    assert got["curve"][-1]["val_ar_nll"] == pytest.approx(expected["curve"][-1]["val_ar_nll"], abs=1e-6)
