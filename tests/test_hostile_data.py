"""Hostile inputs for prepared data: damaged data folders opened by `train`, `prepare-data` outputs that
are not its own, damaged compressed inputs, a full disk, and what a killed prepare-data leaves.

Every refusal goes through ``hostile.refuses``: exit 2, one line naming the problem, no traceback,
and every pre-existing file byte-identical afterwards."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import sentences
from dual_lm import ownership
from dual_lm.data import prepare
from hostile import assert_same_folder, refuses, run_cli

# ------------------------------------------------------------------------------ data folders opened by train


def copy_data(data_dir: Path, target: Path) -> Path:
    shutil.copytree(data_dir, target, ignore=shutil.ignore_patterns(ownership.LOCK_NAME))
    return target


def edit_manifest(change):
    def apply(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return apply


def write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def cut(name: str, keep):
    """Keep ``keep(size)`` bytes of ``name`` (a truncated copy)."""

    def apply(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: keep(len(raw))])

    return apply


def grow(name: str, extra: bytes):
    def apply(folder: Path) -> None:
        with open(folder / name, "ab") as handle:
            handle.write(extra)

    return apply


def edit_offsets(name: str, change):
    def apply(folder: Path) -> None:
        offsets = np.load(folder / name)
        np.save(folder / name, change(offsets.copy()))

    return apply


def _decreasing(offsets):
    offsets[1], offsets[2] = offsets[2], offsets[1]
    return offsets


def _short_end(offsets):
    offsets[-1] -= 1
    return offsets


def _elsewhere(manifest):
    manifest["shards"][0]["name"] = "../../elsewhere/x"


DAMAGED_DATA = [
    ("manifest-truncated", cut("manifest.json", lambda n: n // 2), r"manifest\.json is not valid JSON.*prepare-data"),
    ("manifest-empty", write("manifest.json", b""), r"manifest\.json is not valid JSON.*re-run `dual-lm prepare-data`"),
    ("manifest-binary", write("manifest.json", b"\xff\xfe\x00garbage"), r"manifest\.json is not valid JSON"),
    ("manifest-list", write("manifest.json", b"[1, 2]"), r"manifest\.json does not hold a JSON object"),
    ("manifest-no-shards", edit_manifest(lambda m: m.pop("shards")), r"manifest\.json lacks shards"),
    (
        "manifest-future-format",
        edit_manifest(lambda m: m.update(format=99)),
        r"format 99, written by a newer dual-lm",
    ),
    ("manifest-vocab-text", edit_manifest(lambda m: m.update(vocab_size="big")), r"vocab_size = 'big', not a count"),
    ("manifest-dtype", edit_manifest(lambda m: m.update(dtype="float64")), r"dtype 'float64', not one of"),
    ("manifest-no-entries", edit_manifest(lambda m: m.update(shards=[])), r"needs a non-empty list of shards"),
    ("shard-tokens-negative", edit_manifest(lambda m: m["shards"][0].update(tokens=-3)), r"tokens = -3, not a count"),
    ("shard-name-escapes", edit_manifest(_elsewhere), r"'\.\./\.\./elsewhere/x', which is not a plain file name"),
    (
        "shard-name-absolute",
        edit_manifest(lambda m: m["shards"][1].update(name="/etc/passwd")),
        r"'/etc/passwd', which is not a plain file name",
    ),
    ("shard-name-dotdot", edit_manifest(lambda m: m["shards"][0].update(name="..")), r"'\.\.', which is not a plain"),
    ("shard-entry-not-object", edit_manifest(lambda m: m["shards"].append(7)), r"shard entry without name"),
    ("tokens-truncated", cut("train-00001.tokens", lambda n: n - 6), r"train-00001\.tokens holds \d+ bytes, but"),
    ("tokens-zero-bytes", write("train-00000.tokens", b""), r"train-00000\.tokens holds 0 bytes, but manifest"),
    ("tokens-longer", grow("train-00000.tokens", b"\0\0"), r"train-00000\.tokens holds \d+ bytes, but manifest"),
    ("tokens-missing", lambda f: (f / "train-00001.tokens").unlink(), r"train-00001\.tokens is missing"),
    ("valid-truncated", cut("valid.tokens", lambda n: n // 2), r"valid\.tokens holds \d+ bytes"),
    ("docs-garbage", write("train-00000.docs.npy", b"not numpy"), r"train-00000\.docs\.npy is not a readable document"),
    ("docs-truncated", cut("train-00001.docs.npy", lambda n: n - 16), r"train-00001\.docs\.npy is not a readable"),
    ("docs-count", edit_offsets("train-00000.docs.npy", lambda o: o[:-1]), r"docs\.npy does not hold \d+ \+ 1 integer"),
    ("docs-decreasing", edit_offsets("train-00000.docs.npy", _decreasing), r"does not run from 0 to \d+ without going"),
    ("docs-end", edit_offsets("train-00001.docs.npy", _short_end), r"train-00001\.docs\.npy does not run from 0"),
    ("docs-floats", edit_offsets("valid.docs.npy", lambda o: o.astype(np.float64)), r"valid\.docs\.npy does not hold"),
    ("no-manifest", lambda f: (f / "manifest.json").unlink(), r"has no manifest\.json; run `dual-lm prepare-data`"),
]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    values = {
        "data.path": data,
        "output": out,
        "data.seq_len": 32,
        "train.micro_batch_rows": 4,
        "train.global_batch_tokens": 128,
        "train.steps": 2,
        "eval.every": 0,
        "eval.batches": 1,
        "checkpoint.every": 2,
    }
    return ["train", *(f"{k}={v}" for k, v in values.items()), *extra]


@pytest.mark.parametrize(("damage", "pattern"), [c[1:] for c in DAMAGED_DATA], ids=[c[0] for c in DAMAGED_DATA])
def test_train_refuses_a_damaged_data_folder(data_dir, tmp_path, damage, pattern):
    data = copy_data(data_dir, tmp_path / "data")
    damage(data)
    refuses(train_args(data, tmp_path / "run"), "train", pattern, tmp_path)
    assert not (tmp_path / "run").exists()  # nothing is left behind by a refused run


def test_elsewhere_is_never_read(data_dir, tmp_path):
    """The escaping shard name points at a real file of the right size: it is still refused."""
    data = copy_data(data_dir, tmp_path / "a" / "b" / "data")
    (tmp_path / "a" / "elsewhere").mkdir()
    shutil.copy(data / "train-00000.tokens", tmp_path / "a" / "elsewhere" / "x.tokens")
    shutil.copy(data / "train-00000.docs.npy", tmp_path / "a" / "elsewhere" / "x.docs.npy")
    edit_manifest(_elsewhere)(data)
    refuses(train_args(data, tmp_path / "run"), "train", r"not a plain file name", tmp_path)


def test_an_intact_copy_trains(data_dir, tmp_path):
    """The checks accept what prepare-data writes (the control of the table above)."""
    data = copy_data(data_dir, tmp_path / "data")
    assert run_cli(train_args(data, tmp_path / "run")).code == 0


# ------------------------------------------------------------------------------ prepare-data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(a JSONL corpus of 40 documents, a 300-token tokenizer trained on it), in a folder of their own."""
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    docs = sentences(40, 3)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    save_tokenizer(train_tokenizer(iter(docs), vocab_size=300), root / "tok.json")
    return root / "corpus.jsonl", root / "tok.json"


