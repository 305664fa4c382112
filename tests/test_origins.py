"""Where a run starts: model.init_from, a longer run resumed in the stable phase, train.decay_from,
and activation checkpointing (equal losses and gradients)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sentences
from dual_lm.config import load_train_config, preset
from dual_lm.data.loader import PackedLoader, TokenShards
from dual_lm.folder import save_folder
from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM
from dual_lm.tokenizer import save_tokenizer, train_tokenizer
from dual_lm.training.dist import DistInfo
from dual_lm.training.objectives import DualObjective
from dual_lm.training.origins import check_same_past, decay_start, with_init_shape
from dual_lm.training.train import Trainer, run_training
from hostile import refuses
from test_train import overrides
from weights import perturbed

ONE = DistInfo()


def weights_at(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def config(data_dir, out, **extra):
    return load_train_config(None, overrides(data_dir, out, **extra))


# ------------------------------------------------------------------- longer runs and branches


@pytest.fixture(scope="module")
def long_run(data_dir, tmp_path_factory):
    """12 uninterrupted steps (decay from step 9), a checkpoint every 4 steps, all kept."""
    out = tmp_path_factory.mktemp("long") / "run"
    run_training(config(data_dir, out, **{"train.steps": 12, "checkpoint.keep_last": 0, "objective.alpha": 0.5}))
    return out


def test_a_longer_run_resumed_in_the_stable_phase_equals_the_uninterrupted_one(data_dir, tmp_path, long_run):
    short = tmp_path / "short"
    settings = {"checkpoint.keep_last": 0, "objective.alpha": 0.5}
    run_training(config(data_dir, short, **{"train.steps": 8, **settings}))  # decay from step 6
    kept = tmp_path / "step-8"
    shutil.move(short / "checkpoints" / "step-00000008", kept)  # as if killed between steps 4 and 8

    run_training(config(data_dir, short, **{"train.steps": 12, **settings}), resume=True)
    assert_same(weights_at(short, 12), weights_at(long_run, 12))
    log = [json.loads(line) for line in (short / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (long_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if r["step"] > 4] == [r["loss"] for r in full if r["step"] > 4]
    assert json.loads((short / "config.json").read_text())["train"]["steps"] == 12

    # a checkpoint inside its decay is refused, and nothing in the run changes
    shutil.rmtree(short)
    run_training(config(data_dir, short, **{"train.steps": 8, **settings}))
    argv = ["train", *overrides(data_dir, short, **{"train.steps": 12, **settings}), "--resume"]
    refuses(argv, "train", r"2 update\(s\) into the decay .*\(from step 6\).*step 7 or earlier", short)


def test_decay_from_branches_a_stable_checkpoint_into_its_decay(data_dir, tmp_path, long_run):
    """A branch from step 4 of the 12-step run, decaying over 8 steps in all, equals a plain 8-step run."""
    plain = tmp_path / "plain"
    run_training(config(data_dir, plain, **{"objective.alpha": 0.5}))
    branch = tmp_path / "branch"
    source = long_run / "checkpoints" / "step-00000004"
    run_training(config(data_dir, branch, **{"objective.alpha": 0.5, "train.decay_from": source}))
    assert_same(weights_at(branch, 8), weights_at(plain, 8))
    assert not (branch / "checkpoints" / "step-00000004").exists()  # it continued at step 5
    # from the run's newest checkpoint (step 12, past this schedule's 8 steps): refused
    argv = ["train", *overrides(data_dir, tmp_path / "b2", **{"objective.alpha": 0.5, "train.decay_from": long_run})]
    refuses(argv, "train", r"has taken 12 updates, more than train.steps=8", long_run)
    assert not (tmp_path / "b2").exists()
    # nothing left to take: a branch at its own train.steps
    argv = ["train", *overrides(data_dir, tmp_path / "b4", **{"objective.alpha": 0.5, "train.decay_from": plain})]
    refuses(argv, "train", r"has taken 8 updates already: train.steps=8 leaves none", plain)
    # inside the source run: pruning its checkpoints would delete the branch
    inside = source / "branch"
    argv = ["train", *overrides(data_dir, inside, **{"objective.alpha": 0.5, "train.decay_from": source})]
    refuses(argv, "train", r"lies inside .*long.*where train.decay_from points", long_run)
    assert not inside.exists()
    # another objective is another run
    argv = ["train", *overrides(data_dir, tmp_path / "b3", **{"objective.alpha": 0.25, "train.decay_from": source})]
    refuses(argv, "train", r"written with another config \(objective.alpha=0.5 there, 0.25 now\)", long_run)
    # a checkpoint whose tokenizer is not the data's
    foreign = tmp_path / "foreign-step"
    shutil.copytree(source, foreign)
    other = train_tokenizer(iter(sentences(300, 1) + ["thou art a villain"] * 50), vocab_size=320)
    save_tokenizer(other, foreign / "tokenizer.json")
    argv = ["train", *overrides(data_dir, tmp_path / "b5", **{"objective.alpha": 0.5, "train.decay_from": foreign})]
    refuses(argv, "train", r"train.decay_from: .*tokenizer differs", foreign)


def test_the_schedule_rule():
    """Only the updates already taken must keep their learning rates: warmup changes and decays are caught."""

    def cfg(steps, warmup=0.0, decay=0.25):
        return load_train_config(
            None, ["data.path=x", f"train.steps={steps}", f"optim.warmup={warmup}", f"optim.decay={decay}"]
        )

    assert decay_start(cfg(100)) == 75
    check_same_past(cfg(100), cfg(1000), 75, "c")  # the whole stable phase
    check_same_past(cfg(100, warmup=0.1), cfg(200, warmup=0.05), 50, "c")  # 10 warmup steps in both
    check_same_past(cfg(100), cfg(1000), 76, "c")  # the decay's first update keeps the full rate
    with pytest.raises(ValueError, match="into the decay"):
        check_same_past(cfg(100), cfg(1000), 77, "c")
    with pytest.raises(ValueError, match=r"update 1 .*warmup"):
        check_same_past(cfg(100, warmup=0.1), cfg(200, warmup=0.1), 50, "c")
    check_same_past(cfg(100, decay=0.0), cfg(300, decay=0.0), 100, "c")  # a finished run without a decay
    with pytest.raises(ValueError, match="new schedule's decay begins at step 165, before c's step 200"):
        check_same_past(cfg(1000), cfg(220), 200, "c")
    ranks = ["objective.alpha_mode=ranks", "objective.alpha=0.5", "data.repetitions=2"]

    def rotating(steps):
        return load_train_config(None, ["data.path=x", f"train.steps={steps}", *ranks])

    check_same_past(rotating(100), rotating(100), 60, "c")
    with pytest.raises(ValueError, match="update 50 of c ran in rank-rotation epoch 1 but would run in epoch 0"):
        check_same_past(rotating(100), rotating(200), 60, "c")


# ------------------------------------------------------------------- model.init_from


@pytest.fixture(scope="module")
def init_folder(data_dir, tmp_path_factory):
    """A perturbed model of the run's shape (the data's vocabulary, 320) saved with the data's tokenizer."""
    cfg = config(data_dir, "unused")
    torch.manual_seed(3)
    from dual_lm.config import llama_config

    model = perturbed(DLMLlamaForCausalLM(llama_config(cfg.model.shape(320, 2048))), seed=3)
    out = tmp_path_factory.mktemp("init") / "model"
    save_folder(model, out, data_dir / "tokenizer.json")
    return out


