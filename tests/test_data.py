"""prepare-data shards and the packing loader: boundaries, repetitions, resume, formats, bad input."""

import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from dual_lm.cli import main
from dual_lm.data.loader import PackedLoader, TokenShards, feistel_permutation
from dual_lm.data.prepare import PrepareRequest, prepare_data

WORDS = "the a of to in and dual model mask token attention causal prefix repeat epoch shard row".split()  # noqa: SIM905


def make_docs(n=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def prepared(tokenizer_51200, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prep")
    docs = make_docs()
    corpus = write_jsonl(folder / "corpus.jsonl", docs)
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(folder / "out"), 200, 3))
    return folder / "out", docs


def test_shards_hold_the_documents_in_order(prepared, tokenizer_51200):
    from tokenizers import Tokenizer

    out, docs = prepared
    tok = Tokenizer.from_file(str(tokenizer_51200))
    valid, train = TokenShards(out, "valid"), TokenShards(out, "train")
    assert valid.num_tokens >= 200 and valid.tokens_before(valid.num_documents - 1) < 200
    assert valid.num_documents + train.num_documents == len(docs)
    assert len(train.tokens) == 3 and train.tokens[0].dtype == np.uint16
    for i, doc in enumerate(docs):
        split, local = (valid, i) if i < valid.num_documents else (train, i - valid.num_documents)
        assert split.document(local).tolist() == tok.encode(doc, add_special_tokens=False).ids


def all_rows(loader, batches):
    out = [loader.next_batch() for _ in range(batches)]
    return out


def test_packing_boundaries_and_document_ids(prepared):
    """Each document is shifted on its own (DESIGN.md section 3): <s> is never a target, no pair crosses a
    document, and a new document id starts exactly at each <s> input."""
    out, _ = prepared
    shards = TokenShards(out)
    loader = PackedLoader(shards, seq_len=32, rows_per_rank=4, seed=3)
    for batch in all_rows(loader, 20):
        inputs, targets, docs = batch.inputs, batch.targets, batch.document_ids
        assert inputs.shape == targets.shape == docs.shape == (4, 32)
        assert not torch.any(targets == 1)
        starts = docs[:, 1:] != docs[:, :-1]
        assert torch.equal(starts, inputs[:, 1:] == 1)
        # inside a document the pairs chain (input j+1 = target j); across a boundary the next input is <s>
        assert torch.equal(inputs[:, 1:][~starts], targets[:, :-1][~starts])
        assert torch.all(docs[:, 0] <= 1) and torch.all((docs[:, 1:] - docs[:, :-1]) >= 0)


def test_every_document_starts_with_bos_and_epoch_tail_is_dropped(prepared):
    out, _ = prepared
    shards = TokenShards(out)
    loader = PackedLoader(shards, seq_len=16, rows_per_rank=1, seed=0)
    assert loader.rows_per_epoch == shards.num_tokens // 16  # one (input, target) pair per token
    stream = [loader.next_batch() for _ in range(loader.rows_per_epoch)]
    starts = int(sum((b.inputs == 1).sum() for b in stream))
    assert starts in (shards.num_documents, shards.num_documents - 1)  # the last one may lie in the tail
    assert (loader.state.epoch, loader.state.position) == (1, 0)  # the partial tail is dropped
    assert all(b.epoch == 0 for b in stream) and loader.next_batch().epoch == 1


def test_repetitions_keep_the_first_fraction_and_repack_each_epoch(prepared):
    out, _ = prepared
    shards = TokenShards(out)
    loader = PackedLoader(shards, seq_len=16, rows_per_rank=1, repetitions=4, seed=0)
    budget = shards.num_tokens // 4
    assert loader.kept_tokens == budget
    assert shards.tokens_before(loader.num_docs - 1) < budget <= shards.tokens_before(loader.num_docs)
    epochs: dict[int, list] = {}
    while loader.state.epoch < 4:
        batch = loader.next_batch()
        epochs.setdefault(batch.epoch, []).append(batch.inputs[0])
    assert sorted(epochs) == [0, 1, 2, 3]  # R passes over the kept quarter fill the budget of one pass
    full = PackedLoader(shards, seq_len=16, rows_per_rank=1, repetitions=1)
    assert abs(4 * loader.rows_per_epoch - full.rows_per_epoch) <= 4  # rows count pairs = tokens, order-free
    kept = set()
    for doc in range(loader.num_docs):
        kept.update(shards.document(doc).tolist())
    for rows in epochs.values():
        assert set(torch.cat(rows).tolist()) - {1} <= kept
    assert not torch.equal(torch.stack(epochs[0][:3]), torch.stack(epochs[1][:3]))  # re-packed


