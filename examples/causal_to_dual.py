"""How fast does a causal-only model gain a working masked mode? Continued pretraining with alpha < 1.

Three runs on one prepare-data folder, the same shape, data order and seed:

1. ``causal``: a purely autoregressive model (objective.alpha=1), exported as a model folder;
2. ``converted``: that folder continued with the dual objective (``model.init_from``, alpha < 1);
3. ``scratch``: the same dual run from random weights, for comparison.

It prints the masked-diffusion (MD) and AR validation losses of runs 2 and 3 against the tokens
trained, with the causal model's own MD loss at token 0 (its masked mode before any MD training).
Usage (the numbers of EXPERIMENTS.md; about 10 minutes on 2 CPU cores)::

    .venv/bin/python examples/causal_to_dual.py runs/demo/data runs/causal-to-dual

Every other setting is a ``key=value`` override of ``dual-lm train`` (``--set``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dual_lm.config import load_train_config
from dual_lm.training.checkpoint import export_checkpoint
from dual_lm.training.dist import DistInfo
from dual_lm.training.origins import with_init_shape
from dual_lm.training.train import Trainer, run_training

SHAPE = ["model.preset=small", "model.num_layers=2"]  # the sweep study's 3.7M-parameter model
BASE = [
    "data.seq_len=128",
    "train.global_batch_tokens=8192",
    "train.micro_batch_rows=32",
    "optim.lr=0.01",
    "optim.warmup=0.02",
    "optim.decay=0.3",
    "eval.batches=8",
    "log.every=4",
    "checkpoint.keep_last=1",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a dual-lm prepare-data folder")
    parser.add_argument("output", help="a new folder for the three runs and the results")
    parser.add_argument("--causal-steps", type=int, default=176, help="steps of the causal model (default 176)")
    parser.add_argument("--steps", type=int, default=88, help="steps of the dual continuation (default 88)")
    parser.add_argument("--alpha", type=float, default=0.5, help="AR share of the continuation (default 0.5)")
    parser.add_argument("--eval-every", type=int, default=4, help="validation every N steps (default 4)")
    parser.add_argument("--set", action="append", default=[], help="another train override key=value")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty; choose a new output folder")
    for name in ("causal_steps", "steps", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.alpha < 1.0:
        parser.error("--alpha must lie in [0, 1): the continuation must train the masked mode")
    return args


def settings(args, out: Path, name: str, *extra: str) -> list[str]:
    return [f"data.path={args.data}", f"output={out / name}", *SHAPE, *BASE, *args.set, *extra]


def md_loss_at_start(args, out: Path, folder: Path) -> dict[str, float]:
    """The validation losses of ``folder`` before any training (the evaluation ``dual-lm train`` logs)."""
    cfg = load_train_config(None, settings(args, out, "probe", f"model.init_from={folder}"))
    trainer = Trainer(with_init_shape(cfg), DistInfo())
    trainer.start()
    return trainer.evaluate()


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_md_loss" in r]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output)
    causal = settings(args, out, "causal", "objective.alpha=1", f"train.steps={args.causal_steps}")
    run_training(load_train_config(None, [*causal, f"eval.every={args.causal_steps}"]))
    folder = export_checkpoint(out / "causal", out / "causal-model")
    dual = ["objective.alpha=" + repr(args.alpha), f"train.steps={args.steps}", f"eval.every={args.eval_every}"]
    run_training(load_train_config(None, settings(args, out, "converted", *dual, f"model.init_from={folder}")))
    run_training(load_train_config(None, settings(args, out, "scratch", *dual)))
    start = md_loss_at_start(args, out, folder)
    results = {"start": start, "converted": curve(out / "converted"), "scratch": curve(out / "scratch")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return results


def table(results: dict) -> str:
    """A Markdown table: tokens, then MD and AR validation loss of the converted and the scratch run."""
    lines = [
        "| tokens | converted MD loss | scratch MD loss | converted AR nll | scratch AR nll |",
        "|---:|---:|---:|---:|---:|",
        f"| 0 | {results['start']['val_md_loss']:.3f} | - | {results['start']['val_ar_nll']:.3f} | - |",
    ]
    for a, b in zip(results["converted"], results["scratch"], strict=True):
        lines.append(
            f"| {a['tokens']:,} | {a['val_md_loss']:.3f} | {b['val_md_loss']:.3f} | "
            f"{a['val_ar_nll']:.3f} | {b['val_ar_nll']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
