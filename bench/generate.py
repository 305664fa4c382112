"""Generation and scoring speed, each as a ratio against a peer measured in this one run.

1. causal decode tokens/s: DLMLlamaForCausalLM.generate over transformers' LlamaForCausalLM.generate
   at the same dimensions (random weights, greedy, a fixed number of new tokens; target >= 0.95);
2. prefix-mode decode over causal decode (target >= 0.95);
3. self-speculative decoding over causal decode, with its acceptance rate (needs a trained model:
   ``--folder``, by default the one ``make demo`` writes);
4. diffusion tokens/s at several step counts next to causal decode (same folder);
5. batched scoring over a one-request-at-a-time loop (target >= 3x).

Usage:  .venv/bin/python bench/generate.py [--folder runs/demo/alpha_0.750_n-reps=1] [--preset small]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

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
    for steps in (8, 16, 32, 64):
        cfg = DiffusionConfig(steps=steps, stop_at_eos=False)
        rates[f"diffusion {steps} steps"] = args.new / best_of(
            lambda cfg=cfg: diffusion_generate(model, ids[0], args.new, cfg), args.repeats
        )
    return rates, holder["result"].acceptance_rate


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
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"prompt {args.prompt} tokens, {args.new} new tokens, batch 1, float32"
    )
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
    else:
        print(f"(no trained folder at {args.folder}: run `make demo` for the speculative and diffusion rows)")
    batched, alone = scoring_ratio(args)
    print(f"scoring: batched {batched:.1f} requests/s, one at a time {alone:.1f} requests/s")
    print(f"ratio batched / one at a time:          {batched / alone:.2f}  (target >= 3)")


if __name__ == "__main__":
    main()
