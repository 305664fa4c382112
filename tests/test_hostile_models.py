"""Hostile inputs for model folders, the reference converter, export and info (issue 11).

Every refusal is checked by ``hostile.refuses`` (exit 2, one ``dual-lm CMD: error:`` line naming the
problem, no traceback, every pre-existing file byte-identical) and, on top, that nothing new was left
behind (no partial folder, no staging). The folders are made here from tiny models, so the suite runs
in a clone without ../shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import PRESETS, llama_config
from dual_lm.convert import hf_to_reference_name
from dual_lm.folder import check_folder, load_model, save_folder
from dual_lm.ownership import LOCK_NAME, exclusive
from hostile import dead_pid, run_cli, snapshot
from hostile import refuses as _refuses
from weights import perturbed

SHAPE = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64)  # vocab 512
REFERENCE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_layers": 2,
    "num_attention_heads": 4,
    "d_h": 16,
    "vocab_size": 512,
    "max_sequence_length": 64,
    "norm_eps": 1e-7,
    "rope_theta": 160000,
    "tie_weights": False,
    "model": "Base",
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def perturbed_model(vocab: int = 512, seed: int = 1) -> DLMLlamaForCausalLM:
    """A tiny model whose every weight is random (a fresh one has all-zero projections and biases)."""
    torch.manual_seed(seed)
    return perturbed(DLMLlamaForCausalLM(llama_config(dataclasses.replace(SHAPE, vocab_size=vocab))), seed=seed)


def refuses(argv: list, command: str, pattern: str, root: Path):
    """``hostile.refuses`` plus: no new path appeared under ``root`` (lock files aside)."""
    before = set(snapshot(root))
    outcome = _refuses(argv, command, pattern, root)
    new = sorted(p for p in set(snapshot(root)) - before if not p.endswith(LOCK_NAME))
    assert not new, f"a refused command left new paths: {new}"
    return outcome


def same_tensors(folder: Path, expected: dict[str, torch.Tensor]) -> bool:
    found = load_file(str(folder / "model.safetensors"))
    return set(found) == set(expected) and all(torch.equal(found[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------ shared artefacts


@pytest.fixture(scope="module")
def made(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Built once per module: a trained run, a model folder, a tokenizer that fits and one too big."""
    from dual_lm.cli import main

    root = tmp_path_factory.mktemp("hostile-models")
    run = root / "run"
    settings = {
        "data.path": data_dir,
        "output": run,
        "data.seq_len": 32,
        "train.micro_batch_rows": 4,
        "train.global_batch_tokens": 128,
        "train.steps": 2,
        "log.every": 1,
        "eval.every": 2,
        "eval.batches": 1,
        "checkpoint.every": 2,
    }
    assert main(["train", *[f"{k}={v}" for k, v in settings.items()]]) == 0
    tokenizer = data_dir / "tokenizer.json"  # vocabulary 320
    big = Tokenizer.from_file(str(tokenizer))
    big.add_tokens([f"extra{i}" for i in range(300)])  # 600+ ids > the tiny model's 512
    big.save(str(root / "big-tokenizer.json"))
    model = save_folder(perturbed_model(), root / "model", tokenizer)
    return {"run": run, "model": model, "tokenizer": tokenizer, "big": root / "big-tokenizer.json"}


@dataclasses.dataclass
class Ctx:
    """One test's sandbox: ``tmp`` is the root every check snapshots."""

    tmp: Path
    made: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.ExitStack  # what a case holds (a lock) until the test ends

    def run(self, name: str = "run") -> Path:
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(self.made["run"], target)
        return target

    def checkpoint(self, name: str = "run") -> Path:
        return sorted((self.run(name) / "checkpoints").glob("step-*"))[-1]

    def model(self) -> Path:
        target = self.tmp / "model"
        if not target.exists():
            shutil.copytree(self.made["model"], target)
        return target

    def folder_with(self, name: str, text: str = "mine") -> Path:
        """A user's folder holding one file."""
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "notes.txt").write_text(text)
        return folder

    def reference(self, config: dict | None = None, text: str | None = None) -> list:
        """``--config C --state-dict S`` of a reference checkpoint (a tiny model in reference names)."""
        ref = self.tmp / "ref"
        ref.mkdir(exist_ok=True)
        state = {hf_to_reference_name(k): v for k, v in perturbed_model().state_dict().items()}
        torch.save(state, ref / "state_dict.bin")
        raw = json.dumps(REFERENCE_CONFIG if config is None else config) if text is None else text
        (ref / "config.json").write_text(raw)
        return ["--config", ref / "config.json", "--state-dict", ref / "state_dict.bin"]

    def edit_config(self, change: Callable[[dict], object]) -> Path:
        folder = self.model()
        config = json.loads((folder / "config.json").read_text())
        replaced = change(config)
        (folder / "config.json").write_text(json.dumps(config if replaced is None else replaced))
        return folder


