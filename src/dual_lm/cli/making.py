"""Subcommands that make things: model folders, tokenizers, data, runs, plots and the alpha rule."""

from __future__ import annotations

import argparse
from pathlib import Path

from dual_lm.cli.options import MIN_VOCAB, Command, integer, real
from dual_lm.errors import UserError
from dual_lm.ownership import check_output_file


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the reference trainer's config.json")
    p.add_argument("--state-dict", required=True, help="the reference trainer's state_dict.bin")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the folder has no tokenizer)")
    p.add_argument("out_dir", help="new model folder")


def _convert(args) -> int:
    from dual_lm.convert import convert_reference

    out = convert_reference(args.config, args.state_dict, args.out_dir, args.tokenizer)
    note = "with tokenizer.json" if args.tokenizer else "without a tokenizer (pass --tokenizer to include one)"
    print(f"wrote model folder {out} {note}")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def _info(args) -> int:
    import json

    from dual_lm.folder import describe_folder, folder_record

    print(json.dumps(folder_record(args.folder), indent=2) if args.json else describe_folder(args.folder))
    return 0


def _is_tokenizer_file(path: Path) -> bool:
    import json

    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and {"model", "added_tokens"} <= set(payload)


INPUT_HELP = "files, folders, save_to_disk folders, hf:NAME (a hub dataset) or corpus:NAME"


def _input_args(p: argparse.ArgumentParser) -> None:
    """The flags that say what to read and how (shared by train-tokenizer and prepare-data)."""
    from dual_lm.data.documents import SPLIT_MODES

    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text (default text)")
    p.add_argument(
        "--split", default=None, help="split of a hf:NAME dataset (default train) or of a DatasetDict folder (required)"
    )
    p.add_argument("--name", default=None, help="configuration of a hf:NAME dataset")
    p.add_argument(
        "--split-documents",
        choices=SPLIT_MODES,
        default="file",
        help="cut text files into documents: file (one per file, default), lines (every non-blank line), "
        "blank-lines (paragraphs separated by blank lines)",
    )


def _read_report(stats) -> str:
    """``N documents (skipped ...)`` for the final line of train-tokenizer."""
    return f"{stats.documents} documents ({stats.summary()})"


def _train_tokenizer_args(p: argparse.ArgumentParser) -> None:
    _input_args(p)
    p.add_argument("--vocab-size", type=integer(MIN_VOCAB), required=True, help=f"at least {MIN_VOCAB}")
    p.add_argument("out", help="where to write the tokenizer JSON")


def _train_tokenizer(args) -> int:
    from dual_lm.data.corpus import ReadStats, expand_sources, iter_documents, local_inputs
    from dual_lm.ownership import Kind, check_output
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    # a new path only, checked before the training: a file there (a tokenizer that data folders were made
    # with, an input, anything of the user's) is never replaced
    inputs = local_inputs(args.input)
    out = check_output(args.out, Kind("tokenizer file", False, _is_tokenizer_file), sources=inputs)
    sources = expand_sources(args.input, args.split, args.name, args.split_documents)
    stats = ReadStats()
    documents = iter_documents(sources, args.text_field, stats, args.split_documents)
    tokenizer = train_tokenizer(documents, args.vocab_size)
    if stats.documents == 0:
        raise UserError(f"the inputs hold no documents ({stats.summary()})")
    save_tokenizer(tokenizer, out)
    print(f"trained on {_read_report(stats)}; vocabulary {tokenizer.get_vocab_size()}")
    print(f"wrote {out}")
    return 0


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer JSON (for example the published one)")
    _input_args(p)
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--valid-tokens", type=integer(0), default=0, help="hold out the first documents up to this many tokens"
    )
    p.add_argument(
        "--num-shards", type=integer(1), default=None, help="training shards (default: one per ~500 MB of text)"
    )


