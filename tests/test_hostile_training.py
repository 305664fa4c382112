"""Hostile cases of `dual-lm train`: outputs that are not a run, a second writer, damaged checkpoints,
moved runs, what a kill leaves, and a full disk while a checkpoint is saved.

Every refusal goes through ``hostile.refuses``: exit 2, one line naming the problem, no traceback,
and every pre-existing file byte-identical afterwards."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dual_lm import ownership
from dual_lm.training import checkpoint
from dual_lm.training.checkpoint import list_checkpoints, load_checkpoint
from hostile import assert_refused, dead_pid, refuses, run_cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_argv(data: Path, out: Path, *extra: str, **values) -> list[str]:
    """`dual-lm train` of a tiny run: 8 steps of 128 tokens, checkpoints at 4 and 8."""
    base = {
        "data.path": data,
        "output": out,
        "data.seq_len": 32,
        "train.micro_batch_rows": 4,
        "train.global_batch_tokens": 128,
        "train.steps": 8,
        "log.every": 1,
        "eval.every": 4,
        "eval.batches": 1,
        "checkpoint.every": 4,
        "objective.alpha": 0.5,
    }
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return ["train", *(f"{k}={v}" for k, v in base.items()), *extra]


def read_log(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s")
    return rows


def weights(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run (checkpoints 4 and 8): the reference the resumed runs must equal."""
    run = tmp_path_factory.mktemp("finished") / "run"
    outcome = run_cli(train_argv(data_dir, run))
    assert outcome.code == 0, outcome.err
    assert [step for step, _ in list_checkpoints(run)] == [4, 8]
    return run