@pytest.fixture
def ctx(tmp_path, made, monkeypatch):
    with contextlib.ExitStack() as stack:
        yield Ctx(tmp_path, made, monkeypatch, stack)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rewrite_weights(path: Path, change: Callable[[dict], None]) -> None:
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------ export cases


def _reexport(c: Ctx) -> list:
    assert run_cli(["export", c.run(), c.tmp / "out"]).code == 0
    return ["export", c.run(), c.tmp / "out"]


def _cwd(c: Ctx) -> list:
    c.monkeypatch.chdir(c.folder_with("work"))
    return ["export", c.run(), "."]


def _home(c: Ctx) -> list:
    home = c.folder_with("home")
    c.monkeypatch.setenv("HOME", str(home))
    return ["export", c.run(), home, "--overwrite"]


def _damage(part: str, how: Callable[[Path], None]) -> Callable[[Ctx], list]:
    def setup(c: Ctx) -> list:
        how(c.checkpoint() / part)
        return ["export", c.run(), c.tmp / "out"]

    return setup


def _unknown_key(path: Path) -> None:
    state = json.loads(path.read_text())
    state["config"]["trian"] = {"steps": 2}
    path.write_text(json.dumps(state))


def _misshaped(path: Path) -> None:
    rewrite_weights(path, lambda w: w.__setitem__("lm_head.projection.weight", torch.zeros(64, 32)))


def _locked(c: Ctx) -> list:
    c.stack.enter_context(exclusive(c.run(), "run"))  # "a trainer": flock conflicts across open files
    return ["export", c.run()]


def _enospc(c: Ctx) -> list:
    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1000)  # a part written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    c.monkeypatch.setattr(DLMLlamaForCausalLM, "save_pretrained", full_disk)
    return ["export", c.run(), c.tmp / "out"]


def _dangling(c: Ctx) -> list:
    (c.tmp / "link").symlink_to(c.tmp / "nowhere")
    return ["export", c.run(), c.tmp / "link"]


def _file_out(c: Ctx) -> list:
    (c.tmp / "out.txt").write_text("mine")
    return ["export", c.run(), c.tmp / "out.txt", "--overwrite"]


def _empty_run(c: Ctx) -> list:
    (c.tmp / "empty").mkdir()
    return ["export", c.tmp / "empty", c.tmp / "out"]


