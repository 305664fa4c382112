"""convert-reference and info from the command line, and their errors: one clear line, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from dual_lm.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dual_lm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def assert_clear_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dual-lm "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


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
    proc = run_cli("info", out)
    assert proc.returncode == 0, proc.stderr
    assert "layers" in proc.stdout and "2" in proc.stdout and "tokenizer.json" in proc.stdout
    assert "AutoModelForQuestionAnswering" in proc.stdout and "bidirectional" in proc.stdout


def test_missing_tensor(broken):
    tmp, config, state = broken
    del state["encoder.layers.1.mlp.up_proj.weights.1"]
    assert_clear_error(
        run_cli(*convert_args(tmp, config, state)), "missing tensors", "encoder.layers.1.mlp.up_proj.weights.1"
    )


def test_unexpected_tensor(broken):
    tmp, config, state = broken
    state["encoder.layers.2.attention.out_proj.weight"] = torch.zeros(64, 64)
    assert_clear_error(run_cli(*convert_args(tmp, config, state)), "unexpected tensors", "layers.2.attention.out_proj")


def test_misshaped_tensor(broken):
    tmp, config, state = broken
    state["classifier.projection.weight"] = torch.zeros(64, 32)
    assert_clear_error(
        run_cli(*convert_args(tmp, config, state)), "mis-shaped", "classifier.projection.weight (64, 32)"
    )


def test_unknown_config_key(broken):
    tmp, config, state = broken
    config["num_layer"] = 2
    assert_clear_error(run_cli(*convert_args(tmp, config, state)), "unknown key", "'num_layer'", "num_layers")


def test_module_prefix_from_ddp_is_accepted(broken):
    tmp, config, state = broken
    state = {f"module.{k}": v for k, v in state.items()}
    proc = run_cli(*convert_args(tmp, config, state))
    assert proc.returncode == 0, proc.stderr


def test_existing_output_is_not_overwritten(converted):
    proc = run_cli("convert-reference", "--config", "x.json", "--state-dict", "y.bin", converted)
    assert_clear_error(proc, "exists and is a model folder")


def test_missing_inputs(tmp_path):
    assert_clear_error(
        run_cli(
            "convert-reference", "--config", tmp_path / "no.json", "--state-dict", tmp_path / "no.bin", tmp_path / "o"
        ),
        "does not exist",
    )
    assert_clear_error(run_cli("info", tmp_path / "nothing"), "does not exist")


def test_info_on_folder_without_weights(converted, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(converted / "config.json", folder / "config.json")
    assert_clear_error(run_cli("info", folder), "has no weights")


def test_console_script_and_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "convert-reference" in proc.stdout and "info" in proc.stdout
    exe = shutil.which("dual-lm", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None
