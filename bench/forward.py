"""Forward throughput: DLMLlamaForCausalLM vs transformers' LlamaForCausalLM, and our modes vs causal.

Prints tokens/s for each and the ratios, all measured in this one run, interleaved so that drift
on a shared machine hits every contender alike. Usage:

    .venv/bin/python bench/forward.py [--preset small] [--batch 4] [--length 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import LlamaForCausalLM

from dual_lm import DLMLlamaForCausalLM
from dual_lm.config import llama_config, preset


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    config = llama_config(preset(args.preset))
    ours = DLMLlamaForCausalLM(config).eval().to(device, dtype)
    peer = LlamaForCausalLM(config).eval().to(device, dtype)
    ids = torch.randint(16, config.vocab_size, (args.batch, args.length), device=device)
    prefix = torch.full((args.batch,), args.length // 2, device=device)

    def run(model, **kwargs):
        return lambda: (model(ids, use_cache=False, **kwargs), sync())

    contenders = {
        "transformers LlamaForCausalLM (causal)": run(peer),
        "DLMLlamaForCausalLM causal": run(ours),
        "DLMLlamaForCausalLM prefix": run(ours, prefix_lengths=prefix),
        "DLMLlamaForCausalLM bidirectional": run(ours, attention_mode="bidirectional"),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                times[name] += timed(fn, args.repeats)
    tokens = args.batch * args.length
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(
        f"preset {args.preset}, batch {args.batch} x {args.length} tokens, {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}"
    )
    for name, r in rate.items():
        print(f"  {name:<40} {r:>10,.0f} tokens/s")
    causal = rate["DLMLlamaForCausalLM causal"]
    print(
        f"ratio ours causal / transformers Llama: {causal / rate['transformers LlamaForCausalLM (causal)']:.3f}"
        "  (target >= 0.95)"
    )
    print(
        f"ratio prefix / causal:                  {rate['DLMLlamaForCausalLM prefix'] / causal:.3f}  (target >= 0.95)"
    )
    print(
        f"ratio bidirectional / causal:           {rate['DLMLlamaForCausalLM bidirectional'] / causal:.3f}"
        "  (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
