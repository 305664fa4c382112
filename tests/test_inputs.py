"""prepare-data and train-tokenizer read what ``datasets`` reads: every input format end to end into
shards, text cut into documents, the report of what was skipped, the hub (offline: one line; a
stand-in hub: pinned and resumable), resuming, and one-line refusals of bad inputs."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import shutil
from pathlib import Path

import pytest

from conftest import sentences
from dual_lm.data import prepare, sources
from dual_lm.data.documents import cut_text
from dual_lm.data.loader import TokenShards
from hostile import assert_same_folder, refuses, run_cli

DOCS = [*sentences(9, 11), 'with a comma, a "quote" and a tab\tinside', "  padded with spaces  "]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    """A 300-token tokenizer, in a folder of its own."""
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tok.json"
    save_tokenizer(train_tokenizer(iter(sentences(40, 3)), vocab_size=300), path)
    return path


def encoded(tok: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok))
    return [tokenizer.encode(t.strip(), add_special_tokens=False).ids for t in texts]


def shard_documents(out: Path) -> list[list[int]]:
    """Every document of a prepared folder, validation first, as token ids."""
    found = []
    for split in ("valid", "train"):
        shards = TokenShards(out, split)
        found += [shards.document(i).tolist() for i in range(shards.num_documents)]
    return found


def prepare_argv(tok: Path, inputs, out: Path, *extra) -> list:
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return ["prepare-data", "--tokenizer", tok, "--input", *inputs, "--output", out, "--num-shards", 2, *extra]


def prepared(tok: Path, inputs, out: Path, *extra) -> tuple[dict, str]:
    outcome = run_cli(prepare_argv(tok, inputs, out, *extra))
    assert outcome.code == 0, outcome.err
    return json.loads((out / "manifest.json").read_text()), outcome.out


# ------------------------------------------------------------------------------ writers of each format


def _json_array(tmp: Path) -> Path:
    path = tmp / "d.json"
    path.write_text(json.dumps([{"id": i, "text": d} for i, d in enumerate(DOCS)]))
    return path


def _json_lines_gz(tmp: Path) -> Path:
    path = tmp / "d.json.gz"
    path.write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()))
    return path


def _jsonl_xz(tmp: Path) -> Path:
    path = tmp / "d.jsonl.xz"
    path.write_bytes(lzma.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()))
    return path


def _csv_text(sep: str) -> bytes:
    path_rows = [["id", "text"], *([str(i), d] for i, d in enumerate(DOCS))]
    from io import StringIO

    buffer = StringIO()
    csv.writer(buffer, delimiter=sep).writerows(path_rows)
    return buffer.getvalue().encode()


def _csv(tmp: Path) -> Path:
    (tmp / "d.csv").write_bytes(_csv_text(","))
    return tmp / "d.csv"


def _tsv_bz2(tmp: Path) -> Path:
    (tmp / "d.tsv.bz2").write_bytes(bz2.compress(_csv_text("\t")))
    return tmp / "d.tsv.bz2"


def _parquet(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp / "d.parquet")
    return tmp / "d.parquet"


def _arrow_stream(tmp: Path) -> Path:
    import pyarrow as pa

    table = pa.table({"text": DOCS, "n": list(range(len(DOCS)))})
    with pa.ipc.new_stream(tmp / "d.arrow", table.schema) as writer:
        writer.write_table(table)
    return tmp / "d.arrow"


def _arrow_file(tmp: Path) -> Path:
    import pyarrow as pa

    table = pa.table({"text": DOCS})
    with pa.ipc.new_file(tmp / "f.arrow", table.schema) as writer:
        writer.write_table(table)
    return tmp / "f.arrow"


def _txt_folder(tmp: Path) -> Path:
    (tmp / "texts").mkdir()
    for i, d in enumerate(DOCS):
        (tmp / "texts" / f"{i:02d}.txt").write_text(d)
    return tmp / "texts"


def _disk_dataset(tmp: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(tmp / "saved")
    return tmp / "saved"


def _disk_dict(tmp: Path) -> Path:
    import datasets

    other = datasets.Dataset.from_dict({"text": ["not this split"]})
    datasets.DatasetDict({"train": other, "test": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(tmp / "dd")
    return tmp / "dd"


FORMATS = [
    ("json-array", _json_array, []),
    ("json-lines-gz", _json_lines_gz, []),
    ("jsonl-xz", _jsonl_xz, []),
    ("csv", _csv, []),
    ("tsv-bz2", _tsv_bz2, []),
    ("parquet", _parquet, []),
    ("arrow-stream", _arrow_stream, []),
    ("arrow-file", _arrow_file, []),
    ("txt-folder", _txt_folder, []),
    ("save-to-disk", _disk_dataset, []),
    ("dataset-dict", _disk_dict, ["--split", "test"]),
]


@pytest.mark.parametrize(("write", "extra"), [c[1:] for c in FORMATS], ids=[c[0] for c in FORMATS])
def test_each_format_lands_its_documents_in_the_shards(tok, tmp_path, write, extra):
    manifest, _ = prepared(tok, write(tmp_path), tmp_path / "out", *extra)
    assert shard_documents(tmp_path / "out") == encoded(tok, DOCS)
    skipped = manifest["skipped"]
    assert manifest["train_documents"] == len(DOCS) and skipped["empty"] == skipped["unreadable_files"] == 0


TEXT = b"first line\r\nsecond line\n\n\n  \nthird, after blanks\n\xff\xfe broken\nlast one\n\n"


@pytest.mark.parametrize(
    ("mode", "good"),
    [
        ("lines", ["first line", "second line", "third, after blanks", "last one"]),
        ("blank-lines", ["first line\r\nsecond line"]),  # the second paragraph holds the broken line
    ],
)
def test_compressed_text_is_cut_into_documents(tok, tmp_path, mode, good):
    """One compressed text file gives many documents (so --valid-tokens works); a piece that is not
    UTF-8 is skipped and counted, blank lines are separators and not counted."""
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(TEXT * 30))
    manifest, out = prepared(tok, tmp_path / "t.txt.gz", tmp_path / "o", "--split-documents", mode, "--valid-tokens", 5)
    assert shard_documents(tmp_path / "o") == encoded(tok, good * 30)
    assert manifest["skipped"] | {"unreadable_examples": []} == {
        "invalid_utf8": 30,
        "empty": 0,
        "not_json": 0,
        "unreadable_files": 0,
        "unreadable_examples": [],
    }
    assert manifest["valid"]["documents"] >= 1 and manifest["split_documents"] == mode
    assert "skipped 30 document(s) {'invalid_utf8': 30, 'empty': 0, 'not_json': 0}" in out


def test_a_text_file_is_one_document_by_default(tok, tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\nthree\n")
    manifest, _ = prepared(tok, tmp_path / "t.txt", tmp_path / "o", "--num-shards", 1)
    assert shard_documents(tmp_path / "o") == encoded(tok, ["one\n\ntwo\nthree"])
    assert "split_documents" not in manifest  # defaults are not recorded: older folders resume as before


def test_cutting_a_row_of_text():
    assert cut_text("a\n \n\nb\nc\n", "blank-lines") == ["a", "b\nc"]
    assert cut_text("a\n\nb\n", "lines") == ["a", "b"]
    assert cut_text(" a\n\nb ", "file") == [" a\n\nb "]


def test_a_folder_reports_the_files_it_skipped(tok, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]) + "{broken\n")
    (folder / "README.md").write_text("# about")
    (folder / "sub" / "b.txt").write_text(DOCS[3])
    (folder / "sub" / "image.png").write_bytes(b"\x89PNG")
    (folder / "sub" / "empty.txt").write_text("  \n")
    _disk_dataset(folder / "sub")  # a save_to_disk folder inside is read as one source, not as loose files
    manifest, out = prepared(tok, folder, tmp_path / "o")
    assert shard_documents(tmp_path / "o") == encoded(tok, [*DOCS[:4], *DOCS])
    skipped = manifest["skipped"]
    assert (skipped["not_json"], skipped["empty"], skipped["unreadable_files"]) == (1, 1, 2)
    assert skipped["unreadable_examples"] == [str(folder / "README.md"), str(folder / "sub" / "image.png")]
    assert "and 2 file(s) of no readable format or read already (" in out and "README.md" in out and "image.png" in out
    tokenizer = run_cli(["train-tokenizer", "--input", folder, "--vocab-size", 300, tmp_path / "t.json"])
    assert tokenizer.code == 0, tokenizer.err
    assert "2 file(s) of no readable format or read already" in tokenizer.out and "1 not JSON" in tokenizer.out


# ------------------------------------------------------------------------------ the hub


@pytest.mark.parametrize("command", ["prepare-data", "train-tokenizer"])
def test_a_hub_name_offline_is_one_line(tok, tmp_path, monkeypatch, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if command == "prepare-data":
        argv = prepare_argv(tok, "hf:someone/some-data", tmp_path / "o")
    else:
        argv = ["train-tokenizer", "--input", "hf:someone/some-data", "--vocab-size", 300, tmp_path / "t.json"]
    refuses(argv, command, r"hf:someone/some-data needs the Hugging Face hub, which is offline.*--input DIR", tmp_path)
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.json").exists()


def test_a_bare_name_is_a_missing_path_with_a_hint(tok, tmp_path):
    refuses(
        prepare_argv(tok, "someone/some-data", tmp_path / "o"),
        "prepare-data",
        r"input someone/some-data does not exist; for a dataset on the Hugging Face hub write hf:someone/some-data",
        tmp_path,
    )


def test_a_hub_text_dataset_is_pinned_and_cut(tok, tmp_path, monkeypatch):
    """A stand-in hub (a local text file behind ``datasets.load_dataset``): the commit is pinned in the
    manifest, --name and --split reach the loader, and --split-documents picks the text builder's rows."""
    import datasets

    (tmp_path / "poems.txt").write_text("a rose\nis red\n\n\nthe sky\nis blue\n")
    calls, real = [], datasets.load_dataset

    def hub(name, config, split, revision, streaming, **kwargs):
        calls.append((name, config, split, revision, streaming, kwargs))
        files = [str(tmp_path / "poems.txt")]
        return real("text", data_files=files, split="train", streaming=True, cache_dir=str(tmp_path / "c"), **kwargs)

    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_resolve_revision", lambda name: "c0ffee")
    monkeypatch.setattr(datasets, "load_dataset", hub)
    args = ("--name", "verse", "--split", "valid", "--split-documents", "blank-lines", "--num-shards", 1)
    manifest, _ = prepared(tok, "hf:me/poems", tmp_path / "o", *args)
    assert shard_documents(tmp_path / "o") == encoded(tok, ["a rose\nis red", "the sky\nis blue"])
    assert manifest["sources"] == ["hf:me/poems (config verse, split valid, revision c0ffee)"]
    assert calls[-1] == ("me/poems", "verse", "valid", "c0ffee", True, {"sample_by": "paragraph"})
    monkeypatch.setattr(sources, "_resolve_revision", lambda name: "beef")  # the hub moved on
    refuses(prepare_argv(tok, "hf:me/poems", tmp_path / "o", *args), "prepare-data", r"other inputs", tmp_path)