EXPORT_CASES = {
    "folder with a user's file": (lambda c: ["export", c.run(), c.folder_with("mine")], r"is a folder with 1 entry"),
    "folder with a user's file, --overwrite": (
        lambda c: ["export", c.run(), c.folder_with("mine"), "--overwrite"],
        r"is a folder with 1 entry",
    ),
    "RUN RUN": (lambda c: ["export", c.run(), c.run()], r"the input .*run itself"),
    "RUN RUN --overwrite": (lambda c: ["export", c.run(), c.run(), "--overwrite"], r"the input .*run itself"),
    "RUN . from inside a folder": (_cwd, r"the current directory"),
    "RUN ~ (home)": (_home, r"the home directory"),
    "RUN RUN/checkpoints (an ancestor of the checkpoint)": (
        lambda c: ["export", c.run(), c.run() / "checkpoints", "--overwrite"],
        r"a folder that holds the input",
    ),
    "RUN the folder holding the run": (lambda c: ["export", c.run(), c.tmp], r"a folder that holds the input"),
    "another run's checkpoint folder": (
        lambda c: ["export", c.run(), c.checkpoint("other"), "--overwrite"],
        r"exists and is a folder with \d+ entries",
    ),
    "another run folder": (lambda c: ["export", c.run(), c.run("other"), "--overwrite"], r"exists and is a run folder"),
    "a checkpoint into its own run": (
        lambda c: ["export", c.checkpoint(), c.run(), "--overwrite"],
        r"a folder that holds the input",
    ),
    "re-export without --overwrite": (_reexport, r"exists and is a model folder \(pass --overwrite"),
    "OUT is a file": (_file_out, r"exists and is a file"),
    "OUT is a dangling link": (_dangling, r"dangling symbolic link"),
    "corrupt model.safetensors": (
        _damage("model.safetensors", lambda p: p.write_bytes(b"not a safetensors file" * 20)),
        r"model\.safetensors cannot be read",
    ),
    "truncated model.safetensors": (_damage("model.safetensors", truncate), r"model\.safetensors cannot be read"),
    "empty model.safetensors": (
        _damage("model.safetensors", lambda p: p.write_bytes(b"")),
        r"model\.safetensors cannot be read",
    ),
    "truncated state.json": (_damage("state.json", truncate), r"state\.json is not valid JSON"),
    "empty state.json": (_damage("state.json", lambda p: p.write_text("")), r"state\.json is not valid JSON"),
    "state.json with an unknown config key": (_damage("state.json", _unknown_key), r"invalid run config.*'trian'"),
    "corrupt trainer.pt": (
        _damage("trainer.pt", lambda p: p.write_bytes(b"garbage" * 50)),
        r"trainer\.pt cannot be read",
    ),
    "truncated trainer.pt": (_damage("trainer.pt", truncate), r"trainer\.pt cannot be read"),
    "weights that do not fit the run config": (
        _damage("model.safetensors", _misshaped),
        r"do not match its run config: mis-shaped tensors: lm_head\.projection\.weight \(64, 32\)",
    ),
    "a run that does not exist": (lambda c: ["export", c.tmp / "nope", c.tmp / "out"], r"nope does not exist"),
    "a folder without checkpoints": (_empty_run, r"neither a checkpoint nor a run folder"),
    "disk full (ENOSPC) while saving": (_enospc, r"No space left on device.*free some space"),
    "default OUT while a trainer holds the run": (_locked, r"in use by another dual-lm process \(pid \d+\)"),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_refuses(ctx, name):
    setup, pattern = EXPORT_CASES[name]
    refuses(setup(ctx), "export", pattern, ctx.tmp)


# ------------------------------------------------------------------------------ convert-reference cases


def _convert(config: dict | None = None, text: str | None = None) -> Callable[[Ctx], list]:
    return lambda c: ["convert-reference", *c.reference(config, text), c.tmp / "out"]


def _with(**changes) -> dict:
    return {k: v for k, v in (REFERENCE_CONFIG | changes).items() if v is not ...}


def _big_tokenizer(c: Ctx) -> list:
    args = c.reference()
    (c.tmp / "ref" / "state_dict.bin").write_bytes(b"garbage")  # refused before the state dict is read
    return ["convert-reference", *args, "--tokenizer", c.made["big"], c.tmp / "out"]


def _corrupt_tokenizer(c: Ctx) -> list:
    (c.tmp / "tok.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    return ["convert-reference", *c.reference(), "--tokenizer", c.tmp / "tok.json", c.tmp / "out"]


def _truncated_state_dict(c: Ctx) -> list:
    args = c.reference()
    truncate(c.tmp / "ref" / "state_dict.bin")
    return ["convert-reference", *args, c.tmp / "out"]


CONVERT_CASES = {
    "output folder with a user's file": (
        lambda c: ["convert-reference", *c.reference(), c.folder_with("mine")],
        r"is a folder with 1 entry",
    ),
    "output is the folder of the inputs": (
        lambda c: ["convert-reference", *c.reference(), c.tmp / "ref"],
        r"a folder that holds the input",
    ),
    "output is the state dict itself": (
        lambda c: ["convert-reference", *c.reference(), c.tmp / "ref" / "state_dict.bin"],
        r"the input .*state_dict\.bin itself",
    ),
    "tokenizer larger than the vocabulary": (_big_tokenizer, r"has 6\d\d tokens but the model's vocabulary is 512"),
    "corrupt tokenizer JSON": (_corrupt_tokenizer, r"tok\.json is not a tokenizers JSON file"),
    "non-numeric hidden_size": (
        _convert(_with(hidden_size="sixty-four")),
        r"hidden_size must be a positive integer, got 'sixty-four'",
    ),
    "zero heads": (_convert(_with(num_attention_heads=0)), r"num_attention_heads must be a positive integer, got 0"),
    "negative layers": (_convert(_with(num_layers=-2)), r"num_layers must be a positive integer, got -2"),
    "null vocabulary": (_convert(_with(vocab_size=None)), r"vocab_size must be a positive integer, got None"),
    "fractional intermediate size": (
        _convert(_with(intermediate_size=95.5)),
        r"intermediate_size must be a positive integer, got 95\.5",
    ),
    "hidden not a multiple of heads": (_convert(_with(num_attention_heads=5, d_h=...)), r"not a multiple of"),
    "zero rope theta": (_convert(_with(rope_theta=0)), r"rope_theta must be a positive number, got 0"),
    "truncated reference config": (_convert(text=json.dumps(REFERENCE_CONFIG)[:40]), r"is not valid JSON"),
    "empty reference config": (_convert(text=""), r"is not valid JSON"),
    "reference config holding a list": (_convert(text="[1, 2]"), r"holds a JSON list"),
    "truncated state dict": (_truncated_state_dict, r"cannot read state dict"),
}


@pytest.mark.parametrize("name", list(CONVERT_CASES))
def test_convert_refuses(ctx, name):
    setup, pattern = CONVERT_CASES[name]
    refuses(setup(ctx), "convert-reference", pattern, ctx.tmp)


# ------------------------------------------------------------------------------ broken folders (info, fill)


def _broken(damage: Callable[[Path], None]) -> Callable[[Ctx], Path]:
    def setup(c: Ctx) -> Path:
        folder = c.model()
        damage(folder)
        return folder

    return setup


def _set(**changes) -> Callable[[Ctx], Path]:
    return lambda c: c.edit_config(lambda config: config.update(changes))


def _drop(key: str) -> Callable[[Ctx], Path]:
    def change(config: dict) -> None:
        del config[key]

    return lambda c: c.edit_config(change)


def _shard_index(shard: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        names = load_file(str(folder / "model-00001-of-00001.safetensors"))
        index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


FOLDER_CASES = {
    "truncated config.json": (_broken(lambda f: truncate(f / "config.json")), r"config\.json is not valid JSON"),
    "empty config.json": (_broken(lambda f: (f / "config.json").write_text("")), r"config\.json is empty"),
    "config.json replaced by a run config": (  # what `train output=<a model folder>` once did
        lambda c: _broken(lambda f: shutil.copy(c.run() / "config.json", f / "config.json"))(c),
        r"config\.json is a training run config",
    ),
    "plain Llama config (no mask_token_id)": (_drop("mask_token_id"), r"lacks mask_token_id"),
    "config.json holding a list": (lambda c: c.edit_config(lambda config: [config]), r"holds a JSON list"),
    "null heads": (_set(num_attention_heads=None), r"num_attention_heads must be an integer in \[1, \d+\], got None"),
    "zero layers": (_set(num_hidden_layers=0), r"num_hidden_layers must be an integer in \[1, \d+\], got 0"),
    "string hidden size": (_set(hidden_size="64"), r"hidden_size must be an integer in \[1, \d+\], got '64'"),
    "heads that do not divide hidden": (_set(num_attention_heads=3, head_dim=None), r"not a multiple of 3 heads"),
    "missing rms_norm_eps": (_drop("rms_norm_eps"), r"rms_norm_eps must be a positive number, got None"),
    "vocabulary larger than the weights": (
        _set(vocab_size=1024),
        r"mis-shaped tensors: lm_head\.output\.bias \(512,\) \(expected \(1024,\)\)",
    ),
    "more layers than the weights": (_set(num_hidden_layers=3), r"missing tensors: model\.layers\.2\."),
    "heads x head_dim other than the weights": (_set(head_dim=32), r"mis-shaped tensors: .*self_attn"),
    "corrupt model.safetensors": (
        _broken(lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64)),
        r"model\.safetensors is unreadable",
    ),
    "truncated model.safetensors": (
        _broken(lambda f: truncate(f / "model.safetensors")),
        r"model\.safetensors is unreadable",
    ),
    "empty model.safetensors": (
        _broken(lambda f: (f / "model.safetensors").write_bytes(b"")),
        r"model\.safetensors is unreadable",
    ),
    "a tensor too many": (
        _broken(lambda f: rewrite_weights(f / "model.safetensors", lambda w: w.__setitem__("extra", torch.ones(2)))),
        r"unexpected tensors: extra",
    ),
    "corrupt tokenizer.json": (
        _broken(lambda f: (f / "tokenizer.json").write_text("{corrupt")),
        r"tokenizer\.json is not a tokenizers JSON file",
    ),
    "truncated tokenizer.json": (
        _broken(lambda f: truncate(f / "tokenizer.json")),
        r"tokenizer\.json is not a tokenizers JSON file",
    ),
    "tokenizer larger than the vocabulary": (
        lambda c: _broken(lambda f: shutil.copy(c.made["big"], f / "tokenizer.json"))(c),
        r"has 6\d\d tokens but the model's vocabulary is 512",
    ),
    "truncated tokenizer_config.json": (
        _broken(lambda f: truncate(f / "tokenizer_config.json")),
        r"tokenizer_config\.json is not valid JSON",
    ),
    "shard index naming a file outside the folder": (
        _broken(_shard_index("../model-00001-of-00001.safetensors")),
        r"not a file name inside the folder",
    ),
    "shard index naming a missing shard": (
        _broken(_shard_index("model-00002-of-00002.safetensors")),
        r"names shard model-00002-of-00002\.safetensors, which is missing",
    ),
}


@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_info_refuses_a_broken_folder(ctx, name):
    setup, pattern = FOLDER_CASES[name]
    refuses(["info", setup(ctx)], "info", pattern, ctx.tmp)


@pytest.mark.parametrize(
    "name", ["truncated model.safetensors", "corrupt tokenizer.json", "tokenizer larger than the vocabulary"]
)
def test_fill_refuses_a_broken_folder(ctx, name):
    setup, pattern = FOLDER_CASES[name]
    refuses(["fill", setup(ctx), "--text", "the king <mask> him"], "fill", pattern, ctx.tmp)


def test_fill_refuses_a_text_longer_than_the_context(ctx):
    text = " ".join(["the king loves the crown"] * 40) + " <mask>"
    refuses(["fill", ctx.model(), "--text", text], "fill", r"more than the model's context of 64", ctx.tmp)


# ------------------------------------------------------------------------------ what works


def test_info_of_a_good_folder_prints_no_none(ctx):
    outcome = run_cli(["info", ctx.model()])
    assert outcome.code == 0, outcome.err
    assert "None" not in outcome.out
    assert "attention heads             4 x 16" in outcome.out and "vocabulary                  512" in outcome.out
    assert "rope theta                  160000.0" in outcome.out and "tokenizer.json" in outcome.out


def test_a_sharded_folder_keeps_working(ctx, tmp_path):
    model = perturbed_model()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    outcome = run_cli(["info", tmp_path / "sharded"])
    assert outcome.code == 0, outcome.err
    total = sum(p.numel() for p in model.parameters())
    assert f"({total:,})" in outcome.out
    loaded = load_model(tmp_path / "sharded").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_convert_round_trips_the_reference_weights(ctx):
    args = ctx.reference()
    (ctx.tmp / "out").mkdir()  # an empty folder is a fine output
    outcome = run_cli(["convert-reference", *args, "--tokenizer", ctx.made["tokenizer"], ctx.tmp / "out"])
    assert outcome.code == 0, outcome.err
    reference = torch.load(ctx.tmp / "ref" / "state_dict.bin", weights_only=True)
    loaded = load_model(ctx.tmp / "out").state_dict()
    assert all(torch.equal(loaded[k], reference[hf_to_reference_name(k)]) for k in loaded)
    assert (ctx.tmp / "out" / "tokenizer.json").is_file()


def test_reexport_with_overwrite_replaces_the_model_folder(ctx):
    out = save_folder(perturbed_model(vocab=320, seed=7), ctx.tmp / "out")  # an older export of another model
    (out / "old-note.txt").write_text("left by the previous export")
    weights = load_file(str(ctx.checkpoint() / "model.safetensors"))
    assert not same_tensors(out, weights)  # so the check below can fail
    outcome = run_cli(["export", ctx.run(), out, "--overwrite"])
    assert outcome.code == 0, outcome.err
    assert same_tensors(out, weights)
    assert not (out / "old-note.txt").exists()
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["out", "run"]  # no .out.old-* or .out.tmp-* left
    check_folder(out)


def test_default_export_inside_the_run_replaces_only_with_overwrite(ctx):
    assert run_cli(["export", ctx.run()]).code == 0
    (folder,) = ctx.run().glob("alpha_*")
    refuses(["export", ctx.run()], "export", r"is a model folder \(pass --overwrite", ctx.tmp)
    assert run_cli(["export", ctx.run(), "--overwrite"]).code == 0
    assert same_tensors(folder, load_file(str(ctx.checkpoint() / "model.safetensors")))


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_exported_folder_follows_the_umask(ctx, umask):
    previous = os.umask(umask)
    try:
        outcome = run_cli(["export", ctx.run(), ctx.tmp / "out"])
    finally:
        os.umask(previous)
    assert outcome.code == 0, outcome.err
    out = ctx.tmp / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_stale_staging_is_removed_by_the_next_export(ctx):
    pid = dead_pid()
    stale = [ctx.tmp / f".out.tmp-{pid}-0a1b2c3d", ctx.tmp / f".out.tmp-{pid}-1b2c3d4e"]
    for folder in stale:
        folder.mkdir()
        (folder / "config.json").write_text("{")
    live = ctx.tmp / f".out.tmp-{os.getpid()}-8c9d0e1f"  # a staging folder of a running process stays
    live.mkdir()
    outcome = run_cli(["export", ctx.run(), ctx.tmp / "out"])
    assert outcome.code == 0, outcome.err
    assert not any(p.exists() for p in stale) and live.is_dir()
    check_folder(ctx.tmp / "out")


KILLED_EXPORT = """
import sys, time
from pathlib import Path
from dual_lm import DLMLlamaForCausalLM
from dual_lm.cli import main

def slow_save(self, folder, *args, **kwargs):
    (Path(folder) / "config.json").write_text('{"partial": ')   # a part of the folder is written
    print("writing", flush=True)
    time.sleep(120)

DLMLlamaForCausalLM.save_pretrained = slow_save
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_export_leaves_no_partial_folder_and_the_next_one_cleans_up(ctx):
    run, out = ctx.run(), ctx.tmp / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_EXPORT), "export", str(run), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert not out.exists()
    leftovers = list(ctx.tmp.glob(".out.tmp-*"))
    assert [p.name.split("-")[1] for p in leftovers] == [str(child.pid)]
    outcome = run_cli(["export", run, out])
    assert outcome.code == 0, outcome.err
    assert not any(p.exists() for p in leftovers)
    assert same_tensors(out, load_file(str(ctx.checkpoint() / "model.safetensors")))


def test_overwrite_through_a_link_replaces_the_link_and_keeps_its_target(ctx):
    target = save_folder(perturbed_model(vocab=320, seed=3), ctx.tmp / "target")
    before = snapshot(target)
    (ctx.tmp / "link").symlink_to(target)
    outcome = run_cli(["export", ctx.run(), ctx.tmp / "link", "--overwrite"])
    assert outcome.code == 0, outcome.err
    assert not (ctx.tmp / "link").is_symlink() and snapshot(target) == before
    assert same_tensors(ctx.tmp / "link", load_file(str(ctx.checkpoint() / "model.safetensors")))
