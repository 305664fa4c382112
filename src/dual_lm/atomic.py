"""Durable writes: fsync helpers and files written through a temporary file and a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a written file's contents to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """0666 under the process umask (0644 with the usual 022): the mode ``open`` gives a new file."""
    umask = os.umask(0)  # read without changing it for longer than this call
    os.umask(umask)
    return 0o666 & ~umask


def settle_folder(folder: Path) -> None:
    """Give every file of a freshly written folder the umask's mode (safetensors creates its file 0600)
    and flush the files and the folder to disk."""
    mode = file_mode()
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, mode)
            fsync_file(path)
    fsync_dir(folder)


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """``.NAME.tmp-PID`` next to ``path``: hidden, and distinct for each process writing it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync it, rename it over ``path`` and fsync the folder: a reader
    (or a kill) sees the old file or the new one, never half of one. On an error (a full disk) the
    temporary file is removed and ``path`` is untouched; one that a killed writer left is removed by
    the next write of the same path."""
    from dual_lm.ownership import remove_stale_staging

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path, tags=("tmp",))
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_bytes_atomic`` of UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, payload: dict) -> None:
    """``write_text_atomic`` of indented JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2))
