"""Corpus -> memory-mappable token shards with a document index, resumable after a kill.

Layout of an output folder::

    tokenizer.json                                     a copy of the tokenizer used
    valid.tokens  valid.docs.npy  valid.json          held-out whole documents (the first ones read)
    train-00000.tokens  train-00000.docs.npy  train-00000.json   ...
    manifest.json                                      written last, atomically

``*.tokens`` is a flat array of token ids (uint16 when the vocabulary fits, else uint32),
``*.docs.npy`` the int64 start offsets of its documents plus the end, and the small ``*.json``
marks the shard complete. Documents are stripped of surrounding whitespace (as the reference
trainer does; format 2) and stored without special tokens; the loader prepends ``<s>``.
Training documents are split into contiguous shards of (nearly) equal document counts. A re-run
skips every shard whose marker matches and redoes the rest, so a killed run finishes with
exactly the files an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice, pairwise
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dual_lm import ownership
from dual_lm.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
from dual_lm.data.corpus import ReadStats, expand_sources, fingerprints, iter_documents, local_inputs
from dual_lm.errors import UserError
from dual_lm.tokenizer import load_tokenizer_file

FORMAT_VERSION = 2  # 2: documents are stripped of surrounding whitespace before tokenising, as the reference does
BATCH_CHARS = 4_000_000  # text handed to the tokenizer at once (parallel over all cores)

# Default shard size: one shard per 500M characters of text (about 100M tokens).
CHARS_PER_SHARD = 500_000_000


@dataclass(frozen=True)
class PrepareRequest:
    tokenizer: str
    inputs: tuple[str, ...]
    output: str
    valid_tokens: int = 0
    num_shards: int | None = None
    text_field: str = "text"
    split: str | None = None  # of a hf:NAME dataset (default train) or a DatasetDict folder
    name: str | None = None  # the configuration of a hf:NAME dataset
    split_documents: str = "file"  # how text files are cut into documents: file, lines, blank-lines


# Recorded in the manifest and the shard markers only when given (so that a folder prepared without
# them reads as before), and compared also when absent (so that adding or dropping one is noticed).
INPUT_OPTIONS = {"split": None, "name": None, "split_documents": "file"}


def input_options(request: PrepareRequest) -> dict:
    """The reading flags of the request that differ from their defaults."""
    given = {key: getattr(request, key) for key in INPUT_OPTIONS}
    return {key: value for key, value in given.items() if value != INPUT_OPTIONS[key]}


def differs(record: dict, expect: dict) -> bool:
    """Whether a manifest or marker was made for another request than ``expect`` describes."""
    return any(record.get(k) != expect.get(k) for k in {*expect, *INPUT_OPTIONS})


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _batches(texts: Iterator[str], limit: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class ShardWriter:
    """Appends tokenised documents to ``NAME.tokens`` and commits the shard with its index and marker."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.folder, self.name, self.dtype = folder, name, dtype
        self.tmp = folder / f".{name}.tokens.tmp"
        self.handle = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit()
        self.offsets = [0]

    def add(self, documents: list[list[int]]) -> int:
        if not documents:
            return 0
        lengths = [len(ids) for ids in documents]
        flat = np.fromiter((t for ids in documents for t in ids), dtype=self.dtype, count=sum(lengths))
        self.handle.write(flat.tobytes())
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths)).tolist())
        return int(flat.size)

    def commit(self, meta: dict) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        docs_tmp = self.folder / f".{self.name}.docs.tmp.npy"
        with open(docs_tmp, "wb") as handle:
            np.save(handle, np.asarray(self.offsets, dtype=np.int64))
            handle.flush()
            os.fsync(handle.fileno())
        self.tmp.replace(self.folder / f"{self.name}.tokens")
        docs_tmp.replace(self.folder / f"{self.name}.docs.npy")
        fsync_dir(self.folder)
        meta = {**meta, "name": self.name, "documents": len(self.offsets) - 1, "tokens": self.offsets[-1]}
        write_json_atomic(self.folder / f"{self.name}.json", meta)
        return meta


