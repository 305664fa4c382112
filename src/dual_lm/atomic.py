"""Durable writes: fsync helpers and JSON written through a temporary file and a rename."""

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


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file, fsync it, rename it over ``path`` and fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
