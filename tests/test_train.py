"""Training end to end on a tiny model: loss falls, DDP equals one process, kill -9 and resume, bad configs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dual_lm.cli import main
from dual_lm.config import load_train_config
from dual_lm.training.train import run_training
from hostile import refuses

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def overrides(data_dir, out, **extra):
    base = {
        "data.path": data_dir,
        "output": out,
        "data.seq_len": 32,
        "train.micro_batch_rows": 4,
        "train.global_batch_tokens": 128,
        "train.steps": 8,
        "log.every": 1,
        "eval.every": 4,
        "eval.batches": 1,
        "checkpoint.every": 4,
        "optim.lr": 0.01,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_log(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s")
    return rows


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_falls(data_dir, tmp_path, alpha):
    cfg = load_train_config(
        None,
        overrides(
            data_dir,
            tmp_path / "run",
            **{"objective.alpha": alpha, "train.steps": 30, "eval.every": 30, "checkpoint.every": 30},
        ),
    )
    run_training(cfg)
    log = read_log(tmp_path / "run")
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert "val_ar_nll" in log[-1] and "val_md_loss" in log[-1]
    if 0 < alpha < 1:
        assert log[-1]["ar_rows"] > 0 and log[-1]["md_rows"] > 0


def cli_train(args, **kwargs):
    return subprocess.Popen([str(BIN / "dual-lm"), "train", *map(str, args)], env=ENV, **kwargs)


def test_kill_minus_nine_then_resume_reproduces_the_log(data_dir, tmp_path):
    args = overrides(data_dir, tmp_path / "full", **{"train.steps": 12, "objective.alpha": 0.5})
    assert main(["train", *args]) == 0  # uninterrupted, in this process (one thread, as the child)
    args = overrides(data_dir, tmp_path / "killed", **{"train.steps": 12, "objective.alpha": 0.5})
    proc = cli_train(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000004"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists()
    assert cli_train([*args, "--resume"]).wait() == 0
    assert read_log(tmp_path / "killed") == read_log(tmp_path / "full")
    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000012" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / "step-00000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_IN_SAVE = r"""
import os, signal, sys
from dual_lm.training import checkpoint
from dual_lm.cli import main
original = checkpoint.save_file
def dying_save(tensors, path, metadata=None):
    if "step-00000008" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tensors, path, metadata=metadata)
checkpoint.save_file = dying_save
main(["train", *sys.argv[1:]])
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    args = overrides(data_dir, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], env=ENV, capture_output=True)
    assert proc.returncode == -9
    from dual_lm.training.checkpoint import list_checkpoints, load_checkpoint

    found = list_checkpoints(tmp_path / "run")
    assert [step for step, _ in found] == [4]
    weights, _, meta = load_checkpoint(found[0][1])
    assert meta["step"] == 4 and "model.embed_tokens.weight" in weights
    assert main(["train", *args, "--resume"]) == 0
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4, 8]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["objectiv.alpha=0.5"], "unknown config key 'objectiv' (did you mean 'objective'?)"),
        (["objective.alpha=1.5"], "objective.alpha must lie in [0, 1]"),
        (["objective.alpha_mode=ranks", "objective.alpha=0.5"], "cannot be realised by splitting 1 rank"),
        (["train.global_batch_tokens=100"], "is not a multiple of micro_batch_rows x seq_len"),
        (["train.steps=many"], "train.steps must be an integer"),
        (["checkpoint.every=0"], "checkpoint.every must be >= 1"),
        (["train.global_batch_tokens=0"], "train.global_batch_tokens must be >= 1"),
        (["optim.decay_kind=cubic"], "optim schedule"),
        (["train.seed=-1"], "train.seed must be >= 0"),
        (["model.num_layers=2.5"], "model.num_layers must be an integer"),
    ],
)
def test_bad_configs_give_one_clear_error(data_dir, tmp_path, extra, message):
    refuses(["train", *overrides(data_dir, tmp_path / "r"), *extra], "train", re.escape(message), tmp_path, data_dir)
    assert not (tmp_path / "r").exists()


