"""The ownership rules every writing command goes through: kinds, output checks, the lock, staging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dual_lm import ownership
from dual_lm.atomic import write_text_atomic
from dual_lm.errors import UserError


def make_model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_dlm_llama.DLMLlamaModel"}}))
    (path / "modeling_dlm_llama.py").write_text("# modeling\n")
    return path


def make_run_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"objective": {}, "data": {}, "train": {}, "output": str(path)}))
    return path


def test_kinds_are_recognised(tmp_path):
    model = make_model_folder(tmp_path / "model")
    run = make_run_folder(tmp_path / "run")
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text("{}")
    (data / ".valid.tokens.tmp").write_bytes(b"")  # what a killed prepare-data leaves
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert ownership.describe(model) == "a model folder"
    assert ownership.describe(run) == "a run folder"
    assert ownership.describe(data) == "a prepare-data folder"
    assert ownership.describe(user) == "a folder with 1 entry"
    assert not ownership.is_model_folder(run) and not ownership.is_run_folder(model)
    assert not ownership.is_data_folder(user) and not ownership.is_data_folder(model)


@pytest.mark.parametrize(
    ("name", "kind", "update", "pattern"),
    [
        ("user", ownership.MODEL, True, r"is a folder with 1 entry"),
        ("model", ownership.MODEL, False, r"is a model folder \(pass --overwrite"),
        ("model", ownership.RUN, True, r"is a model folder"),
        ("run", ownership.DATA, True, r"is a run folder"),
        ("file.txt", ownership.MODEL, True, r"is a file"),
    ],
)
def test_check_output_refuses_what_is_not_its_own(tmp_path, name, kind, update, pattern):
    make_model_folder(tmp_path / "model")
    make_run_folder(tmp_path / "run")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(UserError, match=pattern):
        ownership.check_output(tmp_path / name, kind, update=update, flag="--overwrite")


def test_check_output_accepts_new_empty_and_own_kind(tmp_path):
    assert ownership.check_output(tmp_path / "a" / "b", ownership.MODEL) == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    assert ownership.check_output(tmp_path / "empty", ownership.MODEL) == tmp_path / "empty"
    run = make_run_folder(tmp_path / "run")
    assert ownership.check_output(run, ownership.RUN, update=True) == run


def test_protected_places_are_refused_even_when_of_the_kind(tmp_path, monkeypatch):
    run = make_run_folder(tmp_path / "run")
    (run / "checkpoints").mkdir()
    monkeypatch.chdir(run)
    with pytest.raises(UserError, match="current directory"):
        ownership.check_output(Path("."), ownership.RUN, update=True)
    with pytest.raises(UserError, match="holds the current directory"):
        ownership.check_output(tmp_path, ownership.RUN, update=True)
    monkeypatch.setenv("HOME", str(run))
    monkeypatch.chdir("/")
    with pytest.raises(UserError, match="home directory"):
        ownership.check_output(run, ownership.RUN, update=True)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=r"input .* itself"):
        ownership.check_output(run, ownership.RUN, update=True, sources=(run,))
    with pytest.raises(UserError, match="holds the input"):
        ownership.check_output(tmp_path, ownership.RUN, update=True, sources=(run / "checkpoints",))


def test_output_file_checks(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        ownership.check_output_file(tmp_path, ownership.RESULTS)
    with pytest.raises(UserError, match="is a file, not a folder"):
        (tmp_path / "f").write_text("x")
        ownership.check_output_file(tmp_path / "f" / "out.json", ownership.RESULTS)
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"tasks": {}, "average": {}}))
    assert ownership.check_output_file(results, ownership.RESULTS) == results
    with pytest.raises(UserError, match="exists and is a file"):
        ownership.check_output_file(tmp_path / "f", ownership.RESULTS)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UserError, match="permission denied"):
        ownership.check_output(locked / "out", ownership.MODEL)


def start_holder(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock (and writes a file into it) until it is killed."""
    code = (
        "import time; from pathlib import Path; from dual_lm.ownership import exclusive\n"
        f"with exclusive({str(folder)!r}):\n"
        f"    Path({str(folder)!r}, 'half-written').write_text('x'); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    folder = tmp_path / "run"
    holder = start_holder(folder)
    try:
        refused = pytest.raises(UserError, match=rf"in use by another dual-lm process \(pid {holder.pid}\)")
        with refused, ownership.exclusive(folder, "run"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with ownership.exclusive(folder, "run"):  # kill -9 left no stale lock
        assert (folder / ownership.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_staging_follows_the_umask_and_stale_ones_are_removed(tmp_path):
    target = tmp_path / "out"
    old = os.umask(0o022)
    try:
        staging = ownership.make_staging(target)
    finally:
        os.umask(old)
    assert staging.stat().st_mode & 0o777 == 0o755
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd1234"
    stale.mkdir()
    legacy = [tmp_path / ".out.old-k3j4h5g6", tmp_path / ".out.tmp-k3j4h5g6"]  # an earlier dual-lm's pair
    for path in legacy:
        path.mkdir()
    users = [tmp_path / ".other.tmp-1-abcd", tmp_path / ".out.tmp-backup", tmp_path / ".out.old-my_copy_of_it"]
    for path in users:
        path.mkdir()
    target.mkdir()  # the replacement finished: what is set aside is stale
    removed = ownership.remove_stale_staging(target)
    assert sorted(removed) == sorted([stale, *legacy])
    assert staging.is_dir() and all(p.is_dir() for p in users)  # a live process's staging and user names stay


def test_atomic_write_leaves_nothing_on_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_environment_errors_become_one_line():
    message = ownership.environment_error(OSError(28, "No space left on device", "/x/y"))
    assert message == "No space left on device: /x/y (free some space and re-run)"
    assert ownership.environment_error(OSError(2, "No such file")) is None


def test_png_kind(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    fig.savefig(ours, metadata={"Software": ownership.PNG_SOFTWARE})
    fig.savefig(theirs)
    plt.close(fig)
    assert ownership.is_dual_lm_png(ours) and not ownership.is_dual_lm_png(theirs)


def test_a_locked_folder_is_refused_with_the_holders_pid_before_it_looks_like_its_kind(tmp_path):
    folder = tmp_path / "run"
    holder = start_holder(folder)
    try:
        with pytest.raises(UserError, match=rf"in use by another dual-lm process \(pid {holder.pid}\)"):
            ownership.check_output(folder, ownership.RUN, update=True)
    finally:
        holder.kill()
        holder.wait()
    assert ownership.lock_holder(folder) is None
    with ownership.exclusive(folder):  # this process's own lock does not refuse it
        assert ownership.lock_holder(folder) is None


@pytest.mark.parametrize(
    ("copied", "legacy"), [(True, False), (False, False), (True, True)], ids=["new-copy", "no-new-copy", "legacy-names"]
)
def test_a_kill_between_the_renames_of_a_replacement_leaves_one_whole_folder(tmp_path, copied, legacy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "model"
    old_tail, new_tail = ("k3j_x9qa", "k3j_x9qa") if legacy else (f"{dead.pid}-abcd1234", f"{dead.pid}-1234abcd")
    old = tmp_path / f".model.old-{old_tail}"  # the old folder, set aside
    old.mkdir()
    (old / "weights").write_text("old")
    if copied:  # the complete new one, not yet renamed in
        (tmp_path / f".model.tmp-{new_tail}").mkdir()
        (tmp_path / f".model.tmp-{new_tail}" / "weights").write_text("new")
    with pytest.raises(UserError, match="a folder with 1 entry"):  # the check finds the repaired folder
        ownership.check_output(target, ownership.MODEL)
    assert (target / "weights").read_text() == ("new" if copied else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_file_staging_of_a_live_process_is_kept_and_a_dead_ones_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "results.json"
    mine = tmp_path / f".results.json.tmp-{os.getppid()}"  # a live process (pytest's parent)
    gone = tmp_path / f".results.json.tmp-{dead.pid}"
    mine.write_text("live")
    gone.write_text("dead")
    write_text_atomic(path, "{}")
    assert path.read_text() == "{}" and mine.is_file() and not gone.exists()


def test_checkpoint_files_follow_the_umask(tmp_path):
    import torch

    from dual_lm.training.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        folder = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"x": 1}, {"config": {}}, None)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "model.safetensors": 0o644,
        "trainer.pt": 0o644,
        "state.json": 0o644,
    }
