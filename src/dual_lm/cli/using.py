"""Subcommands that use a model: fill, generate, score, evaluate, and the studies (sweep, demo)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dual_lm.cli.making import _run_config
from dual_lm.cli.options import SEED, Command, add_device_options, integer, real
from dual_lm.errors import UserError
from dual_lm.inference import CACHES, DRAFTS, MODES, SCORE_MODES, STRATEGIES
from dual_lm.ownership import check_output_file


def _fill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--text", required=True, help='text with <mask>, e.g. "The capital of <mask> is Paris"')
    p.add_argument("--candidates", type=integer(1), default=5, help="candidates shown per <mask>")
    add_device_options(p)


def _fill(args) -> int:
    from dual_lm.folder import load_folder
    from dual_lm.inference.generation import encode_with_masks, fill_masks

    model, tokenizer = load_folder(args.folder, args.device, args.dtype)
    try:
        length, context = len(encode_with_masks(tokenizer, args.text)), model.config.max_position_embeddings
        if length > context:  # rotary positions past the context give confident nonsense, not an error
            raise UserError(f"--text is {length} tokens, more than the model's context of {context}; shorten it")
        results = fill_masks(model, tokenizer, args.text, args.candidates)
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
            "threshold": args.threshold,
            "cache": args.cache,
        }
    import torch

    torch.manual_seed(args.seed)
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k or None}


# the options of one mode (name -> (mode, default)): given with another mode they are refused, not ignored
MODE_OPTIONS = {
    "k": ("speculative", 4),
    "draft": ("speculative", "one-pass"),
    "steps": ("diffusion", 32),
    "strategy": ("diffusion", "confidence"),
    "block_length": ("diffusion", None),
    "threshold": ("diffusion", None),
    "cache": ("diffusion", "causal"),
}


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--prompt", help="one prompt; the continuation streams to the terminal")
    p.add_argument("--mode", default="causal", choices=MODES)
    p.add_argument(
        "--k",
        type=integer(1, 64),
        default=MODE_OPTIONS["k"][1],
        help="speculative: tokens drafted per round by the bidirectional mode",
    )
    p.add_argument(
        "--draft",
        default=MODE_OPTIONS["draft"][1],
        choices=DRAFTS,
        help="speculative: one pass per round, or a draft pass + a check",
    )
    p.add_argument("--max-new-tokens", type=integer(1), default=50)
    p.add_argument("--temperature", type=real(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=real(0, 1, low_open=True), default=0.95, help="causal/prefix sampling: nucleus mass")
    p.add_argument("--top-k", type=integer(0), default=0, help="causal/prefix sampling: keep the k likeliest (0 = all)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--steps", type=integer(1), default=MODE_OPTIONS["steps"][1], help="diffusion: model passes")
    p.add_argument("--strategy", default=MODE_OPTIONS["strategy"][1], choices=STRATEGIES)
    p.add_argument(
        "--block-length",
        type=integer(1),
        default=None,
        help="diffusion: blocks of N new tokens, left to right, the finished ones in a causal KV cache",
    )
    p.add_argument(
        "--threshold",
        type=real(0, 1, low_open=True),
        default=None,
        help="diffusion: per pass commit every slot more confident than T (at least one); adaptive steps",
    )
    p.add_argument(
        "--cache",
        default=MODE_OPTIONS["cache"][1],
        choices=CACHES,
        help="diffusion with --block-length: exact causal KV cache, or none (recompute the canvas every pass)",
    )
    p.add_argument("--prompts", help="a file of prompts (one per line, or a .jsonl with 'prompt'): JSONL out")
    p.add_argument(
        "--batch-size", type=integer(1), default=8, help="--prompts in causal/prefix mode: prompts per batch"
    )
    p.add_argument("--output", help="--prompts: write the JSONL here (atomically) instead of stdout")
    add_device_options(p)


def _check_diffusion_options(args) -> None:
    """Options of another mode, and the diffusion flags that depend on each other, refused before the
    model loads."""
    for name, (mode, default) in MODE_OPTIONS.items():
        if args.mode != mode and getattr(args, name) != default:
            raise UserError(f"--{name.replace('_', '-')} applies only to --mode {mode}, not {args.mode}")
    if args.mode != "diffusion":
        return
    if args.cache != MODE_OPTIONS["cache"][1] and args.block_length is None:
        raise UserError("--cache applies only to block decoding: give --block-length too")
    if args.block_length is not None and args.block_length > args.max_new_tokens:
        raise UserError(f"--block-length ({args.block_length}) must be <= --max-new-tokens ({args.max_new_tokens})")
    if args.threshold is not None and args.strategy != "confidence":
        raise UserError(f"--threshold commits by confidence: use --strategy confidence, not {args.strategy}")


def _generate(args) -> int:
    from dual_lm.inference.generation import TextPrinter, generate_batch, generate_text
    from dual_lm.studies.requests import read_prompts, write_generations

    _check_diffusion_options(args)
    if (args.prompt is None) == (args.prompts is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.output is not None and args.prompts is None:
        raise UserError("--output applies to --prompts FILE only; a single --prompt streams to the terminal")
    if args.output is not None:  # before the model loads: a bad path must not cost the work
        from dual_lm.ownership import GENERATIONS

        check_output_file(args.output, GENERATIONS, sources=(args.prompts,))
    prompts = read_prompts(Path(args.prompts)) if args.prompts else None
    from dual_lm.folder import load_folder

    model, tokenizer = load_folder(args.folder, args.device, args.dtype)
    options = _generation_options(args)
    try:
        if prompts is not None:
            texts = generate_batch(
                model, tokenizer, prompts, args.mode, args.max_new_tokens, args.batch_size, progress=True, **options
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
        text, result = text
        print(result.stats_line(args.k), file=sys.stderr)
    if not streams:
        print(args.prompt + text)
    return 0


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("file", help="JSONL: one {'context': ..., 'continuation': ...} or one {'text': ...} per line")
    p.add_argument("--mode", default="causal", choices=[*SCORE_MODES, "md-bound"])
    p.add_argument("--mask-n", type=integer(1), default=1, help="masked mode: tokens masked from each scored token on")
    p.add_argument("--samples", type=integer(2), default=32, help="md-bound: Monte-Carlo samples per request (>= 2)")
    p.add_argument("--seed", type=SEED, default=0, help="md-bound: seed of the masks")
    p.add_argument("--window", type=integer(2), default=None, help="causal texts: window length (default: the context)")
    p.add_argument(
        "--stride", type=integer(1), default=None, help="causal texts: new tokens per window (default: half)"
    )
    p.add_argument("--batch-size", type=integer(1), default=16)
    add_device_options(p)


def _score(args) -> int:
    import json

    from dual_lm.folder import load_folder
    from dual_lm.studies.requests import read_score_file, score_records

    model, tokenizer = load_folder(args.folder, args.device, args.dtype)
    items, kind = read_score_file(Path(args.file), tokenizer)
    try:
        rows = score_records(model, items, kind, args)
    except ValueError as err:
        raise UserError(str(err)) from None
    for row in rows:
        print(json.dumps(row))
    total, count = sum(r["logprob"] for r in rows), sum(r["tokens"] for r in rows)
    label = args.mode + (f" n={args.mask_n}" if args.mode == "masked" else "")
    label += f" samples={args.samples}" if args.mode == "md-bound" else ""
    print(
        f"[{label}] {len(rows)} {'texts' if kind == 'text' else 'requests'}, {count} tokens, "
        f"{total / count:.4f} nats/token, perplexity {math.exp(-total / count):.2f}"
        + (" (an upper bound)" if args.mode == "md-bound" else ""),
        file=sys.stderr,
    )
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder")
    p.add_argument("--tasks", default="all", help="comma-separated: arc_easy,arc_challenge,blimp,... or all")
    p.add_argument("--mode", default="causal", choices=SCORE_MODES)
    p.add_argument("--mask-n", type=integer(1), default=1, help="masked mode: tokens masked from each scored token on")
    p.add_argument(
        "--limit", type=integer(1), default=None, help="first N items of each task (of each MMLU/BLiMP subtask)"
    )
    p.add_argument("--output", help="results JSON")
    p.add_argument("--blimp-path", help="folder or .jsonl of nyu-mll/blimp (default: the Hugging Face cache)")
    p.add_argument("--batch-size", type=integer(1), default=16)
    p.add_argument("--seed", type=SEED, default=0)
    add_device_options(p)


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
    job = EvalJob(
        args.folder, parse_tasks(args.tasks), settings, args.limit, args.blimp_path, args.seed, args.device, args.dtype
    )
    results = run_job(job)
    if args.output:
        write_json_atomic(Path(args.output), results)
    print(markdown_table([results]))
    avg = results["average"]
    print(f"\nnormalized accuracy 100 x (acc - r) / (100 - r); average {avg['normalized_acc']:.1f}, ", end="")
    print(f"{avg['normalized_acc_norm']:.1f} with length-normalised accuracy", end="")
    print(f"; wrote {args.output}" if args.output else "")
    return 0


def _eval_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="results JSON files")
    p.add_argument("--output", default="eval-compare.png", help="PNG path")
    p.add_argument("--metric", default="normalized_acc", help="normalized_acc, normalized_acc_norm, acc or acc_norm")


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


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")


def _lm_eval(args) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise UserError('lm-eval is not installed; run `make setup` or `pip install -e ".[lm-eval]"`') from None
    rest = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else args.lm_eval_args
    if not {"-h", "--help"} & set(rest):  # lm-eval's help needs no model: no torch import for it
        import dual_lm.evaluation.lm_eval_adapter  # noqa: F401 - registers the dual-lm model
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


def _sweep_args(p: argparse.ArgumentParser) -> None:
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


def _sweep(args) -> int:
    from dual_lm.studies.sweep import (
        SweepSpec,
        check_sweep_output,
        parse_alphas,
        parse_repetitions,
        results_table,
        run_sweep,
    )

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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixture", default="tests/fixtures/reference/parity-tiny", help="reference parity checkpoint")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes its data, run and model folder")
    add_device_options(p)  # the inference step (training runs on the CPU)


def _demo(args) -> int:
    from dual_lm.studies.demo import run_demo

    return run_demo(Path(args.fixture), Path(args.workdir), args.device, args.dtype)


COMMANDS = (
    Command("fill", _fill, _fill_args, dict(help="predict <mask> tokens with the bidirectional (MNTP) mode")),
    Command(
        "generate",
        _generate,
        _generate_args,
        dict(help="continue prompts: causal, prefix, diffusion or speculative mode"),
    ),
    Command(
        "score",
        _score,
        _score_args,
        dict(help="log-likelihood and perplexity of texts, or of continuations given contexts"),
    ),
    Command(
        "eval", _eval, _eval_args, dict(help="zero-shot accuracy on the paper's nine tasks (causal, prefix or masked)")
    ),
    Command(
        "eval-compare",
        _eval_compare,
        _eval_compare_args,
        dict(help="table and per-task bar chart (PNG) of several `dual-lm eval` results"),
    ),
    Command(
        "lm-eval",
        _lm_eval,
        _lm_eval_args,
        dict(
            add_help=False,  # every argument, --help included, belongs to lm-eval
            prefix_chars="+",
            help="lm-evaluation-harness's command line with the dual-lm model registered",
            description="Runs `lm-eval ARGS` with `--model dual-lm` available, e.g. dual-lm lm-eval --model dual-lm "
            "--model_args pretrained=FOLDER,mode=prefix --tasks arc_easy",
        ),
    ),
    Command(
        "sweep",
        _sweep,
        _sweep_args,
        dict(help="train and evaluate an alpha x repetitions grid (resumable); heatmap and table"),
    ),
    Command("demo", _demo, _demo_args, dict(help="the main job (run by `make demo`)")),
)
