"""Shared fixtures: the reference files (copied into tests/fixtures/reference, see its README) and tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dual_lm.config import PRESETS, llama_config

torch.set_num_threads(1)  # the suite runs on 2 cores: more threads only oversubscribe them

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"  # in the repository: a clone skips nothing
PARITY = REFERENCE / "parity-tiny"
TOKENIZER_51200 = REFERENCE / "tokenizer-51200.json"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the reference files live in tests/fixtures/reference)")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return require(PARITY)


@pytest.fixture(scope="session")
def tokenizer_51200() -> Path:
    return require(TOKENIZER_51200)


@pytest.fixture(scope="session")
def converted(parity_dir, tmp_path_factory) -> Path:
    """The parity checkpoint converted to a model folder by the CLI."""
    from dual_lm.cli import main

    out = tmp_path_factory.mktemp("converted") / "parity-tiny"
    rc = main(
        [
            "convert-reference",
            "--config",
            str(parity_dir / "config.json"),
            "--state-dict",
            str(parity_dir / "state_dict.bin"),
            str(out),
        ]
    )
    assert rc == 0
    return out


@pytest.fixture
def tiny_config():
    """A fresh tiny config (vocab 512, 2 layers, hidden 64, context 64)."""
    import dataclasses

    return llama_config(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64))


def sentences(n, seed):
    rng = random.Random(seed)
    subjects, verbs, objects = (
        ["the king", "a fool", "my lord", "the queen"],
        ["loves", "fears", "sees"],
        ["him", "the crown", "us"],
    )
    return [
        ". ".join(
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(rng.randint(2, 12))
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A prepare-data folder of 300 synthetic documents (vocabulary 320, 300 validation tokens)."""
    from dual_lm.data.prepare import PrepareRequest, prepare_data
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("train-data")
    docs = sentences(300, 0)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    save_tokenizer(train_tokenizer(iter(docs), vocab_size=320), root / "tok.json")
    prepare_data(PrepareRequest(str(root / "tok.json"), (str(root / "corpus.jsonl"),), str(root / "data"), 300, 2))
    return root / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
