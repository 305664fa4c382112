"""Generation and scoring speed, each as a ratio against a peer measured in this one run.

1. causal decode tokens/s: DLMLlamaForCausalLM.generate over transformers' LlamaForCausalLM.generate
   at the same dimensions (random weights, greedy, a fixed number of new tokens; target >= 0.95);
2. prefix-mode decode over causal decode (target >= 0.95);
3. self-speculative decoding over causal decode, with its acceptance rate (needs a trained model:
   ``--folder``, by default the one ``make demo`` writes);
4. diffusion (same folder, real prompts from its held-out data): today's whole-canvas sampler and the
   cached block sampler at the same steps, and the confidence-threshold rule: tokens/s, passes per
   token and the causal-mode NLL of the samples (``--diffusion-only``: this table alone);
5. batched scoring over a one-request-at-a-time loop (target >= 3x).

Usage:  .venv/bin/python bench/generate.py [--folder runs/demo/alpha_0.750_n-reps=1] [--preset small]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import llama_config, preset
from dual_lm.folder import load_model
from dual_lm.inference.diffusion import DiffusionConfig, diffusion_generate
from dual_lm.inference.scoring import score_requests
from dual_lm.inference.speculative import speculative_generate


def best_of(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rates(args) -> dict[str, float]:
    torch.manual_seed(0)
    config = llama_config(preset(args.preset))
    ours, peer = DLMLlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ids = torch.randint(16, config.vocab_size, (1, args.prompt))
    fixed = {"max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False, "eos_token_id": None}
    contenders = {
        "transformers Llama causal": lambda: peer.generate(ids, **fixed),
        "ours causal": lambda: ours.generate(ids, **fixed),
        "ours prefix": lambda: ours.generate(ids, prefix_attention=True, **fixed),
    }
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every contender alike
        for name, fn in contenders.items():
            times[name].append(best_of(fn, args.repeats))
    return {name: args.new / statistics.median(t) for name, t in times.items()}


def trained_rates(args) -> tuple[dict[str, float], float]:
    model = load_model(args.folder)
    ids = torch.tensor([[1, *range(200, 200 + args.prompt - 1)]]) % model.config.vocab_size
    ids[0, 0] = 1
    fixed = {"max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False, "eos_token_id": None}
    rates = {"causal": args.new / best_of(lambda: model.generate(ids, **fixed), args.repeats)}
    holder = {}

    def speculate():
        holder["result"] = speculative_generate(model, ids[0], args.new, k=args.k, stop_at_eos=False)

    rates[f"speculative k={args.k}"] = args.new / best_of(speculate, args.repeats)
    return rates, holder["result"].acceptance_rate


# --------------------------------------------------------------------------- diffusion (issue 16)


def diffusion_prompts(args, vocab_size: int) -> list[torch.Tensor]:
    """``--diffusion-prompts`` prompts of ``--prompt`` tokens (``<s>`` first): windows spread over the
    held-out tokens of ``--prompt-data`` (default: the demo's ``data/valid.tokens`` beside the folder),
    else one made-up prompt."""
    path = Path(args.prompt_data or Path(args.folder).parent / "data" / "valid.tokens")
    if not path.is_file():
        ids = torch.tensor([1, *range(200, 200 + args.prompt - 1)]) % vocab_size
        ids[0] = 1
        return [ids]
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    stride = (len(tokens) - args.prompt) // args.diffusion_prompts
    return [
        torch.tensor([1, *tokens[i * stride : i * stride + args.prompt - 1].tolist()])
        for i in range(args.diffusion_prompts)
    ]


def causal_nll(model, prompt: torch.Tensor, new: list[int]) -> float:
    """Mean -log p of the new tokens given the prompt under the causal mode (read at the position before)."""
    seq = torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)])
    logp = torch.log_softmax(model(seq[None]).logits[0, prompt.numel() - 1 : -1].float(), -1)
    return -logp.gather(1, seq[prompt.numel() :, None]).mean().item()


def diffusion_contenders(args) -> dict[str, DiffusionConfig | None]:
    """Causal greedy decoding (None), today's whole-canvas sampler and the cached block sampler at each
    of ``--steps`` (with ``--uncached-blocks`` also the uncached block sampler, which tells the block
    schedule's effect on the NLL from the cache's), and the threshold rule over blocks of each
    ``--block-lengths``."""
    lengths = [int(v) for v in args.block_lengths.split(",")]
    contenders: dict[str, DiffusionConfig | None] = {"causal greedy": None}
    for steps in (int(v) for v in args.steps.split(",")):
        contenders[f"whole canvas, {steps} steps"] = DiffusionConfig(steps=steps, stop_at_eos=False)
        for length in lengths:
            cfg = DiffusionConfig(steps=steps, block_length=length, stop_at_eos=False)
            contenders[f"cached blocks of {length}, {steps} steps"] = cfg
            if args.uncached_blocks:  # the pre-cache block sampler: blocks, but every pass over the whole canvas
                uncached = DiffusionConfig(steps=steps, block_length=length, cache="none", stop_at_eos=False)
                contenders[f"uncached blocks of {length}, {steps} steps"] = uncached
    for length in lengths:
        for threshold in (float(v) for v in args.thresholds.split(",")):
            cfg = DiffusionConfig(block_length=length, threshold=threshold, stop_at_eos=False)
            contenders[f"cached blocks of {length}, threshold {threshold:g}"] = cfg
    return contenders


def diffusion_rates(args) -> tuple[list[dict], int]:
    """Per contender: tokens/s over the prompts (median of interleaved rounds), passes per token,
    the causal-mode NLL of the (greedy) samples and their share of distinct tokens; and the prompt count."""
    model = load_model(args.folder)
    prompts = diffusion_prompts(args, model.config.vocab_size)
    fixed = {"max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False, "eos_token_id": None}

    def run(cfg):
        if cfg is None:
            return [(model.generate(p[None], **fixed)[0, p.numel() :].tolist(), 1.0) for p in prompts]
        return [
            (new, result.passes_per_token)
            for new, result in (diffusion_generate(model, p, args.new, cfg) for p in prompts)
        ]

    contenders = diffusion_contenders(args)
    outputs = {name: run(cfg) for name, cfg in contenders.items()}  # also the warm-up
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every contender alike
        for name, cfg in contenders.items():
            start = time.perf_counter()
            run(cfg)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, out in outputs.items():
        news = [new for new, _ in out]
        rows.append(
            {
                "name": name,
                "tokens_per_s": args.new * len(prompts) / statistics.median(times[name]),
                "passes_per_token": statistics.mean(ppt for _, ppt in out),
                "nll": statistics.mean(causal_nll(model, p, new) for p, new in zip(prompts, news, strict=True)),
                "distinct": statistics.mean(len(set(new)) / len(new) for new in news),
            }
        )
    return rows, len(prompts)


def print_diffusion_table(rows: list[dict], prompts: int) -> None:
    """A markdown table, speeds relative to causal decoding and to today's sampler at the same steps."""
    base = {r["name"].split(", ")[-1]: r["tokens_per_s"] for r in rows if r["name"].startswith("whole canvas")}
    causal = rows[0]["tokens_per_s"]
    print(f"diffusion ({prompts} prompts, greedy, no stop at </s>):")
    print("| sampler | tokens/s | x causal | x whole canvas, same steps | passes/token | causal NLL | distinct |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        steps = r["name"].split(", ")[-1]
        same = f"{r['tokens_per_s'] / base[steps]:.2f}" if steps in base else "-"
        print(
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / causal:.2f} | {same} "
            f"| {r['passes_per_token']:.3f} | {r['nll']:.3f} | {r['distinct']:.2f} |"
        )


def scoring_ratio(args) -> tuple[float, float]:
    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(preset(args.preset))).eval()
    lengths = torch.randint(8, 64, (args.requests, 2)).tolist()
    requests = [([1, *range(20, 20 + c)], list(range(30, 30 + w // 4 + 1))) for c, w in lengths]
    batched = best_of(lambda: score_requests(model, requests, "causal", batch_size=32), args.repeats)
    alone = best_of(lambda: [score_requests(model, [r], "causal", batch_size=1) for r in requests], args.repeats)
    return args.requests / batched, args.requests / alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/demo/alpha_0.750_n-reps=1", help="a trained model folder")
    parser.add_argument("--preset", default="small", help="dimensions of the random models (decode, scoring)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--k", type=int, default=4, help="speculative: drafted tokens per round")
    parser.add_argument("--requests", type=int, default=64, help="scoring: (context, continuation) pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--diffusion-only", action="store_true", help="only the diffusion table (needs --folder)")
    parser.add_argument("--diffusion-prompts", type=int, default=5, help="diffusion: prompts from --prompt-data")
    parser.add_argument("--prompt-data", help="diffusion: uint16 token file (default: FOLDER/../data/valid.tokens)")
    parser.add_argument("--steps", default="8,16,32,64", help="diffusion: step counts")
    parser.add_argument("--block-lengths", default="8", help="diffusion: block lengths of the cached sampler")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.5,0.9", help="diffusion: confidence thresholds")
    parser.add_argument("--uncached-blocks", action="store_true", help="diffusion: also the uncached block sampler")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"prompt {args.prompt} tokens, {args.new} new tokens, batch 1, float32"
    )
    if args.diffusion_only:
        print_diffusion_table(*diffusion_rates(args))
        return
    rate = decode_rates(args)
    for name, r in rate.items():
        print(f"  preset {args.preset} {name:<28} {r:8.1f} tokens/s")
    print(f"ratio ours causal / transformers Llama: {rate['ours causal'] / rate['transformers Llama causal']:.3f}")
    print(f"ratio prefix / causal:                  {rate['ours prefix'] / rate['ours causal']:.3f}")
    if Path(args.folder).is_dir():
        trained, acceptance = trained_rates(args)
        for name, r in trained.items():
            print(f"  {args.folder} {name:<22} {r:8.1f} tokens/s  ({r / trained['causal']:.2f}x causal)")
        print(f"speculative acceptance rate: {acceptance:.1%} (k={args.k}, greedy)")
        print_diffusion_table(*diffusion_rates(args))
    else:
        print(f"(no trained folder at {args.folder}: run `make demo` for the speculative and diffusion rows)")
    batched, alone = scoring_ratio(args)
    print(f"scoring: batched {batched:.1f} requests/s, one at a time {alone:.1f} requests/s")
    print(f"ratio batched / one at a time:          {batched / alone:.2f}  (target >= 3)")


if __name__ == "__main__":
    main()
