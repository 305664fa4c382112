"""The run folder: who may write it (one run at a time, under its lock), which config it belongs to,
and what a killed run left in it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dual_lm import ownership
from dual_lm.config import TrainConfig, run_identity
from dual_lm.errors import UserError
from dual_lm.training.checkpoint import remove_leftovers
from dual_lm.training.dist import DistInfo, sum_across_ranks
from dual_lm.training.origins import identity_but_schedule
from dual_lm.training.runlog import METRICS_FILE


def check_started_alike(run_dir: Path, cfg: TrainConfig, schedule_may_differ: bool = False) -> None:
    """A run folder started with another config (killed before its first checkpoint) is not taken
    over by a fresh start: its config.json and metrics.jsonl would be replaced. A run resumed from a
    checkpoint (``schedule_may_differ``) was checked against it, and may have extended the schedule."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        started = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        started = None
    identity = identity_but_schedule if schedule_may_differ else run_identity
    if not isinstance(started, dict) or identity(started) != identity(cfg.to_dict()):
        raise UserError(f"{run_dir} was started with another config (see {path}); choose another output")


def remove_run_leftovers(run_dir: Path) -> None:
    """Delete the staging files and folders a killed run left (the caller holds the run's lock, so no
    live process owns them): half-written checkpoints, checkpoints half-deleted by pruning, and the
    temporary files of config.json and metrics.jsonl."""
    removed = remove_leftovers(run_dir)
    for name in ("config.json", METRICS_FILE):
        removed += ownership.remove_stale_staging(run_dir / name, tags=("tmp",))
    if removed:
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        print(f"removed what a killed run left in {run_dir}: {names}", file=sys.stderr)


def check_outside_origins(out: Path, cfg: TrainConfig) -> None:
    """The run may not live inside the folder it starts from (``model.init_from``) or inside the run
    whose checkpoint it branches from (``train.decay_from``): replacing that model folder or pruning
    that checkpoint would delete the new run with it."""
    target = out.resolve()
    for key, origin in (("model.init_from", cfg.model.init_from), ("train.decay_from", cfg.train.decay_from)):
        if not origin:
            continue
        source = Path(origin).resolve()
        roots = [source, source.parent.parent] if source.parent.name == "checkpoints" else [source]
        for root in roots:
            if target.is_relative_to(root):
                raise UserError(
                    f"refusing to write run {out}: it lies inside {root}, where {key} points; choose another output"
                )


@contextmanager
def own_run(cfg: TrainConfig, info: DistInfo) -> Iterator[None]:
    """Check the output and hold the run's lock for the whole run (rank 0), before anything is written.

    The output must be new, empty or a run folder; a model, data or user folder is refused and left
    as it was. Every rank learns rank 0's outcome through one all-reduce, so a refused run stops on
    all ranks together instead of leaving the others waiting in a collective. A folder this call
    created is removed again if the run fails before writing into it.
    """
    out = Path(cfg.output)
    with ExitStack() as stack:
        refusal: Exception | None = None
        created = False
        if info.is_main:
            try:
                check_outside_origins(out, cfg)
                origins = (cfg.data.path, cfg.model.init_from, cfg.train.decay_from)
                ownership.check_output(out, ownership.RUN, update=True, sources=[p for p in origins if p])
                created = not out.exists()
                stack.enter_context(ownership.exclusive(out, "run"))
            except (UserError, OSError) as err:
                refusal = err
        refused = sum_across_ranks({"refused": float(refusal is not None)}, info)["refused"]
        if refusal is not None:
            raise refusal
        if refused:
            raise UserError(f"rank 0 refused the output {out} (see its message)")
        try:
            yield
        except BaseException:
            if created:
                _remove_if_unused(out)
            raise


def _remove_if_unused(folder: Path) -> None:
    """Remove a folder the run created if it still holds nothing but the lock file."""
    entries = list(folder.iterdir()) if folder.is_dir() else None
    if entries is not None and all(p.name == ownership.LOCK_NAME and p.is_file() for p in entries):
        for p in entries:
            p.unlink()
        folder.rmdir()
