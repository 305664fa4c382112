"""The files of ``dual-lm generate --prompts`` and ``dual-lm score``: reading requests, writing results.

Each reader validates as it goes and raises ``UserError`` naming the file and line of the first
bad record; outputs are written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dual_lm.atomic import write_text_atomic
from dual_lm.errors import UserError


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of an input file; one line when it is missing, a folder or not text."""
    if not path.is_file():
        raise UserError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file, or a ``prompt`` field per line of a .jsonl file."""
    prompts = []
    for n, line in enumerate(read_text(path, "prompt file").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: each line must be a JSON object with a 'prompt'") from None
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def write_generations(prompts: list[str], texts: list[str], output: str | None) -> None:
    """One ``{"prompt", "text"}`` JSON line per prompt: to stdout, or atomically to ``output``."""
    lines = "".join(json.dumps({"prompt": p, "text": t}) + "\n" for p, t in zip(prompts, texts, strict=True))
    if output is None:
        print(lines, end="")
        return
    write_text_atomic(Path(output), lines)
    print(f"wrote {len(texts)} continuations to {output}", file=sys.stderr)


def read_score_file(path: Path, tokenizer) -> tuple[list, str]:
    """Token requests from JSONL: all ``{"context", "continuation"}`` pairs ("pair"), or all ``{"text"}``
    records ("text", token lists starting with ``<s>``)."""
    from dual_lm.inference.scoring import split_pair

    items, kinds = [], set()
    for n, line in enumerate(read_text(path, "score file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "text" in record:
                items.append(tokenizer(str(record["text"]))["input_ids"])
                kinds.add("text")
            else:
                items.append(split_pair(tokenizer, record["context"], record["continuation"]))
                kinds.add("pair")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{path}:{n}: each line must be a JSON object with 'text', or with 'context' and 'continuation'"
            ) from None
    if not items:
        raise UserError(f"{path} holds no requests")
    if len(kinds) > 1:
        raise UserError(f"{path} mixes 'text' records and context/continuation pairs; use one kind per file")
    return items, kinds.pop()


def score_records(model, items: list, kind: str, args) -> list[dict]:
    """One JSON-able record per request of ``read_score_file``, scored as ``dual-lm score`` asks."""
    from dual_lm.inference.scoring import md_bound, score_requests, score_texts

    windowed = args.window is not None or args.stride is not None
    if windowed and not (kind == "text" and args.mode == "causal"):
        raise UserError("--window and --stride apply to 'text' records in causal mode only")
    if kind == "text" and args.mode == "causal":
        results = score_texts(model, items, args.window, args.stride, args.batch_size, progress=True)
        return [{"logprob": r.logprob, "tokens": r.tokens, "perplexity": r.perplexity} for r in results]
    if kind == "text":  # the whole text after <s>, read in the chosen mode (one window)
        limit = model.config.max_position_embeddings
        for n, ids in enumerate(items):
            if len(ids) > limit:
                raise UserError(
                    f"text {n} has {len(ids)} tokens, more than the context of {limit}; only --mode causal "
                    "scores long texts (in sliding windows)"
                )
        items = [(ids[:1], ids[1:]) for ids in items]
    if args.mode == "md-bound":
        results = md_bound(model, items, args.samples, args.seed, args.batch_size, progress=True)
        tokens = [len(w) for _, w in items]
        return [{"logprob": r.logprob, "stderr": r.stderr, "tokens": n} for r, n in zip(results, tokens, strict=True)]
    results = score_requests(model, items, args.mode, n=args.mask_n, batch_size=args.batch_size, progress=True)
    return [{"logprob": r.logprob, "tokens": r.tokens, "greedy": r.greedy} for r in results]