def test_restored_state_reproduces_batches(prepared):
    out, _ = prepared
    first = PackedLoader(TokenShards(out), seq_len=24, rows_per_rank=3, repetitions=2, seed=9)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    expected = [first.next_batch() for _ in range(12)]
    second = PackedLoader(TokenShards(out), seq_len=24, rows_per_rank=3, repetitions=2, seed=9)
    second.load_state_dict(state)
    for want in expected:
        got = second.next_batch()
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.document_ids, want.document_ids)


def test_ranks_split_the_global_batch(prepared):
    out, _ = prepared
    whole = PackedLoader(TokenShards(out), seq_len=16, rows_per_rank=4, seed=1)
    parts = [PackedLoader(TokenShards(out), seq_len=16, rows_per_rank=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        expected = whole.next_batch().inputs
        assert torch.equal(torch.cat([p.next_batch().inputs for p in parts]), expected)


def test_feistel_permutation_is_a_bijection():
    for n in (1, 2, 7, 100, 1025):
        perm = feistel_permutation(np.arange(n), n, key=5)
        assert sorted(perm.tolist()) == list(range(n))
    assert not np.array_equal(feistel_permutation(np.arange(100), 100, 1), feistel_permutation(np.arange(100), 100, 2))


def test_all_formats_read_the_same_documents(tmp_path, tokenizer_51200):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = make_docs(12, seed=4)
    write_jsonl(tmp_path / "a.jsonl", docs)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    )
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(docs):
        (txt / f"{i:02d}.txt").write_text(d)
    results = []
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "txt"):
        out = tmp_path / f"out-{name}"
        prepare_data(PrepareRequest(str(tokenizer_51200), (str(tmp_path / name),), str(out), 0, 2))
        shards = TokenShards(out)
        results.append([shards.document(i).tolist() for i in range(shards.num_documents)])
    assert all(r == results[0] for r in results) and len(results[0]) == 12


KILLER = r"""
import os, signal, sys
from dual_lm.data import prepare
calls = {"n": 0}
original = prepare.ShardWriter.add
def add(self, documents):
    calls["n"] += 1
    if self.name == "train-00002":
        os.kill(os.getpid(), signal.SIGKILL)   # die half-way: two shards done, the third half-written
    return original(self, documents)
prepare.ShardWriter.add = add
prepare.prepare_data(prepare.PrepareRequest(sys.argv[1], (sys.argv[2],), sys.argv[3], 100, 4))
"""


def test_prepare_killed_half_way_then_rerun_equals_uninterrupted(tmp_path, tokenizer_51200):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_docs(80, seed=7))
    killed = subprocess.run([sys.executable, "-c", KILLER, str(tokenizer_51200), str(corpus), str(tmp_path / "k")])
    assert killed.returncode == -9
    assert not (tmp_path / "k" / "manifest.json").exists() and (tmp_path / "k" / "train-00001.json").exists()
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(tmp_path / "k"), 100, 4))
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(tmp_path / "u"), 100, 4))
    names = sorted(p.name for p in (tmp_path / "u").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "k").iterdir())
    for name in names:
        a, b = (tmp_path / "k" / name).read_bytes(), (tmp_path / "u" / name).read_bytes()
        if name == "manifest.json":
            a, b = (json.loads(x) for x in (a, b))
            a.pop("seconds"), b.pop("seconds")
        assert a == b, name


def run(*args):
    return main([str(a) for a in args])