# ------------------------------------------------------------------------------ resuming


def _interrupt_at(monkeypatch, shard: str) -> None:
    original = prepare.ShardWriter.add

    def add(self, documents):
        if self.name == shard:
            raise KeyboardInterrupt  # as a Ctrl-C half-way through the shard
        return original(self, documents)

    monkeypatch.setattr(prepare.ShardWriter, "add", add)


def test_an_interrupted_run_resumes_to_the_same_bytes(tok, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    inputs = [_csv(tmp_path / "in"), _disk_dataset(tmp_path / "in")]
    (tmp_path / "in" / "t.txt").write_text("\n".join(DOCS))
    inputs.append(tmp_path / "in" / "t.txt")
    extra = ("--split-documents", "lines", "--num-shards", 3, "--valid-tokens", 20)
    _interrupt_at(monkeypatch, "train-00001")
    assert run_cli(prepare_argv(tok, inputs, tmp_path / "k", *extra)).code == 130
    assert (tmp_path / "k" / "train-00000.json").exists() and not (tmp_path / "k" / "manifest.json").exists()
    monkeypatch.undo()
    prepared(tok, inputs, tmp_path / "k", *extra)
    prepared(tok, inputs, tmp_path / "u", *extra)
    assert_same_folder(tmp_path / "k", tmp_path / "u")
    assert len(shard_documents(tmp_path / "u")) == 3 * len(DOCS)


def test_markers_and_manifests_pin_the_reading_flags():
    """A flag is recorded only when given, and compared also when absent: adding or dropping it differs."""
    assert prepare.differs({"x": 1, "split_documents": "lines"}, {"x": 1})
    assert prepare.differs({"x": 1}, {"x": 1, "split": "test"})
    assert not prepare.differs({"x": 1, "name": "en"}, {"x": 1, "name": "en"})


def test_shards_of_other_flags_are_not_reused(tok, tmp_path, monkeypatch):
    """A run killed before its manifest leaves only markers: the rerun with other flags redoes them and
    ends as a fresh run; a finished folder refuses other flags."""
    (tmp_path / "t.txt").write_text("\n".join(f"{d}\n\n{d}" for d in DOCS))
    _interrupt_at(monkeypatch, "train-00001")
    assert run_cli(prepare_argv(tok, tmp_path / "t.txt", tmp_path / "k", "--split-documents", "lines")).code == 130
    monkeypatch.undo()
    prepared(tok, tmp_path / "t.txt", tmp_path / "k", "--split-documents", "blank-lines")
    prepared(tok, tmp_path / "t.txt", tmp_path / "u", "--split-documents", "blank-lines")
    assert_same_folder(tmp_path / "k", tmp_path / "u")
    refuses(
        prepare_argv(tok, tmp_path / "t.txt", tmp_path / "k", "--split-documents", "lines"),
        "prepare-data",
        r"other inputs, other --split/--name/--split-documents",
        tmp_path,
    )


# ------------------------------------------------------------------------------ refusals


def _write(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _cut(make, keep: float):
    def apply(tmp: Path) -> Path:
        path = make(tmp)
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * keep)])
        return path

    return apply


