"""What a command may write to: artefact kinds, output checks, the one-writer lock and staging folders.

The rule: a command writes only into a path that does not exist (or an empty
folder), or into an artefact of the kind it is meant to update (a run it resumes, a model folder it
re-exports with ``--overwrite``). Anything else is refused with one line naming what is there, and
so are the places no command should ever replace: a source of the command, an ancestor of one, the
current directory, the home directory and the filesystem root.

Every artefact dual-lm writes is recognisable by a marker it already writes:

    model folder   config.json whose auto_map names modeling_dlm_llama, plus modeling_dlm_llama.py
    run folder     config.json holding a run config (objective, data, train sections) or checkpoints/
    data folder    manifest.json of prepare-data, or only files prepare-data writes (a killed run)
    sweep folder   sweep.json, or only cell folders (alpha_*_n-reps=*) and the report files
    results file   JSON with "tasks" and "average" (dual-lm eval)
    plot           PNG whose metadata names dual-lm as its software
    generations    JSONL whose every line is {"prompt", "text"}

Staging folders are named ``.NAME.tmp-PID-RANDOM``: the next run of a command removes those whose
process is gone, and never one of a live process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dual_lm.errors import UserError

LOCK_NAME = ".dual-lm.lock"
PNG_SOFTWARE = "dual-lm"  # matplotlib savefig(metadata={"Software": PNG_SOFTWARE})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ kinds


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_model_folder(path: Path) -> bool:
    config = _json(path / "config.json")
    if not isinstance(config, dict) or not (path / "modeling_dlm_llama.py").is_file():
        return False
    auto_map = config.get("auto_map")
    return isinstance(auto_map, dict) and any("modeling_dlm_llama" in str(v) for v in auto_map.values())


def is_run_folder(path: Path) -> bool:
    config = _json(path / "config.json")
    if isinstance(config, dict) and {"objective", "data", "train"} <= set(config):
        return True
    checkpoints = path / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith(("step-", ".step-")) for p in checkpoints.iterdir())


_DATA_FILE = re.compile(r"manifest\.json|tokenizer\.json|(valid|train-\d{5})\.(tokens|docs\.npy|json)")
DATA_TEMPORARY = re.compile(r"\.(manifest\.json|tokenizer\.json|(valid|train-\d{5})\.(tokens|docs|json))\.tmp.*")


def _is_shard_marker(path: Path) -> bool:
    marker = _json(path) if path.suffix == ".json" and path.name not in ("manifest.json", "tokenizer.json") else None
    return isinstance(marker, dict) and "format" in marker and "tokenizer_sha256" in marker


def is_data_folder(path: Path) -> bool:
    """A manifest, or a killed prepare-data's folder: only prepare-data's file names, and at least one
    piece of dual-lm's own evidence (a shard marker or a temporary file), so that a folder holding
    just a ``tokenizer.json`` of the user's is not taken for one."""
    manifest = _json(path / "manifest.json")
    if isinstance(manifest, dict) and "shards" in manifest and "tokenizer_sha256" in manifest:
        return True
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    ours = all(p.is_file() and (_DATA_FILE.fullmatch(p.name) or DATA_TEMPORARY.fullmatch(p.name)) for p in entries)
    evidence = any(DATA_TEMPORARY.fullmatch(p.name) or _is_shard_marker(p) for p in entries)
    return bool(entries) and ours and evidence


_CELL = re.compile(r"alpha_\d\.\d{3}_n-reps=\d+")


def _is_sweep_report(path: Path) -> bool:
    if path.name == "results.json":
        return isinstance(_json(path), dict) and "cells" in _json(path)
    if path.name in ("heatmap.png", "curves.png"):
        return is_dual_lm_png(path)
    return path.name == "results.md"


def is_sweep_folder(path: Path) -> bool:
    """``sweep.json``, or (a sweep of an earlier dual-lm) cell folders and report files that dual-lm
    wrote; a folder of the user's ``results.json`` is not one."""
    if (path / "sweep.json").is_file():
        return True
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".")]
    cells = [p for p in entries if p.is_dir() and _CELL.fullmatch(p.name)]
    return bool(cells) and all(p in cells or (p.is_file() and _is_sweep_report(p)) for p in entries)


def is_results_file(path: Path) -> bool:
    payload = _json(path)
    return isinstance(payload, dict) and "tasks" in payload and "average" in payload


