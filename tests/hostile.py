"""Helpers of the hostile-input suites (tests/test_hostile_*.py): run the CLI in-process, snapshot
a tree, and check a refusal: exit 2, one ``dual-lm CMD: error:`` line naming the problem, no
traceback, and every pre-existing file byte-identical."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dual_lm.cli import main


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list[str]) -> Outcome:
    """``dual-lm ARGV`` in this process; argparse's SystemExit becomes the exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: its content hash (files), mode and, for folders, nothing
    more (entries are listed themselves). The one exemption is ``.dual-lm.lock``: taking a lock
    records the taker's pid in it, also when the command is refused after taking it."""
    seen: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            if path.name == ".dual-lm.lock":
                continue
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                seen[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mode)
            elif stat.S_ISLNK(info.st_mode):
                seen[str(path)] = ("link", str(path.readlink()))
            else:
                seen[str(path)] = ("dir", info.st_mode)
    return seen


def assert_unchanged(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """Nothing that existed before was changed or removed (new files are checked by the caller)."""
    changed = [p for p, v in before.items() if after.get(p) != v]
    assert not changed, f"pre-existing paths changed or removed: {changed[:10]}"


def assert_refused(outcome: Outcome, command: str, pattern: str) -> None:
    """Exit 2, no traceback, and one error line for ``command`` matching ``pattern`` (a regex)."""
    assert "Traceback" not in outcome.err, outcome.err
    assert outcome.code == 2, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.splitlines() if line.startswith(f"dual-lm {command}: error: ")]
    assert len(lines) == 1, outcome.err
    assert re.search(pattern, lines[0], re.IGNORECASE), (pattern, lines[0])


def refuses(argv: list, command: str, pattern: str, *roots: Path) -> Outcome:
    """Run ``argv``, assert the refusal, and that every file under ``roots`` is byte-identical."""
    before = snapshot(*roots)
    outcome = run_cli(argv)
    assert_refused(outcome, command, pattern)
    assert_unchanged(before, snapshot(*roots))
    return outcome


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (for staging names of a killed writer)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_same_folder(a: Path, b: Path) -> None:
    """Two prepare-data folders hold the same files, byte for byte (the manifest's timing aside)."""
    import json

    from dual_lm import ownership

    names = sorted(p.name for p in a.iterdir() if p.name != ownership.LOCK_NAME)
    assert names == sorted(p.name for p in b.iterdir() if p.name != ownership.LOCK_NAME)
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name == "manifest.json":
            x, y = ({k: v for k, v in json.loads(z).items() if k != "seconds"} for z in (x, y))
        assert x == y, name