def prepare_args(tokenizer: Path, inputs, out: Path) -> list:
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return ["prepare-data", "--tokenizer", tokenizer, "--input", *inputs, "--output", out, "--num-shards", 2]


def _model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps({"model_type": "dlm_llama", "auto_map": {"AutoModel": "modeling_dlm_llama.X"}})
    )
    (path / "modeling_dlm_llama.py").write_text("# the model\n")
    (path / "tokenizer.json").write_text('{"model": {}, "added_tokens": []}')
    return path


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my own notes")
    return path


def _run_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"objective": {}, "data": {}, "train": {}}))
    return path


def _file(path: Path) -> Path:
    path.write_text("a user's file")
    return path


OUTPUTS = [
    ("model-folder", lambda root, corpus, tok: _model_folder(root / "m"), r"it exists and is a model folder"),
    ("user-folder", lambda root, corpus, tok: _user_folder(root / "u"), r"it exists and is a folder with 1 entry"),
    ("run-folder", lambda root, corpus, tok: _run_folder(root / "r"), r"it exists and is a run folder"),
    ("a-file", lambda root, corpus, tok: _file(root / "f.txt"), r"it exists and is a file"),
    ("the-input", lambda root, corpus, tok: corpus, r"it is the input .*corpus\.jsonl itself"),
    ("input-folder", lambda root, corpus, tok: corpus.parent, r"it is a folder that holds the input"),
    ("the-tokenizer", lambda root, corpus, tok: tok, r"it is the input .*tok\.json itself"),
    ("dangling-link", lambda root, corpus, tok: _dangling(root / "link"), r"it is a dangling symbolic link"),
]