def is_dual_lm_png(path: Path) -> bool:
    """A PNG that dual-lm drew: its tEXt chunk ``Software`` is ``PNG_SOFTWARE``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return False
    return head.startswith(_PNG_MAGIC) and b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head


def is_generations_file(path: Path) -> bool:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return bool(lines) and all(set(json.loads(line)) == {"prompt", "text"} for line in lines)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


@dataclass(frozen=True)
class Kind:
    """A kind of artefact: its name in messages, whether it is a folder, and how to recognise one."""

    name: str
    is_dir: bool
    test: Callable[[Path], bool]


MODEL = Kind("model folder", True, is_model_folder)
RUN = Kind("run folder", True, is_run_folder)
DATA = Kind("prepare-data folder", True, is_data_folder)
SWEEP = Kind("sweep folder", True, is_sweep_folder)
RESULTS = Kind("results file", False, is_results_file)
PLOT = Kind("dual-lm plot", False, is_dual_lm_png)
GENERATIONS = Kind("generations file", False, is_generations_file)
FOLDER_KINDS = (MODEL, RUN, DATA, SWEEP)


def describe(path: Path) -> str:
    """What is at ``path``, in a few words, for a refusal message."""
    if not path.exists():
        return "nothing"
    if not path.is_dir():
        return "a file"
    for kind in FOLDER_KINDS:
        with contextlib.suppress(OSError):
            if kind.test(path):
                return f"a {kind.name}"
    count = sum(1 for p in path.iterdir() if not _is_lock_file(p))
    return f"a folder with {count} entr{'y' if count == 1 else 'ies'}"


# ------------------------------------------------------------------------------ output checks


def _protected(path: Path, sources: tuple[Path, ...]) -> str | None:
    """Why ``path`` may never be written over, or None."""
    real = path.resolve()
    if real == Path.cwd().resolve():
        return "the current directory"
    if Path.cwd().resolve().is_relative_to(real):
        return "a folder that holds the current directory"
    if real == Path.home().resolve():
        return "the home directory"
    if real == Path(real.anchor):
        return "the filesystem root"
    for source in sources:
        source_real = Path(source).resolve()
        if real == source_real:
            return f"the input {source} itself"
        if source_real.is_relative_to(real):
            return f"a folder that holds the input {source}"
    return None


def _writable_parent(path: Path) -> None:
    """The nearest existing ancestor must be a folder this process can write into."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: permission denied in {parent}")


def _is_lock_file(path: Path) -> bool:
    return path.name == LOCK_NAME and path.is_file() and not path.is_symlink()


def lock_holder(folder: Path) -> str | None:
    """The pid recorded by the process that holds ``folder``'s lock now, or None when nobody holds it
    (tested with a shared, non-blocking flock on a read-only descriptor: nothing is written)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        return None if holder == str(os.getpid()) else holder  # this process's own lock is no refusal
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken
    return None


def check_output(path: str | Path, kind: Kind, *, update: bool = False, sources=(), flag: str = "") -> Path:
    """Refuse ``path`` as an output of ``kind`` unless it is new (or an empty folder), or, with ``update``,
    an artefact of that kind. ``sources`` are the command's inputs; ``flag`` names the option that
    allows replacing an artefact (for example ``--overwrite``), for the message."""
    path = Path(path)
    sources = tuple(Path(s) for s in sources)
    if path.exists() or path.is_symlink():
        reason = _protected(path, sources)
        if reason is not None:
            raise UserError(f"refusing to write {kind.name} {path}: it is {reason}")
    if not path.exists():
        remove_stale_staging(path)  # a killed replacement of ``path`` is finished (or undone) first
    if not path.exists():
        if path.is_symlink():
            raise UserError(f"refusing to write {kind.name} {path}: it is a dangling symbolic link")
        _writable_parent(path)
        return path
    holder = lock_holder(path) if path.is_dir() else None
    if holder is not None:  # a live writer's folder may not look like its kind yet
        raise UserError(f"{path} is in use by another dual-lm process (pid {holder}); wait for it to finish or stop it")
    if kind.is_dir and path.is_dir() and all(_is_lock_file(p) for p in path.iterdir()):
        _check_writable(path)
        return path
    same = path.is_dir() == kind.is_dir and kind.test(path)
    if same and update:
        _check_writable(path if kind.is_dir else path.parent)
        return path
    what = describe(path) if path.is_dir() else ("a file" if not same else f"a {kind.name}")
    hint = f" (pass {flag} to replace it)" if same and flag else ""
    raise UserError(f"refusing to write {kind.name} {path}: it exists and is {what}{hint}; choose a new path")


def check_output_file(path: str | Path, kind: Kind, sources=()) -> Path:
    """An output file, checked before the work it will hold: its folder exists (files never create
    folders) and is writable, it is not a folder, and a file already there is one of ``kind`` (which
    is then replaced atomically)."""
    path = Path(path)
    parent = path.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot write {kind.name} {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise UserError(f"cannot write {kind.name} {path}: the folder {parent} does not exist; create it first")
    if path.is_dir():
        raise UserError(f"cannot write {kind.name} {path}: it is a folder; give a file path")
    return check_output(path, kind, update=True, sources=sources)


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {folder}: permission denied")


# ------------------------------------------------------------------------------ one writer


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str = "folder") -> Iterator[None]:
    """Hold the kernel lock of ``folder`` (``flock`` on ``folder/.dual-lm.lock``) or refuse at once.

    The kernel drops the lock when the process dies, so a kill -9 never leaves a stale lock; the
    file keeps the holder's pid for the refusal message.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:  # never through a link, never a folder: the lock file is dual-lm's own plain file
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno in (errno.EISDIR, errno.ELOOP):
            raise UserError(f"{folder / LOCK_NAME} is a folder or a link, not dual-lm's lock file; remove it") from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"{what} {folder} is in use by another dual-lm process (pid {holder}); wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ staging