def _prepare_data(args) -> int:
    from dual_lm.data.prepare import PrepareRequest, prepare_data

    request = PrepareRequest(
        args.tokenizer,
        tuple(args.input),
        args.output,
        args.valid_tokens,
        args.num_shards,
        args.text_field,
        args.split,
        args.name,
        args.split_documents,
    )
    m = prepare_data(request)
    print(
        f"wrote {args.output} from {len(m['sources'])} source(s): {m['train_tokens']:,} training tokens in "
        f"{m['train_documents']:,} documents "
        f"({len(m['shards'])} shard(s), {m['dtype']}), {m['valid']['tokens']:,} validation tokens in "
        f"{m['valid']['documents']:,} documents; {_skipped_report(m['skipped'])}"
    )
    return 0


def _skipped_report(skipped: dict) -> str:
    """``skipped N document(s) {per reason}`` and the files not read (no readable format, links, repeats)."""
    reasons = {k: skipped.get(k, 0) for k in ("invalid_utf8", "empty", "not_json")}
    text = f"skipped {sum(reasons.values())} document(s) {reasons}"
    files, names = skipped.get("unreadable_files", 0), skipped.get("unreadable_examples", [])
    if files:
        more = ", ..." if files > len(names) else ""
        text += f" and {files} file(s) of no readable format or read already ({', '.join(names)}{more})"
    return text


def _run_config(args):
    """The TrainConfig of ``CONFIG [key=value ...]``, where CONFIG may itself be an override."""
    from dual_lm.config import load_train_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # no YAML file, only overrides
    return load_train_config(config, overrides)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML run config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. objective.alpha=0.5")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")


def _train(args) -> int:
    from dual_lm.training.train import run_training

    run_training(_run_config(args), resume=args.resume)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out_dir", nargs="?", help="a new folder (default: RUN/alpha_{alpha:.3f}_n-reps={R})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an existing model folder")


def _export(args) -> int:
    from dual_lm.training.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote model folder {out}")
    return 0


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default RUN_DIR/loss.png)")


def _plot(args) -> int:
    from dual_lm.ownership import PLOT
    from dual_lm.studies.plot import plot_run
    from dual_lm.training.runlog import METRICS_FILE

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    out = check_output_file(args.output or run_dir / "loss.png", PLOT, sources=(run_dir / METRICS_FILE,))
    print(f"wrote {plot_run(run_dir, out)}")
    return 0


def _recommend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repetitions", type=real(1), help="data repetitions R >= 1 (budget / unique tokens)")
    p.add_argument("--unique-tokens", type=integer(1), help="unique tokens of the corpus")
    p.add_argument("--budget-tokens", type=integer(1), help="training tokens of the run")


def _recommend(args) -> int:
    from dual_lm.training.recommend import recommend_alpha, repetitions_from_budget

    budget = [value is not None for value in (args.unique_tokens, args.budget_tokens)]
    if (args.repetitions is not None and any(budget)) or (args.repetitions is None and not all(budget)):
        raise UserError("give --repetitions R, or both --unique-tokens and --budget-tokens (not both ways)")
    if args.repetitions is not None:
        reps = args.repetitions
    else:
        reps = repetitions_from_budget(args.unique_tokens, args.budget_tokens)
    alpha, lines = recommend_alpha(reps)
    print("\n".join(lines))
    print(f"recommended alpha = {alpha:.6f}  (objective.alpha={alpha:.6f})")
    return 0


COMMANDS = (
    Command("convert-reference", _convert, _convert_args, dict(help="reference-trainer checkpoint -> model folder")),
    Command(
        "info",
        _info,
        _info_args,
        dict(help="print a model folder's configuration, parameter counts, classes and modes"),
    ),
    Command(
        "train-tokenizer",
        _train_tokenizer,
        _train_tokenizer_args,
        dict(help="train the reference byte-level BPE recipe on text"),
    ),
    Command(
        "prepare-data", _prepare_data, _prepare_data_args, dict(help="corpus -> memory-mapped token shards (resumable)")
    ),
    Command("train", _train, _train_args, dict(help="train a dual-objective model (also under torchrun)")),
    Command("export", _export, _export_args, dict(help="training checkpoint (or run folder) -> model folder")),
    Command("plot", _plot, _plot_args, dict(help="draw a run's loss curves to PNG")),
    Command(
        "recommend-alpha",
        _recommend,
        _recommend_args,
        dict(help="the paper's rule for choosing alpha from the data budget"),
    ),
)