def test_init_from_starts_from_the_folder_weights(data_dir, tmp_path, init_folder):
    cfg = with_init_shape(config(data_dir, tmp_path / "run", **{"model.init_from": init_folder}))
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.vocab_size) == (2, 64, 320)
    trainer = Trainer(cfg, ONE)
    assert trainer.start() == f"starting from the weights of {init_folder}"
    assert_same(trainer.model.state_dict(), load_file(init_folder / "model.safetensors"))
    assert trainer.step == 0 and not trainer.optimizer.state  # a fresh optimiser

    run_training(config(data_dir, tmp_path / "run", **{"model.init_from": init_folder, "train.steps": 4}))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["init_from"] == str(init_folder) and saved["vocab_size"] == 320
    fresh = tmp_path / "fresh"
    run_training(config(data_dir, fresh, **{"train.steps": 4}))
    first = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    other = [json.loads(line)["loss"] for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert first[0] != other[0]  # the weights made a difference from the first step


def test_init_from_refusals(data_dir, tmp_path, init_folder):
    foreign = tmp_path / "foreign"
    shutil.copytree(init_folder, foreign)
    other = train_tokenizer(iter(sentences(300, 1) + ["thou art a villain"] * 50), vocab_size=320)
    save_tokenizer(other, foreign / "tokenizer.json")
    (tmp_path / "a-run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a-run" / "config.json").write_text("{}")  # a run's config, not a model's
    cases = [
        (foreign, {}, "tokenizer differs from the one"),
        (init_folder, {"model.hidden_size": 128}, "model.hidden_size=128 contradicts model.init_from"),
        (init_folder, {"model.preset": "small"}, "model.num_layers=6 contradicts"),
        (tmp_path / "absent", {}, "does not exist"),
        (tmp_path / "a-run", {}, "is a run folder; export a checkpoint"),
    ]
    for folder, extra, message in cases:
        argv = ["train", *overrides(data_dir, tmp_path / "run", **{"model.init_from": folder, **extra})]
        refuses(argv, "train", message, init_folder, data_dir, tmp_path)
        assert not (tmp_path / "run").exists()
    argv = ["train", *overrides(data_dir, init_folder / "run", **{"model.init_from": init_folder})]
    refuses(argv, "train", "lies inside .* where model.init_from points", init_folder)
    (foreign / "tokenizer.json").unlink()
    argv = ["train", *overrides(data_dir, tmp_path / "run", **{"model.init_from": foreign})]
    refuses(argv, "train", "has no tokenizer.json, so its token ids cannot be checked", init_folder, tmp_path)


# ------------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_gives_equal_losses_and_gradients(data_dir):
    shards = TokenShards(data_dir)
    batch = PackedLoader(shards, 32, 4, seed=0).next_batch()
    ar_rows = torch.tensor([True, False, True, False])
    results = []
    for checkpointing in (False, True):
        from dual_lm.config import llama_config

        torch.manual_seed(0)
        model = perturbed(DLMLlamaForCausalLM(llama_config(preset("tiny", vocab_size=320))), seed=1)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls = []  # a pre-hook: the recompute stops early, inside the layer's last module
        model.model.layers[1].mlp.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        objective = DualObjective(model, load_train_config(None, ["data.path=x"]).objective)
        loss, _ = objective(batch.inputs, batch.targets, batch.document_ids, ar_rows, torch.Generator().manual_seed(5))
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer ran again in the backward pass
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert_same(grads_a, grads_b)
    assert all(bool(g.abs().sum() > 0) for g in grads_a.values())  # every weight took part


def test_activation_checkpointing_run_equals_the_plain_run(data_dir, tmp_path):
    plain, recomputed = tmp_path / "plain", tmp_path / "ckpt"
    run_training(config(data_dir, plain, **{"train.steps": 4}))
    run_training(config(data_dir, recomputed, **{"train.steps": 4, "train.activation_checkpointing": "true"}))
    assert_same(weights_at(plain, 4), weights_at(recomputed, 4))


def test_the_causal_to_dual_example_runs(data_dir, tmp_path):
    """examples/causal_to_dual.py end to end at a tiny budget: three runs, the start measured on the export."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import causal_to_dual

    tiny = ["model.preset=tiny", "data.seq_len=32", "train.micro_batch_rows=4", "train.global_batch_tokens=128"]
    argv = [str(data_dir), str(tmp_path / "out"), "--causal-steps", "3", "--steps", "2", "--eval-every", "1"]
    results = causal_to_dual.main([*argv, *[x for kv in [*tiny, "eval.batches=1"] for x in ("--set", kv)]])
    assert [r["step"] for r in results["converted"]] == [1, 2] == [r["step"] for r in results["scratch"]]
    # the start is the exported causal model: the causal run's own final validation, to the bit
    causal_log = [json.loads(line) for line in (tmp_path / "out" / "causal" / "metrics.jsonl").read_text().splitlines()]
    for key in ("val_md_loss", "val_ar_nll"):
        assert results["start"][key] == causal_log[-1][key]
    assert results["converted"][0]["val_md_loss"] != results["scratch"][0]["val_md_loss"]
    saved = json.loads((tmp_path / "out" / "converted" / "config.json").read_text())
    assert saved["model"]["init_from"] == str(tmp_path / "out" / "causal-model")
    assert saved["objective"]["alpha"] == 0.5
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    with pytest.raises(SystemExit):
        causal_to_dual.main(argv)  # the output is no longer empty


def test_resume_needs_neither_the_init_folder_nor_the_new_keys(data_dir, tmp_path, init_folder):
    """A started init_from run resumes after its folder moved (its shape is in its own config), and a
    checkpoint written before the keys of this change existed still resumes (defaults filled in)."""
    moved = tmp_path / "init"
    shutil.copytree(init_folder, moved)
    run = tmp_path / "run"
    settings = {"model.init_from": moved, "train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 0}
    run_training(config(data_dir, run, **settings))
    final = weights_at(run, 4)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.move(moved, tmp_path / "elsewhere")
    run_training(config(data_dir, run, **settings), resume=True)
    assert_same(weights_at(run, 4), final)

    old = tmp_path / "old"
    run_training(config(data_dir, old, **{"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 0}))
    final = weights_at(old, 4)
    shutil.rmtree(old / "checkpoints" / "step-00000004")
    for path in (old / "config.json", old / "checkpoints" / "step-00000002" / "state.json"):
        saved = json.loads(path.read_text())
        target = saved.get("config", saved)
        for section, key in (("model", "vocab_size"), ("model", "init_from"), ("train", "decay_from")):
            del target[section][key]
        path.write_text(json.dumps(saved))
    run_training(config(data_dir, old, **{"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 0}), True)
    assert_same(weights_at(old, 4), final)