def make_staging(target: Path, tag: str = "tmp") -> Path:
    """A new hidden sibling folder ``.NAME.TAG-PID-RANDOM`` of ``target``, created under the umask."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(staging, 0o777)  # mkdir applies the umask (tempfile.mkdtemp would force 0700)
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# the staging names dual-lm writes: folders .NAME.tmp-PID-HEX8 and .NAME.old-PID-HEX8, files .NAME.tmp-PID;
# an earlier dual-lm's replacement left the pair .NAME.tmp-XXXXXXXX / .NAME.old-XXXXXXXX (one suffix)
_STAGING_TAIL = {"tmp": re.compile(r"(?P<pid>\d+)(-[0-9a-f]{8})?"), "old": re.compile(r"(?P<pid>\d+)-[0-9a-f]{8}")}
_LEGACY_TAIL = re.compile(r"[a-z0-9_]{8}")


def _stale_staging(target: Path, tags: tuple[str, ...]) -> dict[tuple[str, str], list[Path]]:
    """The staging siblings of ``target`` whose writer is gone, by (tag, key): the key is the writer's
    pid, or an earlier dual-lm's 8-character suffix (recognised only as a tmp/old pair). Names dual-lm
    does not write, such as a user's ``.model.old-2024`` or ``.model.old-backup1``, are never listed."""
    prefix = f".{target.name}."
    stale: dict[tuple[str, str], list[Path]] = {}
    legacy: dict[str, dict[str, Path]] = {}
    for path in sorted(target.parent.iterdir()):
        if not path.name.startswith(prefix):
            continue
        tag, _, tail = path.name[len(prefix) :].partition("-")
        match = _STAGING_TAIL[tag].fullmatch(tail) if tag in tags else None
        folder_name = match is not None and (tag == "old" or match.group(2) is not None)
        if match is not None and path.is_dir() == folder_name:  # folders carry the random part, files not
            if not _alive(int(match["pid"])):
                stale.setdefault((tag, match["pid"]), []).append(path)
        elif tag in tags and _LEGACY_TAIL.fullmatch(tail) and path.is_dir():
            legacy.setdefault(tail, {})[tag] = path
    for tail, pair in legacy.items():
        if set(pair) == {"tmp", "old"}:
            for tag, path in pair.items():
                stale.setdefault((tag, tail), []).append(path)
    return stale


def remove_stale_staging(target: Path, tags: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Clear the staging siblings of ``target`` left by processes that are gone; returns what it removed.

    Staging copies (``tmp``) and replaced folders set aside (``old``) are deleted, except when
    ``target`` itself is missing and an ``old`` one is there: then a kill came between the two renames
    of a replacement, and the replacement is finished (the same writer's ``tmp`` copy is renamed in; a
    copy is renamed only once written whole) or, without one, the old folder is renamed back. The
    caller finds the previous artefact or the new one, never neither.
    """
    if not target.parent.is_dir():
        return []
    stale = _stale_staging(target, tags)
    if not target.exists() and not target.is_symlink():
        for (tag, key), paths in stale.items():
            if tag == "old":
                (stale.get(("tmp", key)) or paths).pop(0).rename(target)
                break
    removed = [path for paths in stale.values() for path in paths]
    for path in removed:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------ faults

ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def environment_error(err: OSError) -> str | None:
    """The one-line message for a fault of the machine rather than the code (disk full, no
    permission, read-only filesystem), or None for any other OSError."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f": {err.filename}" if err.filename else ""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    advice = "free some space and re-run" if full else "check the path and its permissions"
    return f"{err.strerror or os.strerror(err.errno)}{where} ({advice})"
