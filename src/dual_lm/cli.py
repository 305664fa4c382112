"""The ``dual-lm`` command: a table of subcommands; parsing only, the work lives in the modules."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from dual_lm.errors import UserError
from dual_lm.ownership import check_output_file, environment_error


class Parser(argparse.ArgumentParser):
    """argparse with the project's error line: ``dual-lm CMD: error: ...`` alone, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], refused where it is parsed (never a silent default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def real(low: float, high: float = math.inf, *, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with ``low_open``); nan and inf
    are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            if high == math.inf:
                bound = f"{'>' if low_open else '>='} {low:g}"
            else:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


SEED = integer(0, 2**64 - 1)  # what torch.manual_seed accepts
MIN_VOCAB = 272  # the tokenizer recipe's 16 special tokens and 256 byte symbols (tokenizer.train_tokenizer)


def _convert(args) -> int:
    from dual_lm.convert import convert_reference

    out = convert_reference(args.config, args.state_dict, args.out_dir, args.tokenizer)
    note = "with tokenizer.json" if args.tokenizer else "without a tokenizer (pass --tokenizer to include one)"
    print(f"wrote model folder {out} {note}")
    return 0


def _info(args) -> int:
    from dual_lm.folder import describe_folder

    print(describe_folder(args.folder))
    return 0


def _is_tokenizer_file(path: Path) -> bool:
    import json

    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and {"model", "added_tokens"} <= set(payload)


def _train_tokenizer(args) -> int:
    from dual_lm.corpus import ReadStats, expand_sources, iter_documents
    from dual_lm.ownership import Kind, check_output
    from dual_lm.tokenizer import save_tokenizer, train_tokenizer

    # a new path only, checked before the training: a file there (a tokenizer that data folders were made
    # with, an input, anything of the user's) is never replaced
    inputs = [s for s in args.input if not s.startswith("corpus:")]
    out = check_output(args.out, Kind("tokenizer file", False, _is_tokenizer_file), sources=inputs)
    sources = expand_sources(args.input)
    stats = ReadStats()
    tokenizer = train_tokenizer(iter_documents(sources, args.text_field, stats), args.vocab_size)
    if stats.documents == 0:
        raise UserError(f"the inputs hold no documents ({stats.summary()})")
    save_tokenizer(tokenizer, out)
    print(f"trained on {stats.documents} documents ({stats.summary()}); vocabulary {tokenizer.get_vocab_size()}")
    print(f"wrote {out}")
    return 0


def _prepare_data(args) -> int:
    from dual_lm.prepare import PrepareRequest, prepare_data

    request = PrepareRequest(
        args.tokenizer, tuple(args.input), args.output, args.valid_tokens, args.num_shards, args.text_field
    )
    m = prepare_data(request)
    skipped = sum(m["skipped"].values())
    print(
        f"wrote {args.output}: {m['train_tokens']:,} training tokens in {m['train_documents']:,} documents "
        f"({len(m['shards'])} shard(s), {m['dtype']}), {m['valid']['tokens']:,} validation tokens in "
        f"{m['valid']['documents']:,} documents; skipped {skipped} document(s) {m['skipped']}"
    )
    return 0


def _run_config(args):
    """The TrainConfig of ``CONFIG [key=value ...]``, where CONFIG may itself be an override."""
    from dual_lm.config import load_train_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # no YAML file, only overrides
    return load_train_config(config, overrides)


def _train(args) -> int:
    from dual_lm.train import run_training

    run_training(_run_config(args), resume=args.resume)
    return 0


def _export(args) -> int:
    from dual_lm.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote model folder {out}")
    return 0


def _plot(args) -> int:
    from dual_lm.ownership import PLOT
    from dual_lm.plot import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    out = check_output_file(args.output or run_dir / "loss.png", PLOT, sources=(run_dir / "metrics.jsonl",))
    print(f"wrote {plot_run(run_dir, out)}")
    return 0


def _recommend(args) -> int:
    from dual_lm.recommend import recommend_alpha, repetitions_from_budget

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


def _load_with_tokenizer(folder):
    from transformers import AutoTokenizer

    from dual_lm.folder import check_folder, load_model

    folder = check_folder(folder)
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; text commands need a folder that carries its tokenizer")
    return load_model(folder), AutoTokenizer.from_pretrained(str(folder))