def _dangling(path: Path) -> Path:
    path.symlink_to(path.parent / "nowhere")
    return path


@pytest.mark.parametrize(("make", "pattern"), [c[1:] for c in OUTPUTS], ids=[c[0] for c in OUTPUTS])
def test_prepare_data_refuses_an_output_that_is_not_its_own(corpus, tmp_path, make, pattern):
    text, tok = corpus
    work = tmp_path / "work"
    shutil.copytree(text.parent, work)
    out = make(tmp_path, work / text.name, work / tok.name)
    refuses(prepare_args(work / tok.name, work / text.name, out), "prepare-data", pattern, tmp_path)


def _jsonl_bytes() -> bytes:
    return "".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(500)).encode()


def _gzip(data: bytes, keep=1.0) -> bytes:
    packed = gzip.compress(data)
    return packed[: int(len(packed) * keep)]


def _zstd(data: bytes, keep=1.0) -> bytes:
    import zstandard

    packed = zstandard.ZstdCompressor().compress(data)
    return packed[: int(len(packed) * keep)]


def _parquet_bytes(tmp: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"document {i}" for i in range(50)]}), tmp)
    return tmp.read_bytes()


BAD_INPUTS = [
    ("gzip-garbage", "c.jsonl.gz", lambda tmp: b"this was never gzip", r"c\.jsonl\.gz is not a readable gzip file"),
    ("gzip-truncated", "c.jsonl.gz", lambda tmp: _gzip(_jsonl_bytes(), 0.5), r"c\.jsonl\.gz is not a readable gzip"),
    ("zstd-garbage", "c.jsonl.zst", lambda tmp: b"this was never zstd", r"c\.jsonl\.zst is not a readable zstd file"),
    ("zstd-truncated", "c.jsonl.zst", lambda tmp: _zstd(_jsonl_bytes(), 0.5), r"c\.jsonl\.zst is not a readable zstd"),
    ("parquet-garbage", "c.parquet", lambda tmp: b"PAR1 and then nothing", r"c\.parquet is not a readable parquet"),
    ("parquet-empty", "c.parquet", lambda tmp: b"", r"c\.parquet is not a readable parquet file"),
    ("parquet-truncated", "c.parquet", lambda tmp: _parquet_bytes(tmp / "p")[:-20], r"c\.parquet is not a readable"),
]


