"""Edges a review found after the first hostile suites: look-alike folders, a killed re-save of a
checkpoint, config values no run can use, and a fresh start over another run's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dual_lm import ownership
from dual_lm.training.checkpoint import list_checkpoints, remove_leftovers
from hostile import refuses, run_cli
from test_hostile_training import assert_same_weights, ckpt, copy_run, train_argv, weights


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=-1", r"optim\.lr must be > 0, got -1"),
        ("optim.lr=0", r"optim\.lr must be > 0, got 0"),
        ("optim.weight_decay=-0.1", r"optim\.weight_decay must be >= 0"),
        ("objective.ar_weight=-2", r"objective\.ar_weight must be > 0"),
        ("objective.z_loss=-1", r"objective\.z_loss must be >= 0"),
        ("model.rms_norm_eps=0", r"model\.rms_norm_eps must be a positive number"),
        ("model.num_heads=3", r"not a multiple of num_heads=3"),
        ("model.head_dim=15", r"model\.head_dim 15 must be even"),
        ("model.hidden_size=-64", r"model\.hidden_size must be an integer in \[1, "),
        ("model.num_layers=0", r"model\.num_layers must be an integer in \[1, "),
        ("model.intermediate_size=0", r"model\.intermediate_size must be an integer"),
        ("checkpoint.keep_last=-1", r"checkpoint\.keep_last must be >= 0"),
    ],
)
def test_config_values_no_run_can_use_are_refused(data_dir, tmp_path, override, pattern):
    run = tmp_path / "run"
    refuses([*train_argv(data_dir, run), override], "train", pattern, data_dir)
    assert not run.exists()


def test_a_fresh_start_never_takes_over_a_run_started_with_another_config(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    started = {"objective": {"alpha": 0.25}, "data": {}, "train": {}, "output": str(run)}
    (run / "config.json").write_text(json.dumps(started))  # killed before its first checkpoint
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    refuses(train_argv(data_dir, run), "train", r"was started with another config", run)


def test_look_alike_folders_are_not_taken_for_dual_lm_artefacts(tmp_path):
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.json").write_text("{}")  # the user's own tokenizer
    results_only = tmp_path / "evals"
    results_only.mkdir()
    (results_only / "results.json").write_text('{"tasks": {}, "average": {}}')  # an eval output
    empty_jsonl = tmp_path / "notes.jsonl"
    empty_jsonl.write_text("\n")
    assert not ownership.is_data_folder(tokenizer_only)
    assert not ownership.is_sweep_folder(results_only)
    assert not ownership.is_generations_file(empty_jsonl)


def test_prepare_data_refuses_a_folder_holding_only_a_users_tokenizer(data_dir, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the king loves him\n")
    argv = ["prepare-data", "--tokenizer", data_dir / "tokenizer.json", "--input", corpus, "--output", folder]
    refuses(argv, "prepare-data", r"exists and is a folder with 1 entry", folder)


def test_a_killed_resave_of_a_checkpoint_is_finished_not_lost(data_dir, tmp_path, finished_run):
    """A kill between setting the old step aside and renaming the new one in leaves both; the next run
    renames the complete new copy in (before, the cleanup deleted it and the step was lost)."""
    run = copy_run(finished_run, tmp_path / "run")
    folder = run / "checkpoints"
    good = ckpt(run, 8)
    shutil.copytree(good, folder / ".step-00000008.tmp")  # the complete re-save
    good.rename(folder / ".trash-step-00000008")  # the old one, set aside
    (folder / ".trash-step-00000004").mkdir()  # a prune killed half-way: stays deleted
    shutil.rmtree(ckpt(run, 4))
    remove_leftovers(run)
    assert [step for step, _ in list_checkpoints(run)] == [8]
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000008"]
    assert_same_weights(weights(run, 8), weights(finished_run, 8))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("edges") / "run"
    assert run_cli(train_argv(data_dir, run)).code == 0
    return run


def test_an_integer_norm_eps_trains(data_dir, tmp_path):
    outcome = run_cli([*train_argv(data_dir, tmp_path / "run", train__steps=1), "model.rms_norm_eps=1"])
    assert outcome.code == 0, outcome.err


def test_users_folders_named_like_staging_are_never_touched(tmp_path):
    from hostile import dead_pid

    pid = dead_pid()
    target = tmp_path / "model"
    users = [
        f".model.old-{pid}",
        ".model.old-20240101",
        ".model.old-backup01",
        f".model.tmp-{pid}-abcd",
        ".model.tmp-k3j_x9qa",
    ]
    for name in users:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    for overwrite_target in (False, True):
        if overwrite_target:
            target.mkdir()
        assert ownership.remove_stale_staging(target) == []
        assert all((tmp_path / name / "notes.txt").read_text() == "mine" for name in users)
    assert sorted(p.name for p in target.iterdir()) == []


def test_a_lock_path_that_is_a_folder_or_a_link_is_one_line(data_dir, tmp_path):
    folder = tmp_path / "out"
    (folder / ".dual-lm.lock").mkdir(parents=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the king loves him\n")
    argv = ["prepare-data", "--tokenizer", data_dir / "tokenizer.json", "--input", corpus, "--output", folder]
    refuses(argv, "prepare-data", r"exists and is a folder with 1 entry", folder)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    with pytest.raises(ownership.UserError, match="a folder or a link, not dual-lm's lock file"):
        link_folder = tmp_path / "linked"
        link_folder.mkdir()
        (link_folder / ".dual-lm.lock").symlink_to(victim)
        with ownership.exclusive(link_folder):
            pass
    assert victim.read_text() == "the user's file"


def test_prepare_data_options_found_impossible_late_leave_no_new_folder(data_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the king loves him. a fool fears us.\n")
    base = ["prepare-data", "--tokenizer", data_dir / "tokenizer.json", "--input", corpus]
    for extra, pattern in ((["--num-shards", "1000"], r"--num-shards"), (["--valid-tokens", "100000"], r"--valid")):
        out = tmp_path / f"new{extra[0]}"
        refuses([*base, "--output", out, *extra], "prepare-data", pattern, corpus)
        assert not out.exists()


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    import builtins

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(builtins, "print", closed)
    outcome = run_cli(["recommend-alpha", "--repetitions", "4"])
    assert outcome.code == 141 and "Traceback" not in outcome.err
