"""What the readers share: the counts of a pass (``ReadStats``), cutting text into documents, and
the one-line error for a damaged input.

``--split-documents`` decides what a text file is cut into: ``file`` (the whole file is one
document), ``lines`` (every non-blank line is one) or ``blank-lines`` (paragraphs: runs of
non-blank lines, separated by one or more blank lines). Blank lines are separators, not
documents, so they are not counted as skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dual_lm.errors import UserError

SPLIT_MODES = ("file", "lines", "blank-lines")
SHOWN_FILES = 5  # skipped files named in the report; the rest are only counted


@dataclass
class ReadStats:
    """What a pass over the sources saw: documents read, documents skipped (per reason), and files of
    an input folder that are of no readable format (counted, the first few named)."""

    documents: int = 0
    invalid_utf8: int = 0
    empty: int = 0
    bad_json: int = 0
    unreadable_files: int = 0
    unreadable_names: list[str] = field(default_factory=list)

    def skipped(self) -> int:
        """Skipped documents (files of no readable format are counted apart)."""
        return self.invalid_utf8 + self.empty + self.bad_json

    def skip_file(self, path: Path | str) -> None:
        """Count a file of an input folder that is not read: of no readable format, a link to a folder or
        to nothing, or a file read already under another name."""
        self.unreadable_files += 1
        if len(self.unreadable_names) < SHOWN_FILES:
            self.unreadable_names.append(str(path))

    def files_summary(self) -> str:
        """``N file(s) of no readable format or read already (a, b, ...)``, or an empty string."""
        if not self.unreadable_files:
            return ""
        more = ", ..." if self.unreadable_files > len(self.unreadable_names) else ""
        names = ", ".join(self.unreadable_names)
        return f"{self.unreadable_files} file(s) of no readable format or read already ({names}{more})"

    def summary(self) -> str:
        parts = [f"{self.invalid_utf8} with invalid UTF-8", f"{self.empty} empty", f"{self.bad_json} not JSON"]
        text = f"skipped {self.skipped()} document(s): " + ", ".join(parts)
        files = self.files_summary()
        return f"{text}; skipped {files}" if files else text

    def record(self) -> dict:
        """The manifest's ``skipped`` record."""
        return {
            "invalid_utf8": self.invalid_utf8,
            "empty": self.empty,
            "not_json": self.bad_json,
            "unreadable_files": self.unreadable_files,
            "unreadable_examples": list(self.unreadable_names),
        }


def check_split_mode(mode: str) -> str:
    if mode not in SPLIT_MODES:
        raise UserError(f"--split-documents must be one of {', '.join(SPLIT_MODES)}, not {mode!r}")
    return mode


def damaged_input(path: Path | str, fmt: str, err: BaseException) -> UserError:
    """The one line for an input that cannot be decoded: which file, which format, what the decoder said."""
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    return UserError(f"input {path} is not a readable {fmt} file ({reason}); re-create it or leave it out")


def decode(raw: bytes, stats: ReadStats) -> str | None:
    """The text of one document, or None (counted) when it is not UTF-8 or holds only whitespace."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None
    if not text.strip():
        stats.empty += 1
        return None
    return text


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream given in chunks, without their ``\\n``."""
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def paragraphs(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Runs of non-blank lines joined by ``\\n``; one or more blank (or whitespace-only) lines end a run."""
    run: list[bytes] = []
    for line in lines:
        if line.strip():
            run.append(line)
        elif run:
            yield b"\n".join(run)
            run = []
    if run:
        yield b"\n".join(run)


def cut_bytes(lines: Iterable[bytes], mode: str) -> Iterator[bytes]:
    """The raw documents of a text stream's lines under ``lines`` or ``blank-lines``."""
    if mode == "lines":
        return (line for line in lines if line.strip())
    return paragraphs(lines)


def cut_text(text: str, mode: str) -> list[str]:
    """A text (a row of a text dataset) cut as ``mode`` says; ``file`` keeps it whole."""
    if mode == "file":
        return [text]
    lines = [line.encode("utf-8") for line in text.split("\n")]
    return [raw.decode("utf-8") for raw in cut_bytes(lines, mode)]


def column_texts(batches: Iterable[dict], text_field: str, where: str, stats: ReadStats) -> Iterator[str]:
    """The strings of column ``text_field`` of batches (dicts of lists); a missing column is one error
    listing the columns, and a value that is not a non-blank string is skipped as empty."""
    for batch in batches:
        if text_field not in batch:
            raise missing_column(where, text_field, list(batch))
        for value in batch[text_field]:
            if not isinstance(value, str) or not value.strip():
                stats.empty += 1
                continue
            yield value


def missing_column(where: str, text_field: str, columns: list[str]) -> UserError:
    return UserError(
        f"{where} has no column {text_field!r} (columns: {', '.join(columns) or 'none'}); choose one with --text-field"
    )