def _fill(args) -> int:
    from dual_lm.generation import encode_with_masks, fill_masks

    model, tokenizer = _load_with_tokenizer(args.folder)
    try:
        length, context = len(encode_with_masks(tokenizer, args.text)), model.config.max_position_embeddings
        if length > context:  # rotary positions past the context give confident nonsense, not an error
            raise UserError(f"--text is {length} tokens, more than the model's context of {context}; shorten it")
        results = fill_masks(model, tokenizer, args.text, args.top_k)
    except ValueError as err:
        raise UserError(str(err)) from None
    for n, result in enumerate(results, 1):
        shown = ", ".join(f"{tok!r} {p:.3f}" for tok, p in result.candidates)
        print(f"<mask> {n}: {shown}")
    return 0


def _generation_options(args) -> dict:
    if args.mode == "speculative":
        return {"k": args.k, "temperature": args.temperature, "seed": args.seed, "draft": args.draft}
    if args.mode == "diffusion":
        return {
            "steps": args.steps,
            "temperature": args.temperature,
            "seed": args.seed,
            "strategy": args.strategy,
            "block_length": args.block_length,
        }
    import torch

    torch.manual_seed(args.seed)
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None}


def _generate(args) -> int:
    from dual_lm.generation import TextPrinter, generate_batch, generate_text
    from dual_lm.jsonl_io import read_prompts, write_generations

    if (args.prompt is None) == (args.prompts is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.output is not None and args.prompts is None:
        raise UserError("--output applies to --prompts FILE only; a single --prompt streams to the terminal")
    if args.output is not None:  # before the model loads: a bad path must not cost the work
        from dual_lm.ownership import GENERATIONS

        check_output_file(args.output, GENERATIONS, sources=(args.prompts,))
    prompts = read_prompts(Path(args.prompts)) if args.prompts else None
    model, tokenizer = _load_with_tokenizer(args.folder)
    options = _generation_options(args)
    try:
        if prompts is not None:
            texts = generate_batch(
                model, tokenizer, prompts, args.mode, args.max_new_tokens, args.batch_size, **options
            )
            write_generations(prompts, texts, args.output)
            return 0
        streams = args.mode != "diffusion"  # a diffusion canvas resolves all at once: printed when done
        write = lambda text: print(text, end="", flush=True)  # noqa: E731
        printer = TextPrinter(tokenizer, write, prompt_text=args.prompt) if streams else None
        text = generate_text(model, tokenizer, args.prompt, args.mode, args.max_new_tokens, printer, **options)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.mode == "speculative":
        text, rate = text
        print(f"[speculative: {rate:.1%} of the drafted tokens accepted, k={args.k}]", file=sys.stderr)
    if not streams:
        print(args.prompt + text)
    return 0


def _score(args) -> int:
    import json

    from dual_lm.jsonl_io import read_score_file, score_records

    model, tokenizer = _load_with_tokenizer(args.folder)
    items, kind = read_score_file(Path(args.file), tokenizer)
    try:
        rows = score_records(model, items, kind, args)
    except ValueError as err:
        raise UserError(str(err)) from None
    for row in rows:
        print(json.dumps(row))
    total, count = sum(r["logprob"] for r in rows), sum(r["tokens"] for r in rows)
    label = args.mode + (f" n={args.n}" if args.mode == "masked" else "")
    label += f" samples={args.samples}" if args.mode == "md-bound" else ""
    print(
        f"[{label}] {len(rows)} {'texts' if kind == 'text' else 'requests'}, {count} tokens, "
        f"{total / count:.4f} nats/token, perplexity {math.exp(-total / count):.2f}"
        + (" (an upper bound)" if args.mode == "md-bound" else ""),
        file=sys.stderr,
    )
    return 0


def _eval(args) -> int:
    from dual_lm.atomic import write_json_atomic
    from dual_lm.evaluation.evaluate import EvalJob, run_job
    from dual_lm.evaluation.results import markdown_table
    from dual_lm.evaluation.runner import EvalSettings
    from dual_lm.evaluation.tasks import parse_tasks
    from dual_lm.ownership import RESULTS

    if args.output:  # before any data or model is loaded: a bad path must not cost the work
        check_output_file(args.output, RESULTS, sources=(args.folder,))
    settings = EvalSettings(args.mode, args.mask_n, args.batch_size)
    job = EvalJob(args.folder, parse_tasks(args.tasks), settings, args.limit, args.blimp_path, args.seed, args.device)
    results = run_job(job)
    if args.output:
        write_json_atomic(Path(args.output), results)
    print(markdown_table([results]))
    avg = results["average"]
    print(f"\nnormalized accuracy 100 x (acc - r) / (100 - r); average {avg['normalized_acc']:.1f}, ", end="")
    print(f"{avg['normalized_acc_norm']:.1f} with length-normalised accuracy", end="")
    print(f"; wrote {args.output}" if args.output else "")
    return 0


def _eval_compare(args) -> int:
    from dual_lm.evaluation.compare import plot_runs
    from dual_lm.evaluation.results import check_metric, markdown_table, read_results
    from dual_lm.ownership import PLOT

    metric = check_metric(args.metric)
    check_output_file(args.output, PLOT, sources=args.results)
    runs = [read_results(path) for path in args.results]
    print(markdown_table(runs, metric))
    print(f"wrote {plot_runs(runs, args.output, metric)}")
    return 0


def _lm_eval(args) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise UserError('lm-eval is not installed; run `make setup` or `pip install -e ".[lm-eval]"`') from None
    import dual_lm.evaluation.lm_eval_adapter  # noqa: F401 - registers the dual-lm model

    rest = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else args.lm_eval_args
    saved, sys.argv = sys.argv, ["lm-eval", *rest]
    try:
        cli_evaluate()
    except UserError:
        raise  # the dual-lm model's own one-line errors (bad model_args, a folder that is not a model)
    except ValueError as err:
        if not _raised_in_lm_eval(err):
            raise  # a bug elsewhere keeps its traceback
        raise UserError("lm-eval: " + " ".join(str(err).split())) from None
    finally:
        sys.argv = saved
    return 0


def _raised_in_lm_eval(err: BaseException) -> bool:
    """Whether ``err`` was raised by lm-eval's own code (its checks of its arguments: an unknown task or
    model), which deserves its message without the traceback."""
    import lm_eval

    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    root = Path(lm_eval.__file__).resolve().parent
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(root)


def _checked_tasks(text: str | None, limit: int | None) -> tuple[str, ...]:
    """The sweep's evaluation tasks, their data checked now rather than after hours of training."""
    if not text:
        if limit is not None:
            raise UserError("--limit applies to --tasks only")
        return ()
    from dual_lm.evaluation.tasks import load_items, parse_tasks

    names = tuple(parse_tasks(text))
    for name in names:
        load_items(name, 1)
    return names


def _sweep(args) -> int:
    from dual_lm.sweep import SweepSpec, check_sweep_output, parse_alphas, parse_repetitions, results_table, run_sweep

    base = _run_config(args)
    out = check_sweep_output(Path(args.output or Path(base.output).parent / "sweep"), base)
    tasks = _checked_tasks(args.tasks, args.limit)
    spec = SweepSpec(
        parse_alphas(args.alphas), parse_repetitions(args.repetitions), out, args.nproc, args.windows, tasks, args.limit
    )
    results = run_sweep(base, spec)
    print(results_table(results), end="")
    print(f"wrote {out}/results.json, results.md, heatmap.png and curves.png ({len(results)} cells)")
    return 0


def _demo(args) -> int:
    from dual_lm.demo import run_demo

    return run_demo(Path(args.fixture), Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dual-lm", description="Dual-objective (AR + masked diffusion) LLaMA models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("convert-reference", help="reference-trainer checkpoint -> model folder")
    p.add_argument("--config", required=True, help="the reference trainer's config.json")
    p.add_argument("--state-dict", required=True, help="the reference trainer's state_dict.bin")
    p.add_argument("--tokenizer", help="tokenizer.json to include (default: the folder has no tokenizer)")
    p.add_argument("out_dir", help="new model folder")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", help="print a model folder's configuration, parameter counts, classes and modes")
    p.add_argument("folder")
    p.set_defaults(func=_info)

    p = sub.add_parser("train-tokenizer", help="train the reference byte-level BPE recipe on text")
    p.add_argument("--input", nargs="+", required=True, help="files, folders or corpus:NAME")
    p.add_argument("--vocab-size", type=integer(MIN_VOCAB), required=True, help=f"at least {MIN_VOCAB}")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("out", help="where to write the tokenizer JSON")
    p.set_defaults(func=_train_tokenizer)

    p = sub.add_parser("prepare-data", help="corpus -> memory-mapped token shards (resumable)")
    p.add_argument("--tokenizer", required=True, help="tokenizer JSON (for example the published one)")
    p.add_argument("--input", nargs="+", required=True, help="files, folders or corpus:NAME")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--valid-tokens", type=integer(0), default=0, help="hold out the first documents up to this many tokens"
    )
    p.add_argument(
        "--num-shards", type=integer(1), default=None, help="training shards (default: one per ~500 MB of text)"
    )
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("train", help="train a dual-objective model (also under torchrun)")
    p.add_argument("config", nargs="?", help="YAML run config (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. objective.alpha=0.5")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="training checkpoint (or run folder) -> model folder")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out_dir", nargs="?", help="a new folder (default: RUN/alpha_{alpha:.3f}_n-reps={R})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an existing model folder")
    p.set_defaults(func=_export)

    p = sub.add_parser("plot", help="draw a run's loss curves to PNG")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG path (default RUN_DIR/loss.png)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("recommend-alpha", help="the paper's rule for choosing alpha from the data budget")
    p.add_argument("--repetitions", type=real(1), help="data repetitions R >= 1 (budget / unique tokens)")
    p.add_argument("--unique-tokens", type=integer(1), help="unique tokens of the corpus")
    p.add_argument("--budget-tokens", type=integer(1), help="training tokens of the run")
    p.set_defaults(func=_recommend)

    p = sub.add_parser("fill", help="predict <mask> tokens with the bidirectional (MNTP) mode")
    p.add_argument("folder")
    p.add_argument("--text", required=True, help='text with <mask>, e.g. "The capital of <mask> is Paris"')
    p.add_argument("--top-k", type=integer(1), default=5, help="candidates shown per <mask>")
    p.set_defaults(func=_fill)

    p = sub.add_parser("generate", help="continue prompts: causal, prefix, diffusion or speculative mode")
    p.add_argument("folder")
    p.add_argument("--prompt", help="one prompt; the continuation streams to the terminal")
    p.add_argument("--mode", default="causal", choices=["causal", "prefix", "diffusion", "speculative"])
    p.add_argument(
        "--k", type=integer(1, 64), default=4, help="speculative: tokens drafted per round by the bidirectional mode"
    )
    p.add_argument("--draft", default="cached", choices=["cached", "full"], help="speculative: the draft pass")
    p.add_argument("--max-new-tokens", type=integer(1), default=50)
    p.add_argument("--temperature", type=real(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=real(0, 1, low_open=True), default=0.95, help="causal/prefix sampling: nucleus mass")
    p.add_argument("--top-k", type=integer(0), default=0, help="causal/prefix sampling: keep the k likeliest (0 = all)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--steps", type=integer(1), default=32, help="diffusion: model passes")
    p.add_argument("--strategy", default="confidence", choices=["confidence", "random"])
    p.add_argument("--block-length", type=integer(1), default=None, help="diffusion: semi-autoregressive blocks")
    p.add_argument("--prompts", help="a file of prompts (one per line, or a .jsonl with 'prompt'): JSONL out")
    p.add_argument(
        "--batch-size", type=integer(1), default=8, help="--prompts in causal/prefix mode: prompts per batch"
    )
    p.add_argument("--output", help="--prompts: write the JSONL here (atomically) instead of stdout")
    p.set_defaults(func=_generate)

    p = sub.add_parser("score", help="log-likelihood and perplexity of texts, or of continuations given contexts")
    p.add_argument("folder")
    p.add_argument("file", help="JSONL: one {'context': ..., 'continuation': ...} or one {'text': ...} per line")
    p.add_argument("--mode", default="causal", choices=["causal", "prefix", "masked", "md-bound"])
    p.add_argument("--n", type=integer(1), default=1, help="masked mode: tokens masked from each scored token on")
    p.add_argument("--samples", type=integer(2), default=32, help="md-bound: Monte-Carlo samples per request (>= 2)")
    p.add_argument("--seed", type=SEED, default=0, help="md-bound: seed of the masks")
    p.add_argument("--window", type=integer(2), default=None, help="causal texts: window length (default: the context)")
    p.add_argument(
        "--stride", type=integer(1), default=None, help="causal texts: new tokens per window (default: half)"
    )
    p.add_argument("--batch-size", type=integer(1), default=16)
    p.set_defaults(func=_score)

    p = sub.add_parser("eval", help="zero-shot accuracy on the paper's nine tasks (causal, prefix or masked)")
    p.add_argument("folder")
    p.add_argument("--tasks", default="all", help="comma-separated: arc_easy,arc_challenge,blimp,... or all")
    p.add_argument("--mode", default="causal", choices=["causal", "prefix", "masked"])
    p.add_argument("--mask-n", type=integer(1), default=1, help="masked mode: tokens masked from each scored token on")
    p.add_argument(
        "--limit", type=integer(1), default=None, help="first N items of each task (of each MMLU/BLiMP subtask)"
    )
    p.add_argument("--output", help="results JSON")
    p.add_argument("--blimp-path", help="folder or .jsonl of nyu-mll/blimp (default: the Hugging Face cache)")
    p.add_argument("--batch-size", type=integer(1), default=16)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)

    p = sub.add_parser("eval-compare", help="table and per-task bar chart (PNG) of several `dual-lm eval` results")
    p.add_argument("results", nargs="+", help="results JSON files")
    p.add_argument("--output", default="eval-compare.png", help="PNG path")
    p.add_argument("--metric", default="normalized_acc", help="normalized_acc, normalized_acc_norm, acc or acc_norm")
    p.set_defaults(func=_eval_compare)

    p = sub.add_parser(
        "lm-eval",
        add_help=False,  # every argument, --help included, belongs to lm-eval
        prefix_chars="+",
        help="lm-evaluation-harness's command line with the dual-lm model registered",
        description="Runs `lm-eval ARGS` with `--model dual-lm` available, e.g. dual-lm lm-eval --model dual-lm "
        "--model_args pretrained=FOLDER,mode=prefix --tasks arc_easy",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    p.set_defaults(func=_lm_eval)

    p = sub.add_parser("sweep", help="train and evaluate an alpha x repetitions grid (resumable); heatmap and table")
    p.add_argument("config", help="the base training YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    p.add_argument("--alphas", required=True, help="comma-separated, fractions allowed: 0,0.5,63/64,1")
    p.add_argument("--repetitions", required=True, help="comma-separated integers: 1,16,64")
    p.add_argument("--output", help="sweep folder (default: next to the base config's output, named sweep)")
    p.add_argument("--nproc", type=integer(1), default=1, help="> 1: run each cell as a torchrun job of N processes")
    p.add_argument(
        "--windows", type=integer(0), default=64, help="validation windows for prefix vs causal scoring (0: none)"
    )
    p.add_argument("--tasks", help="`dual-lm eval` tasks to score per cell in causal and prefix mode")
    p.add_argument("--limit", type=integer(1), default=None, help="--tasks: items per task")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("demo", help="the main job (run by `make demo`)")
    p.add_argument("--fixture", default="tests/fixtures/reference/parity-tiny", help="reference parity checkpoint")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes its data, run and model folder")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The one place user errors become ``dual-lm CMD: error: ...`` and exit 2. A full disk or a
    permission error is the machine's fault and gets the same line; any other exception is a bug
    and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a parse error (already printed as one line) or --help
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except UserError as err:
        print(f"dual-lm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``dual-lm ... | head``): stop quietly, as a shell tool does
        with contextlib.suppress(OSError, ValueError):  # no descriptor (stdout is not a file)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:
        message = environment_error(err)
        if message is None:
            raise
        print(f"dual-lm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dual-lm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