def read_marker(folder: Path, name: str, expect: dict) -> dict | None:
    """The shard's marker if the shard is complete and was made for the same request, else None."""
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if differs(meta, expect):
        return None
    tokens = folder / f"{name}.tokens"
    if not tokens.is_file() or tokens.stat().st_size != meta["tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    try:
        offsets = np.load(folder / f"{name}.docs.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if len(offsets) != meta["documents"] + 1 or int(offsets[-1]) != meta["tokens"]:
        return None
    return meta


def check_format(manifest: dict, folder: str | Path) -> None:
    """Refuse a data folder written in another format than this version writes: a format-1 folder holds
    unstripped documents (120 of the demo's 161 ended in a lone space token), never mixed in silently."""
    found = manifest.get("format")
    if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT_VERSION:
        raise UserError(f"data folder {folder} has data format {found}, written by a newer dual-lm; upgrade dual-lm")
    if found != FORMAT_VERSION:
        raise UserError(
            f"data folder {folder} has data format {found!r}, this dual-lm trains on format {FORMAT_VERSION} "
            "(documents stripped of surrounding whitespace); re-run `dual-lm prepare-data` into a new folder"
        )


def stripped(texts: Iterator[str], stats: ReadStats) -> Iterator[str]:
    """Each document stripped of surrounding whitespace before tokenising, as the reference trainer does; one
    left empty is skipped and counted as empty (the readers already skip whitespace-only ones)."""
    for text in texts:
        text = text.strip()
        if not text:
            stats.documents -= 1
            stats.empty += 1
            continue
        yield text


def shard_bounds(first: int, total: int, shards: int) -> list[tuple[int, int]]:
    """Split document indices [first, total) into ``shards`` contiguous ranges of near-equal size."""
    count = total - first
    edges = [first + (count * k) // shards for k in range(shards + 1)]
    return list(pairwise(edges))


def check_output_folder(request: PrepareRequest) -> Path:
    """The output must be new, empty or a prepare-data folder (a killed run's partial folder counts, so a
    re-run resumes it); never a model folder (its tokenizer.json would be replaced), another folder, an
    input or a folder holding one."""
    sources = local_inputs((*request.inputs, request.tokenizer))
    target = Path(request.output).resolve()
    for source in sources:
        folder = Path(source)
        if folder.is_dir() and target.is_relative_to(folder.resolve()):
            raise UserError(
                f"refusing to write data folder {request.output}: it lies inside the input folder {source}, "
                "whose later reads would take the shards for input; choose an output outside it"
            )
    return ownership.check_output(request.output, ownership.DATA, update=True, sources=sources)


_SHARD = re.compile(r"train-(\d{5})\.(tokens|docs\.npy|json)")


def remove_stale_shards(out: Path, shards: int) -> list[Path]:
    """Delete the shard files numbered ``shards`` and up: a killed run of this folder asked for more
    shards than this one (the caller holds the lock), so the folder holds exactly what this run wrote."""
    stale = [p for p in out.iterdir() if (m := _SHARD.fullmatch(p.name)) and int(m[1]) >= shards and p.is_file()]
    for path in sorted(stale):
        path.unlink()
    return stale


def remove_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files of shards, markers, the tokenizer copy and the manifest (the caller
    holds the folder's lock: they belong to a failed or killed run); committed shards stay."""
    if not out.is_dir():
        return []
    found = sorted(p for p in out.iterdir() if ownership.DATA_TEMPORARY.fullmatch(p.name) and p.is_file())
    for path in found:
        path.unlink()
    return found


@dataclass
class _Writing:
    out: Path
    started: bool = False  # set once this run removed the stale temporaries and began to write


@contextmanager
def _writing(out: Path) -> Iterator[_Writing]:
    """Hold the folder's lock while writing; on a failure (a full disk, Ctrl-C) remove the temporary
    files once this run has begun to write (a run refused before that changes nothing), and the folder
    itself when this run created it and a user error stopped it or it wrote nothing into it."""
    created = not out.exists()
    with ownership.exclusive(out, "prepare-data folder"):
        state = _Writing(out)
        try:
            yield state
        except BaseException as err:
            if state.started:
                remove_temporaries(out)
            # a folder this run created is all its own: an option found impossible only after reading
            # the corpus (--valid-tokens, --num-shards) removes it; a full disk keeps its shards to resume
            if created and (isinstance(err, UserError) or all(p.name == ownership.LOCK_NAME for p in out.iterdir())):
                shutil.rmtree(out)
            raise


def prepare_data(request: PrepareRequest) -> dict:
    """Tokenise the inputs into shards (see the module docstring); returns the manifest. The output is
    checked and locked before anything is read or written."""
    out = check_output_folder(request)
    with _writing(out) as writing:
        return _prepare_locked(request, writing)


def _prepare_locked(request: PrepareRequest, writing: _Writing) -> dict:
    out = Path(request.output)
    sources = expand_sources(list(request.inputs), request.split, request.name, request.split_documents)
    tokenizer = load_tokenizer_file(request.tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    base = {
        "format": FORMAT_VERSION,
        "tokenizer_sha256": file_sha256(request.tokenizer),
        "sources": fingerprints(sources),
        "dtype": dtype.name,
        "text_field": request.text_field,
        **input_options(request),
    }
    _check_existing_manifest(out, base, request)

    count_stats = ReadStats()
    chars = 0
    counted = _read(sources, request, count_stats)
    for text in tqdm(counted, desc="counting documents", unit=" doc"):
        chars += len(text)
    if count_stats.documents == 0:
        raise UserError(f"the inputs hold no documents ({count_stats.summary()})")
    stale = remove_temporaries(out)  # of a killed run; from here on this run writes
    writing.started = True
    if stale:
        print(f"removed {len(stale)} temporary file(s) a killed prepare-data left in {out}", file=sys.stderr)
    write_bytes_atomic(out / "tokenizer.json", Path(request.tokenizer).read_bytes())  # the folder names its tokenizer

    started = time.perf_counter()
    stats = ReadStats()
    documents = _read(sources, request, stats)
    # a with-block: an error (a full disk) ends the bar's line before the one-line message is printed
    with tqdm(total=count_stats.documents, desc="tokenising", unit=" doc") as bar:
        valid = _prepare_valid(out, documents, tokenizer, dtype, base, request.valid_tokens, bar)
        train_docs = count_stats.documents - valid["documents"]
        if train_docs <= 0:
            raise UserError(f"--valid-tokens {request.valid_tokens} leaves no training documents; ask for fewer")
        shards = request.num_shards or max(1, chars // CHARS_PER_SHARD)
        if not 1 <= shards <= train_docs:
            raise UserError(f"--num-shards must lie in [1, {train_docs}] (the number of training documents)")
        metas = []
        for k, (lo, hi) in enumerate(shard_bounds(valid["documents"], count_stats.documents, shards)):
            metas.append(_prepare_shard(out, f"train-{k:05d}", documents, lo, hi - lo, tokenizer, dtype, base, bar))
        _finish_reading(documents)
    remove_stale_shards(out, len(metas))
    manifest = {
        **base,
        "vocab_size": tokenizer.get_vocab_size(),
        "valid": valid,
        "shards": metas,
        "train_documents": sum(m["documents"] for m in metas),
        "train_tokens": sum(m["tokens"] for m in metas),
        "characters": chars,
        "skipped": stats.record(),
        "seconds": round(time.perf_counter() - started, 3),
        "requested_valid_tokens": request.valid_tokens,
        "requested_shards": shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _read(sources: list, request: PrepareRequest, stats: ReadStats) -> Iterator[str]:
    """One pass over the inputs: their documents, stripped, in order; skipped ones are counted in ``stats``."""
    return stripped(iter_documents(sources, request.text_field, stats, request.split_documents), stats)


def _check_existing_manifest(out: Path, base: dict, request: PrepareRequest) -> None:
    path = out / "manifest.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):  # every shard is checked against its own marker, and the manifest rewritten
        print(f"{path} is damaged; checking every shard against its marker and writing it again", file=sys.stderr)
        return
    check_format(old, out)  # a folder of an earlier format is named as such, not as "other inputs"
    if differs(old, base):
        raise UserError(
            f"{out} already holds data prepared from other inputs, other --split/--name/--split-documents "
            "or another tokenizer; use a new folder"
        )
    if old.get("requested_valid_tokens") != request.valid_tokens or (
        request.num_shards and old.get("requested_shards") != request.num_shards
    ):
        raise UserError(f"{out} was prepared with other --valid-tokens/--num-shards; use a new folder")


def _finish_reading(documents: Iterator[str]) -> None:
    """Read the inputs to their end, so that what is skipped after the last document is counted too; a
    document left over means the inputs changed between the counting pass and this one."""
    if next(documents, None) is not None:
        raise UserError("the inputs changed while prepare-data read them (more documents than counted); run it again")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _prepare_valid(out, documents, tokenizer, dtype, base, valid_tokens, bar) -> dict:
    """Hold out the first documents until they reach ``valid_tokens`` tokens."""
    expect = {**base, "valid_tokens": valid_tokens}
    done = read_marker(out, "valid", expect)
    if done is not None:
        for _ in islice(documents, done["documents"]):
            pass
        bar.update(done["documents"])
        return done
    writer = ShardWriter(out, "valid", dtype)
    have = 0
    while have < valid_tokens:
        text = next(documents, None)
        if text is None:
            raise UserError(f"--valid-tokens {valid_tokens} is more than the whole corpus holds ({have} tokens)")
        have += writer.add(_encode(tokenizer, [text]))
        bar.update(1)
    return writer.commit(expect)


def _prepare_shard(out, name, documents, first, count, tokenizer, dtype, base, bar) -> dict:
    expect = {**base, "first_document": first, "planned_documents": count}
    done = read_marker(out, name, expect)
    if done is not None:
        for _ in islice(documents, count):
            pass
        bar.update(count)
        return done
    writer = ShardWriter(out, name, dtype)
    for batch in _batches(islice(documents, count), BATCH_CHARS):
        writer.add(_encode(tokenizer, batch))
        bar.update(len(batch))
    return writer.commit(expect)