def test_bad_inputs(tmp_path, tokenizer_51200, capsys):
    def prepare(name, out, tokenizer=tokenizer_51200):
        return run("prepare-data", "--tokenizer", tokenizer, "--input", tmp_path / name, "--output", tmp_path / out)

    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert prepare("empty.jsonl", "o") == 2
    assert "no documents" in capsys.readouterr().err
    (tmp_path / "x.docx").write_text("a,b")
    assert prepare("x.docx", "o") == 2
    assert "unknown input format 'x.docx'" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine words"}\n{"text": "bad \xff\xfe bytes"}\n{"text": "more"}\n')
    assert prepare("bad.jsonl", "b") == 0
    out = capsys.readouterr().out
    assert "skipped 1 document(s)" in out and "'invalid_utf8': 1" in out
    assert TokenShards(tmp_path / "b").num_documents == 2
    assert prepare("bad.jsonl", "c", tokenizer=tmp_path / "nope.json") == 2
    assert "does not exist" in capsys.readouterr().err


def test_loader_rejects_a_corpus_too_small_for_one_row(prepared):
    from dual_lm.errors import UserError

    out, _ = prepared
    with pytest.raises(UserError, match="cannot fill one row"):
        PackedLoader(TokenShards(out), seq_len=10_000, rows_per_rank=1)


def test_shards_are_memory_mapped(prepared):
    out, _ = prepared
    shards = TokenShards(out)
    assert all(isinstance(t, np.memmap) for t in shards.tokens if t.size)
    assert os.path.getsize(out / "train-00000.tokens") == shards.tokens[0].size * 2


def test_rerun_with_other_validation_does_not_reuse_moved_shards(tmp_path, tokenizer_51200):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(40, seed=5))
    out = tmp_path / "o"
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(out), 10, 3))
    (out / "manifest.json").unlink()  # as if killed before the manifest
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(out), 400, 3))
    fresh = tmp_path / "f"
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(fresh), 400, 3))
    for name in ("train-00000.tokens", "train-00001.docs.npy", "valid.tokens"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    (out / "manifest.json").unlink()  # killed again; finished with fewer shards: no stale shard stays
    prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(out), 400, 2))
    assert sorted(p.name for p in out.glob("train-*")) == [
        f"train-0000{k}.{x}" for k in (0, 1) for x in ("docs.npy", "json", "tokens")
    ]


def test_documents_are_stripped_before_tokenising(tmp_path, tokenizer_51200):
    """As the reference trainer: surrounding whitespace goes, so no document ends in a whitespace token."""
    from tokenizers import Tokenizer

    docs = ["  the king loves him \n\n", "a fool sees us   ", "\n\tmy lord fears the crown\t", "plain words"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [*docs[:2], " \n\t ", *docs[2:]])
    manifest = prepare_data(PrepareRequest(str(tokenizer_51200), (str(corpus),), str(tmp_path / "o"), 0, 1))
    assert manifest["format"] == 2 and manifest["skipped"]["empty"] == 1
    tok = Tokenizer.from_file(str(tokenizer_51200))
    shards = TokenShards(tmp_path / "o")
    assert shards.num_documents == 4
    for i, doc in enumerate(docs):
        ids = shards.document(i).tolist()
        assert ids == tok.encode(doc.strip(), add_special_tokens=False).ids
        assert ids != tok.encode(doc, add_special_tokens=False).ids or doc == doc.strip()
        assert tok.decode([ids[-1]]).strip() and tok.decode([ids[0]]).strip()


def test_stripping_skips_and_counts_documents_left_empty():
    from dual_lm.data.corpus import ReadStats
    from dual_lm.data.prepare import stripped

    stats = ReadStats(documents=3)
    assert list(stripped(iter([" a ", " \n ", "b\n"]), stats)) == ["a", "b"]
    assert (stats.documents, stats.empty) == (2, 1)


def test_a_folder_prepared_before_stripping_is_refused(prepared, tmp_path):
    import shutil

    from hostile import refuses

    out, _ = prepared
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    from dual_lm.errors import UserError

    with pytest.raises(UserError, match=r"has data format 1, .* re-run `dual-lm prepare-data`"):
        TokenShards(old)
    argv = [
        "train",
        "data.path=" + str(old),
        "output=" + str(tmp_path / "run"),
        "data.seq_len=16",
        "train.micro_batch_rows=2",
        "train.global_batch_tokens=32",
        "train.steps=1",
    ]
    refuses(argv, "train", r"has data format 1, this dual-lm trains on format 2 .*re-run `dual-lm prepare-data`", old)
    assert not (tmp_path / "run").exists()
