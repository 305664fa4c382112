"""convert-reference and info from the command line, and their errors: one clear line, no traceback.

The refusals run in-process (``hostile.refuses``); one test runs the console script in its own process
to prove that a refusal there is one line as well."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dual_lm.cli import main
from hostile import refuses, run_cli


@pytest.fixture
def broken(parity_dir, tmp_path):
    """A writable copy of the parity checkpoint that tests may damage."""
    config = json.loads((parity_dir / "config.json").read_text())
    state = torch.load(parity_dir / "state_dict.bin", weights_only=True)
    return tmp_path, config, state


def convert_args(tmp_path, config, state):
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "state_dict.bin")
    return [
        "convert-reference",
        "--config",
        tmp_path / "config.json",
        "--state-dict",
        tmp_path / "state_dict.bin",
        tmp_path / "out",
    ]


def test_convert_with_tokenizer_and_info(parity_dir, tokenizer_51200, tmp_path):
    # the 51,200 tokenizer needs a 51,200 vocabulary: the fixture's config with only that changed
    # (and a state dict to match) proves the folder carries the tokenizer
    config = json.loads((parity_dir / "config.json").read_text()) | {"vocab_size": 51200}
    state = torch.load(parity_dir / "state_dict.bin", weights_only=True)
    state["embedding.word_embedding.weight"] = torch.randn(51200, 64)
    state["classifier.emb2vocab.weight"] = torch.randn(51200, 64)
    state["classifier.emb2vocab.bias"] = torch.zeros(51200)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "state_dict.bin")
    out = tmp_path / "with-tok"
    rc = main(
        [
            "convert-reference",
            "--config",
            str(tmp_path / "config.json"),
            "--state-dict",
            str(tmp_path / "state_dict.bin"),
            "--tokenizer",
            str(tokenizer_51200),
            str(out),
        ]
    )
    assert rc == 0 and (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    info = run_cli(["info", out])
    assert info.code == 0, info.err
    assert "tokenizer.json" in info.out and "AutoModelForQuestionAnswering" in info.out and "bidirectional" in info.out
    assert re.search(r"layers\s+2\b", info.out), info.out


def test_missing_tensor(broken):
    tmp, config, state = broken
    del state["encoder.layers.1.mlp.up_proj.weights.1"]
    refuses(
        convert_args(tmp, config, state),
        "convert-reference",
        r"missing tensors.*encoder\.layers\.1\.mlp\.up_proj\.weights\.1",
        tmp,
    )


def test_unexpected_tensor(broken):
    tmp, config, state = broken
    state["encoder.layers.2.attention.out_proj.weight"] = torch.zeros(64, 64)
    refuses(
        convert_args(tmp, config, state),
        "convert-reference",
        r"unexpected tensors.*layers\.2\.attention\.out_proj",
        tmp,
    )


def test_misshaped_tensor(broken):
    tmp, config, state = broken
    state["classifier.projection.weight"] = torch.zeros(64, 32)
    refuses(
        convert_args(tmp, config, state),
        "convert-reference",
        r"mis-shaped.*classifier\.projection\.weight \(64, 32\)",
        tmp,
    )


def test_unknown_config_key(broken):
    tmp, config, state = broken
    config["num_layer"] = 2
    refuses(convert_args(tmp, config, state), "convert-reference", r"unknown key.*'num_layer'.*num_layers", tmp)


def test_module_prefix_from_ddp_is_accepted(broken, converted):
    tmp, config, state = broken
    state = {f"module.{k}": v for k, v in state.items()}
    outcome = run_cli(convert_args(tmp, config, state))
    assert outcome.code == 0, outcome.err
    # the same tensors as the unprefixed checkpoint, converted by the fixture
    assert (tmp / "out" / "model.safetensors").read_bytes() == (converted / "model.safetensors").read_bytes()


def test_existing_output_is_not_overwritten(converted):
    argv = ["convert-reference", "--config", "x.json", "--state-dict", "y.bin", converted]
    refuses(argv, "convert-reference", "exists and is a model folder", converted)


def test_missing_inputs(tmp_path):
    argv = ["convert-reference", "--config", tmp_path / "no.json", "--state-dict", tmp_path / "no.bin", tmp_path / "o"]
    refuses(argv, "convert-reference", "does not exist", tmp_path)
    assert not (tmp_path / "o").exists()
    refuses(["info", tmp_path / "nothing"], "info", "does not exist", tmp_path)


def test_info_on_folder_without_weights(converted, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(converted / "config.json", folder / "config.json")
    refuses(["info", folder], "info", "has no weights", tmp_path)


def test_console_script_refusal_is_one_line_in_its_own_process(tmp_path):
    """The installed console script, in a fresh process: help works, and a refusal is one line, exit 2."""
    exe = shutil.which("dual-lm", path=str(Path(sys.executable).parent))
    assert exe is not None
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    helped = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and "convert-reference" in helped.stdout and "info" in helped.stdout
    proc = subprocess.run(
        [exe, "info", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dual-lm info: error: ") and "does not exist" in lines[0], lines