def _damaged_disk(tmp: Path) -> Path:
    folder = _disk_dataset(tmp)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    return folder


def _csv_gz(tmp: Path) -> Path:
    (tmp / "d.csv.gz").write_bytes(gzip.compress(_csv_text(",") * 200))
    return tmp / "d.csv.gz"


def _plain_jsonl(tmp: Path) -> Path:
    (tmp / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return tmp / "d.jsonl"


REFUSALS = [
    ("unknown-format", _write("x.docx", b"PK"), [], r"unknown input format 'x\.docx'"),
    ("dict-without-split", _disk_dict, [], r"dd is a DatasetDict folder with splits train, test; choose one with"),
    ("dict-unknown-split", _disk_dict, ["--split", "nope"], r"has no split 'nope' \(splits: train, test\)"),
    ("csv-damaged", _write("c.csv", b'id,text\n1,"never closed\n'), [], r"c\.csv is not a readable csv file"),
    ("csv-not-utf8", _write("c.csv", b"id,text\n1,bad \xff\n"), [], r"c\.csv is not a readable csv file \(.*utf-8"),
    ("csv-gz-truncated", _cut(_csv_gz, 0.5), [], r"d\.csv\.gz is not a readable csv\.gz file"),
    ("arrow-garbage", _write("a.arrow", b"not arrow at all"), [], r"a\.arrow is not a readable arrow file"),
    ("arrow-truncated", _cut(_arrow_stream, 0.5), [], r"d\.arrow is not a readable arrow file"),
    ("json-damaged", _write("j.json", b'[{"text": "a"}, {"te'), [], r"j\.json is not a readable json file"),
    ("json-empty", _write("j.json", b""), [], r"j\.json is not a readable json file \(the file holds no JSON\)"),
    ("json-gz-empty", _write("j.json.gz", gzip.compress(b"  \n")), [], r"j\.json\.gz is not a readable json file"),
    ("parquet-truncated", _cut(_parquet, 0.7), [], r"d\.parquet is not a readable parquet file"),
    ("jsonl-bz2-garbage", _write("j.jsonl.bz2", b"never bz2"), [], r"j\.jsonl\.bz2 is not a readable bz2 file"),
    ("jsonl-xz-truncated", _cut(_jsonl_xz, 0.5), [], r"d\.jsonl\.xz is not a readable xz file"),
    ("txt-gz-garbage", _write("t.txt.gz", b"never gzip"), [], r"t\.txt\.gz is not a readable gzip file"),
    ("save-to-disk-damaged", _damaged_disk, [], r"saved is not a readable save_to_disk file"),
    ("csv-no-column", _csv, ["--text-field", "body"], r"d\.csv has no column 'body' \(columns: id, text\)"),
    ("disk-no-column", _disk_dataset, ["--text-field", "body"], r"saved has no column 'body' \(columns: text, n\)"),
    ("split-mode", _plain_jsonl, ["--split-documents", "words"], r"--split-documents: invalid choice: 'words'"),
    ("name-on-a-file", _plain_jsonl, ["--name", "en"], r"--name \(a dataset configuration\) applies only to hf:"),
    ("split-on-a-file", _plain_jsonl, ["--split", "test"], r"--split applies only to hf:NAME inputs and DatasetDict"),
    ("split-on-a-dataset", _disk_dataset, ["--split", "train"], r"--split applies only to hf:NAME inputs"),
    ("cut-not-text", _plain_jsonl, ["--split-documents", "lines"], r"--split-documents lines applies only to text"),
]


@pytest.mark.parametrize(("make", "extra", "pattern"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_a_bad_input_is_refused_in_one_line(tok, tmp_path, make, extra, pattern):
    (tmp_path / "in").mkdir()
    path = make(tmp_path / "in")
    refuses(prepare_argv(tok, path, tmp_path / "out", *extra), "prepare-data", pattern, tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_output_inside_an_input_folder_is_refused(tok, tmp_path):
    folder = _txt_folder(tmp_path)
    refuses(prepare_argv(tok, folder, folder / "sub"), "prepare-data", r"lies inside the input folder", tmp_path)
    assert not (folder / "sub").exists()


def test_links_are_read_once_and_counted(tok, tmp_path):
    """A link to a file of the folder is read once (the file itself); links to folders or to nothing
    are skipped and counted, so no document is read twice or lands in both splits."""
    folder = _txt_folder(tmp_path)
    (folder / "zz-link.txt").symlink_to(folder / "00.txt")
    (folder / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (folder / "dirlink").symlink_to(tmp_path)
    manifest, out = prepared(tok, folder, tmp_path / "out")
    assert shard_documents(tmp_path / "out") == encoded(tok, DOCS)
    assert manifest["skipped"]["unreadable_files"] == 3 and "zz-link.txt" in out and "dirlink" in out


def test_a_json_column_of_mixed_types_keeps_its_strings(tok, tmp_path):
    """datasets' json reader would store every value JSON-encoded (quotes, escapes); here the strings
    stay as written and the others are counted as empty, as in .jsonl."""
    texts = ["line one\nline two \u00e9", "thou art a villain"] * 3
    records = [{"text": t} for t in texts] + [{"text": 7}, {"text": {"x": 1}}]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    manifest, _ = prepared(tok, tmp_path / "mixed.json", tmp_path / "out")
    assert shard_documents(tmp_path / "out") == encoded(tok, texts)
    assert manifest["skipped"]["empty"] == 2


def test_train_tokenizer_takes_the_same_inputs(tmp_path):
    path = _disk_dict(tmp_path)
    outcome = run_cli(["train-tokenizer", "--input", path, "--split", "test", "--vocab-size", 300, tmp_path / "t.json"])
    assert outcome.code == 0, outcome.err
    assert f"trained on {len(DOCS)} documents" in outcome.out
    shutil.rmtree(path / "test")
    argv = ["train-tokenizer", "--input", path, "--split", "test", "--vocab-size", 300, tmp_path / "u.json"]
    refuses(argv, "train-tokenizer", r"has no split 'test'", tmp_path)