def copy_run(run: Path, target: Path) -> Path:
    """A copy without the lock file (taking the lock rewrites the holder's pid into it)."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(ownership.LOCK_NAME))
    return target


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


# ------------------------------------------------------------------------------ refusals


def _model_folder(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    folder = root / "model"
    folder.mkdir()
    config = {
        "model_type": "dlm_llama",
        "hidden_size": 64,
        "auto_map": {"AutoModel": "modeling_dlm_llama.DLMLlamaModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_dlm_llama.py").write_text("# the model\n")
    (folder / "model.safetensors").write_bytes(b"weights")
    return train_argv(data, folder), root


def _data_folder(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    other = shutil.copytree(data, root / "other-data", ignore=shutil.ignore_patterns(ownership.LOCK_NAME))
    return train_argv(data, other), root


def _user_folder(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    (root / "mine" / "figures").mkdir()
    return train_argv(data, root / "mine"), root


def _a_file(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    (root / "notes.txt").write_text("mine")
    return train_argv(data, root / "notes.txt"), root


def _under_a_file(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    (root / "notes.txt").write_text("mine")
    return train_argv(data, root / "notes.txt" / "run"), root


def _dangling(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    (root / "link").symlink_to(root / "nowhere")
    return train_argv(data, root / "link"), root


def _the_data(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    return train_argv(data, data), data


def _data_parent(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    return train_argv(data, data.parent), data.parent


def _fresh_over_checkpoints(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    copy = copy_run(run, root / "run")
    return train_argv(data, copy), root


def _another_config(root: Path, data: Path, run: Path) -> tuple[list, Path]:
    copy = copy_run(run, root / "run")
    return train_argv(data, copy, "--resume", optim__lr=0.02), root


def _damage(*changes):
    def make(root: Path, data: Path, run: Path) -> tuple[list, Path]:
        copy = copy_run(run, root / "run")
        for step, name, content in changes:
            (ckpt(copy, step) / name).write_bytes(content(ckpt(copy, step) / name))
        return train_argv(data, copy, "--resume"), root

    return make


def _half(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: len(raw) // 2]


def _other_tensors(path: Path) -> bytes:
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(path))
    return path.read_bytes()


def _trainer_without_loader(path: Path) -> bytes:
    state = torch.load(path, weights_only=True)
    state.pop("loader")
    torch.save(state, path)
    return path.read_bytes()


NEWEST_AND_OLDER = [(8, "model.safetensors", _half), (4, "model.safetensors", lambda p: b"")]

REFUSED = [
    ("model-folder", _model_folder, r"refusing to write run folder .*model: it exists and is a model folder"),
    ("data-folder", _data_folder, r"it exists and is a prepare-data folder"),
    ("user-folder", _user_folder, r"it exists and is a folder with 2 entries; choose a new path"),
    ("a-file", _a_file, r"notes\.txt: it exists and is a file"),
    ("under-a-file", _under_a_file, r"notes\.txt is a file, not a folder"),
    ("dangling-link", _dangling, r"it is a dangling symbolic link"),
    ("the-data-itself", _the_data, r"it is the input .* itself"),
    ("folder-holding-the-data", _data_parent, r"it is a folder that holds the input"),
    ("fresh-over-checkpoints", _fresh_over_checkpoints, r"already holds checkpoints; pass --resume"),
    ("resume-another-config", _another_config, r"step-00000008 was written with another config"),
    ("all-checkpoints-damaged", _damage(*NEWEST_AND_OLDER), r"none of the 2 checkpoint\(s\) .* reads back"),
    (
        "only-trainer-pt-truncated",
        _damage((8, "trainer.pt", _half), (4, "trainer.pt", _half)),
        r"step-00000008: .*step-00000008/trainer\.pt cannot be read",
    ),
    (
        "only-state-json-torn",
        _damage((8, "state.json", _half), (4, "state.json", lambda p: b"{")),
        r"step-00000008/state\.json is not valid JSON",
    ),
    (
        "other-tensors",
        _damage((8, "model.safetensors", _other_tensors), (4, "model.safetensors", _other_tensors)),
        r"model\.safetensors does not hold this model's tensors",
    ),
    (
        "trainer-state-incomplete",
        _damage((8, "trainer.pt", _trainer_without_loader), (4, "trainer.pt", _trainer_without_loader)),
        r"trainer\.pt lacks loader",
    ),
]


@pytest.mark.parametrize(("make", "pattern"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_train_refuses(data_dir, finished, tmp_path, make, pattern):
    argv, root = make(tmp_path, data_dir, finished)
    refuses(argv, "train", pattern, root, tmp_path)


def test_a_model_folder_keeps_its_config(data_dir, tmp_path):
    """The reported loss: the run config overwrote a model folder's config.json."""
    argv, _ = _model_folder(tmp_path, data_dir, tmp_path)
    before = (tmp_path / "model" / "config.json").read_bytes()
    assert run_cli(argv).code == 2
    assert (tmp_path / "model" / "config.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json",
        "model.safetensors",
        "modeling_dlm_llama.py",
    ]


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_held_lock_refuses_with_the_holders_pid(data_dir, finished, tmp_path, resume):
    run = copy_run(finished, tmp_path / "run") if resume else tmp_path / "run"
    with ownership.exclusive(run, "run"):  # a second open file description: flock refuses it like another process
        argv = train_argv(data_dir, run, *(["--resume"] if resume else []))
        refuses(argv, "train", rf"run .*run is in use by another dual-lm process \(pid {os.getpid()}\)", tmp_path)