@pytest.mark.parametrize(("name", "content", "pattern"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_prepare_data_names_a_damaged_input(corpus, tmp_path, name, content, pattern):
    _, tok = corpus
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / name).write_bytes(content(tmp_path))
    shutil.copy(corpus[0], inputs / "a.jsonl")  # a good input before it: the damaged one still stops the run
    refuses(prepare_args(tok, [inputs / "a.jsonl", inputs / name], tmp_path / "out"), "prepare-data", pattern, tmp_path)
    assert not (tmp_path / "out").exists()


def test_prepare_data_into_a_folder_another_process_writes(corpus, tmp_path):
    text, tok = corpus
    out = tmp_path / "out"
    with ownership.exclusive(out, "prepare-data folder"):
        refuses(
            prepare_args(tok, text, out),
            "prepare-data",
            rf"in use by another dual-lm process \(pid {os.getpid()}\)",
            tmp_path,
        )


def test_disk_full_keeps_committed_shards_and_the_rerun_finishes(corpus, tmp_path, monkeypatch):
    text, tok = corpus
    original = prepare.ShardWriter.add

    def full_disk(self, documents):
        if self.name == "train-00001":
            self.handle.write(b"\0" * 10)  # half a shard on disk, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))
        return original(self, documents)

    monkeypatch.setattr(prepare.ShardWriter, "add", full_disk)
    refuses(
        prepare_args(tok, text, tmp_path / "out"),
        "prepare-data",
        r"No space left on device.*free some space",
        text.parent,
    )
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not [n for n in names if ".tmp" in n], names  # the shard's temporary file is gone
    assert {"train-00000.tokens", "train-00000.json", "valid.json"} <= set(names) and "manifest.json" not in names
    kept = (tmp_path / "out" / "train-00000.tokens").read_bytes()
    monkeypatch.setattr(prepare.ShardWriter, "add", original)
    assert run_cli(prepare_args(tok, text, tmp_path / "out")).code == 0
    assert (tmp_path / "out" / "train-00000.tokens").read_bytes() == kept  # committed shards were not redone
    assert_same_folder(tmp_path / "out", fresh(tok, text, tmp_path / "fresh"))


def fresh(tok: Path, text: Path, out: Path) -> Path:
    assert run_cli(prepare_args(tok, text, out)).code == 0
    return out


def test_a_killed_prepare_leaves_temporaries_that_the_next_run_removes(corpus, tmp_path):
    text, tok = corpus
    out = fresh(tok, text, tmp_path / "out")
    (out / "manifest.json").unlink()  # as if killed before the end ...
    (out / "train-00001.json").unlink()
    leftovers = [
        ".train-00001.tokens.tmp",
        ".train-00001.docs.tmp.npy",
        ".manifest.json.tmp-99999",
        ".valid.json.tmp-7",
    ]
    leftovers += [".train-00004.tokens.tmp", ".tokenizer.json.tmp"]  # ... or by an earlier run of other --num-shards
    for name in leftovers:
        (out / name).write_bytes(b"half")
    assert ownership.describe(out) == "a prepare-data folder"  # a partial folder still counts as its own
    outcome = run_cli(prepare_args(tok, text, out))
    assert outcome.code == 0, outcome.err
    assert "removed 6 temporary file(s)" in outcome.err
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert_same_folder(out, fresh(tok, text, tmp_path / "again"))


def test_a_damaged_manifest_is_rewritten_on_the_rerun(corpus, tmp_path):
    text, tok = corpus
    out = fresh(tok, text, tmp_path / "out")
    (out / "manifest.json").write_text('{"format": 1, "shards": [')
    outcome = run_cli(prepare_args(tok, text, out))
    assert outcome.code == 0 and "manifest.json is damaged" in outcome.err
    assert_same_folder(out, fresh(tok, text, tmp_path / "again"))


# ------------------------------------------------------------------------------ train-tokenizer


TOKENIZER_OUTPUTS = [
    ("a-folder", lambda root, text: _user_folder(root / "u"), r"it exists and is a folder with 1 entry"),
    ("an-empty-folder", lambda root, text: _empty(root / "e"), r"it exists and is a folder with 0 entries"),
    ("the-input", lambda root, text: text, r"it is the input .*corpus\.jsonl itself"),
    ("a-tokenizer", lambda root, text: _file_with(root / "t.json", '{"model": {}, "added_tokens": []}'), r"is a tok"),
    ("a-user-file", lambda root, text: _file(root / "mine.json"), r"it exists and is a file"),
]


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def _file_with(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("make", "pattern"), [c[1:] for c in TOKENIZER_OUTPUTS], ids=[c[0] for c in TOKENIZER_OUTPUTS])
def test_train_tokenizer_never_replaces_a_file(corpus, tmp_path, make, pattern):
    text = shutil.copy(corpus[0], tmp_path / "corpus.jsonl")
    out = make(tmp_path, Path(text))
    argv = ["train-tokenizer", "--input", text, "--vocab-size", 300, out]
    refuses(argv, "train-tokenizer", pattern, tmp_path)


def test_train_tokenizer_names_a_damaged_input(tmp_path):
    (tmp_path / "c.jsonl.gz").write_bytes(_gzip(_jsonl_bytes(), 0.5))
    argv = ["train-tokenizer", "--input", tmp_path / "c.jsonl.gz", "--vocab-size", 300, tmp_path / "t.json"]
    refuses(argv, "train-tokenizer", r"c\.jsonl\.gz is not a readable gzip file", tmp_path)
    assert not (tmp_path / "t.json").exists()


def test_a_refused_rerun_leaves_a_partial_folder_as_it_was(corpus, tmp_path):
    """Stale temporaries are removed only once a run begins to write: a run refused before (here for a
    damaged input) changes nothing in the folder it would have resumed."""
    text, tok = corpus
    out = fresh(tok, text, tmp_path / "out")
    (out / "manifest.json").unlink()
    (out / ".train-00001.tokens.tmp").write_bytes(b"half")
    (tmp_path / "c.jsonl.gz").write_bytes(b"never gzip")
    argv = prepare_args(tok, [text, tmp_path / "c.jsonl.gz"], out)
    refuses(argv, "prepare-data", r"c\.jsonl\.gz is not a readable gzip file", out)
    assert (out / ".train-00001.tokens.tmp").read_bytes() == b"half"
