"""Forward throughput: DLMLlamaForCausalLM vs transformers' LlamaForCausalLM, and our modes vs causal.

Prints tokens/s for each (median call) and the ratios, all measured in this one run. The calls are
interleaved: each of ``rounds x repeats`` cycles times one call of every contender in turn, so drift
on a shared machine hits every contender alike, and each ratio is the median of its per-cycle ratios
(two calls a few seconds apart), which load that comes and goes cannot tilt. Prefix mode runs
twice: its mask-free kernels (the default for one shared prefix length) and the dense-mask path
they replace (``split_prefix_attention = False``, what every prefix call took before). Usage:

    .venv/bin/python bench/forward.py [--preset small] [--batch 4] [--length 512] [--repeats 7] [--threads N]
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


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(fast: list[float], slow: list[float]) -> float:
    """Median over cycles of slow time / fast time: fast's throughput relative to slow's."""
    return statistics.median(s / f for f, s in zip(fast, slow, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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

    def dense_prefix():
        ours.split_prefix_attention = False
        try:
            return run(ours, prefix_lengths=prefix)()
        finally:
            ours.split_prefix_attention = True

    contenders = {
        "transformers LlamaForCausalLM (causal)": run(peer),
        "DLMLlamaForCausalLM causal": run(ours),
        "DLMLlamaForCausalLM prefix": run(ours, prefix_lengths=prefix),
        "DLMLlamaForCausalLM prefix (dense mask)": dense_prefix,
        "DLMLlamaForCausalLM bidirectional": run(ours, attention_mode="bidirectional"),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up
        for _ in range(args.rounds * args.repeats):
            for name, fn in contenders.items():
                times[name].append(once(fn))
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
    causal = times["DLMLlamaForCausalLM causal"]
    ratios = [
        (
            "ours causal / transformers Llama",
            "DLMLlamaForCausalLM causal",
            "transformers LlamaForCausalLM (causal)",
            0.95,
        ),
        ("prefix / causal", "DLMLlamaForCausalLM prefix", None, 0.97),
        ("prefix (dense mask) / causal", "DLMLlamaForCausalLM prefix (dense mask)", None, None),
        ("bidirectional / causal", "DLMLlamaForCausalLM bidirectional", None, 0.95),
    ]
    for label, name, against, target in ratios:
        value = paired(times[name], times[against] if against else causal)
        note = f"  (target >= {target})" if target else "  (the path every prefix call took before)"
        print(f"ratio {label + ':':<34} {value:.3f}{note}")


if __name__ == "__main__":
    main()