def test_an_empty_folder_is_a_fine_output(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    assert run_cli(train_argv(data_dir, tmp_path / "run", train__steps=4)).code == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("trainer.pt", lambda p: p.write_bytes(b"")),
        ("state.json", lambda p: p.write_text('{"step": 8, "conf')),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_and_says_so(data_dir, finished, tmp_path, name, damage):
    run = copy_run(finished, tmp_path / "run")
    damage(ckpt(run, 8) / name)
    outcome = run_cli(train_argv(data_dir, run, "--resume"))
    assert outcome.code == 0, outcome.err
    assert "resuming from step-00000004, the newest readable checkpoint; skipped step-00000008: " in outcome.err
    assert f"step-00000008/{name}" in outcome.err
    assert_same_weights(weights(run, 8), weights(finished, 8))  # re-made from step 4, bit for bit
    assert read_log(run) == read_log(finished)


def test_a_moved_run_resumes_and_equals_the_uninterrupted_one(data_dir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "first")
    shutil.rmtree(ckpt(run, 8))  # as if killed after the checkpoint of step 4
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run.rename(moved)
    outcome = run_cli(train_argv(data_dir, moved, "--resume"))
    assert outcome.code == 0, outcome.err
    assert_same_weights(weights(moved, 8), weights(finished, 8))
    assert read_log(moved) == read_log(finished)
    assert json.loads((moved / "config.json").read_text())["output"] == str(moved)
    assert load_checkpoint(ckpt(moved, 8))[2]["config"]["output"] == str(moved)


def test_leftovers_of_a_killed_run_are_removed_by_the_next(data_dir, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    shutil.rmtree(ckpt(run, 8))
    leftovers = [
        run / "checkpoints" / ".step-00000008.tmp",  # a save killed half-way
        run / "checkpoints" / ".trash-step-00000002",  # a prune killed half-way
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    pid = dead_pid()
    files = [run / f".config.json.tmp-{pid}", run / f".metrics.jsonl.tmp-{pid}"]  # atomic writes killed half-way
    for path in files:
        path.write_text("half")
    mine = run / "checkpoints" / "my-notes.txt"
    mine.write_text("not dual-lm's")
    outcome = run_cli(train_argv(data_dir, run, "--resume"))
    assert outcome.code == 0, outcome.err
    assert "removed what a killed run left" in outcome.err
    assert not any(p.exists() for p in leftovers + files)
    assert mine.read_text() == "not dual-lm's"  # only dual-lm's own staging names are removed
    assert_same_weights(weights(run, 8), weights(finished, 8))


def test_disk_full_while_saving_a_checkpoint(data_dir, tmp_path, monkeypatch):
    original = checkpoint.save_file

    def full_disk(tensors, path, metadata=None):
        if "step-00000008" in path:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    run = tmp_path / "run"
    pattern = r"No space left on device: .*\.step-00000008\.tmp/model\.safetensors \(free some space"
    refuses(train_argv(data_dir, run), "train", pattern, data_dir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]  # no staging folder left
    step4 = load_checkpoint(ckpt(run, 4))
    assert step4[2]["step"] == 4
    monkeypatch.setattr(checkpoint, "save_file", original)
    outcome = run_cli(train_argv(data_dir, run, "--resume"))
    assert outcome.code == 0, outcome.err
    assert [s for s, _ in list_checkpoints(run)] == [4, 8]


# ------------------------------------------------------------------------------ two writers

SLOW_TRAIN = r"""
import sys, time
from dual_lm.training import train
from dual_lm.cli import main
step = train.Trainer.train_step
def slow(self):
    time.sleep(0.05)  # long enough for the second trainer to try while this one holds the run
    return step(self)
train.Trainer.train_step = slow
raise SystemExit(main(["train", *sys.argv[1:]]))
"""


def ended(proc: subprocess.Popen) -> str:
    return f"exit {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"


def test_two_concurrent_trainers_one_is_refused_the_first_finishes(data_dir, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(data_dir, run, train__steps=60, log__every=10, eval__every=0, checkpoint__every=20)
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, *argv[1:]], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    lock = run / ownership.LOCK_NAME
    deadline = time.time() + 60
    while time.time() < deadline and first.poll() is None:
        if lock.is_file() and lock.read_text().strip() == str(first.pid):
            break
        time.sleep(0.02)
    assert first.poll() is None, f"the first trainer ended before the second one could try: {ended(first)}"
    pattern = rf"is in use by another dual-lm process \(pid {first.pid}\)"
    assert_refused(run_cli(argv), "train", pattern)  # a second fresh start
    assert_refused(run_cli([*argv, "--resume"]), "train", pattern)  # a --resume while it runs
    assert first.poll() is None, f"the first trainer ended before the second one was refused: {ended(first)}"
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err.decode()[-2000:]
    assert [row["step"] for row in read_log(run)] == [10, 20, 30, 40, 50, 60]
    assert [s for s, _ in list_checkpoints(run)] == [40, 60]
    assert load_checkpoint(ckpt(run, 60))[2]["step"] == 60
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 60