def test_missing_config_file_and_existing_run(data_dir, tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    args = overrides(data_dir, tmp_path / "r", **{"train.steps": 4})
    assert main(["train", *args]) == 0
    assert main(["train", *args]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_yaml_config_export_plot(data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"output: {tmp_path / 'run'}\ndata:\n  path: {data_dir}\n  seq_len: 32\n  repetitions: 2\n"
        "train:\n  steps: 4\n  micro_batch_rows: 4\n  global_batch_tokens: 128\n"
        "objective:\n  alpha: 0.75\n"
    )
    assert main(["train", str(config), "log.every=1", "checkpoint.every=4"]) == 0
    assert main(["export", str(tmp_path / "run")]) == 0
    folder = tmp_path / "run" / "alpha_0.750_n-reps=2"
    from dual_lm.folder import load_model

    model = load_model(folder)
    vocab = json.loads((data_dir / "manifest.json").read_text())["vocab_size"]
    assert (folder / "tokenizer.json").is_file() and model.config.vocab_size == vocab
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    shutil.rmtree(folder)


def test_recommend_alpha(capsys):
    assert main(["recommend-alpha", "--repetitions", "4"]) == 0
    assert "alpha = 0.984375" in capsys.readouterr().out
    assert main(["recommend-alpha", "--unique-tokens", "1000", "--budget-tokens", "128000"]) == 0
    out = capsys.readouterr().out
    assert "alpha = 0.125000" in out and "alpha_0.125_n-reps=128" in out
    assert main(["recommend-alpha"]) == 2
    assert main(["recommend-alpha", "--repetitions", "0"]) == 2


def torchrun(args):
    """Two ranks on a free port (``--standalone`` binds its rendezvous to port 0): parallel runs never collide."""
    return subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(BIN / "dual-lm"), "train", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_one_process_and_fsdp2_agree_and_fsdp2_resumes(data_dir, tmp_path):
    """One process with 8 rows per step and two gloo ranks of 4 under FSDP2: the same weights after 4
    steps; FSDP2 resumed from step 2 ends where it did uninterrupted, with the same log. (alpha = 1: the
    rows' objective draws then do not depend on how the batch is split over ranks. DDP under torchrun
    equals one process in ``test_sweep.py::test_a_cell_as_a_torchrun_job_equals_the_in_process_cell``.)"""
    common = {
        "objective.alpha": 1.0,
        "train.steps": 4,
        "eval.every": 0,
        "train.global_batch_tokens": 256,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 5,
    }
    assert main(["train", *overrides(data_dir, tmp_path / "one", **common, **{"train.micro_batch_rows": 8})]) == 0
    fsdp = overrides(data_dir, tmp_path / "fsdp", **common, **{"train.fsdp": "true"})
    proc = torchrun(fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = "checkpoints/step-00000004/model.safetensors"
    one, sharded = load_file(tmp_path / "one" / final), load_file(tmp_path / "fsdp" / final)
    for key in one:
        torch.testing.assert_close(sharded[key], one[key], atol=2e-5, rtol=2e-5, msg=key)
    uninterrupted = read_log(tmp_path / "fsdp")
    assert [r["loss"] for r in uninterrupted] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "one")], rel=1e-5
    )
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000004")  # as if killed after step 2's checkpoint
    proc = torchrun([*fsdp, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(tmp_path / "fsdp" / final)
    for key in one:
        torch.testing.assert_close(resumed[key], sharded[key], atol=1e-6, rtol=1e-6, msg=key)
    assert read_log(tmp_path / "fsdp") == uninterrupted


def test_fsdp_needs_torchrun(data_dir, tmp_path, capsys):
    assert main(["train", *overrides(data_dir, tmp_path / "r"), "train.fsdp=true"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err


def test_keep_last_zero_keeps_every_checkpoint(data_dir, tmp_path):
    from dual_lm.training.checkpoint import list_checkpoints

    args = overrides(data_dir, tmp_path / "r", **{"train.steps": 3, "checkpoint.every": 1, "checkpoint.keep_last": 0})
    assert main(["train", *args]) == 0
    assert [step for step, _ in list_checkpoints(tmp_path / "r")] == [1, 2, 3]


def test_tensorboard_and_checkpoint_retention(data_dir, tmp_path):
    args = overrides(
        data_dir,
        tmp_path / "r",
        **{
            "train.steps": 8,
            "checkpoint.every": 1,
            "checkpoint.keep_last": 2,
            "checkpoint.exponential": "true",
            "log.tensorboard": "true",
        },
    )
    assert main(["train", *args]) == 0
    from dual_lm.training.checkpoint import list_checkpoints

    assert [step for step, _ in list_checkpoints(tmp_path / "r")] == [1, 2, 4, 7, 8]  # powers of two + last two
    events = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
