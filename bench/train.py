"""Training-step throughput: our Trainer (AR-only, MD-only, dual) vs a plain transformers Llama + AdamW loop.

One optimiser step (the global batch) of ``dual_lm.train.Trainer.train_step`` at objective.alpha
= 1 (AR only), 0 (MD only) and 63/64 (the default dual mix), against transformers'
``LlamaForCausalLM`` of the same dimensions (plain lm_head, no document masking) trained with
``torch.optim.AdamW(lr=1e-3)`` on rows of the same packed loader. All contenders are measured in
this one run, interleaved by rounds, medians reported. Usage:

    .venv/bin/python bench/train.py [--steps 8] [--seq-len 256] [--micro-batch-rows 8] [--compile]
    python3 bench/train.py --device cuda --dtype bfloat16 --preset 470m --shape '' --seq-len 2048 ...

Data: a tokenizer trained on the embedded corpus (corpus:shakespeare, --vocab) or --tokenizer,
and a prepare-data folder in a temporary directory. Default model: preset ``small`` with
6 x 384 (6 heads of 64, MLP 1024), about 10.8M non-embedding parameters.

MFU = achieved FLOP/s / peak FLOP/s, achieved = tokens/s x FLOPs per token, with

    FLOPs/token = 6 x (N_trunk + f x N_head) + 12 x layers x seq_len x (heads x head_dim)

N_trunk: non-embedding trunk parameters (attention + MLP matrices, norm gains); N_head: the
matrices evaluated per head position (ours: H x H projection + H x V output layer; the peer: its
H x V lm_head); f: head positions per token actually evaluated (ours runs the head only at
target positions: 1 for AR rows, about 1/2 on average for MD rows, counted from the objective's
own target statistics; the peer: 1). The attention term counts the full L x L score matrix in
forward and backward (PaLM convention) for causal and bidirectional rows alike. The embedding
lookup, norms, softmax, loss and optimiser are not counted. The peak is measured here: the best of
a few large torch.matmul calls in the compute dtype (--peak-flops adds a nominal peak, e.g.
989e12 for H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext, suppress
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from dual_lm.config import llama_config, load_train_config, parameter_counts
from dual_lm.corpus import expand_sources, iter_documents
from dual_lm.data import PackedLoader, TokenShards
from dual_lm.dist import DistInfo
from dual_lm.prepare import PrepareRequest, prepare_data
from dual_lm.tokenizer import save_tokenizer, train_tokenizer
from dual_lm.train import Trainer

PEER = "transformers Llama + AdamW"
DEFAULT_SHAPE = "num_layers=6,hidden_size=384,num_heads=6,head_dim=64,intermediate_size=1024"


def build_data(args, tmp: Path) -> Path:
    """A prepare-data folder of corpus:shakespeare (tokenizer trained here unless --tokenizer)."""
    if args.data:
        return Path(args.data)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(tmp / "tokenizer.json")
        texts = iter_documents(expand_sources(["corpus:shakespeare"]))
        save_tokenizer(train_tokenizer(texts, args.vocab), tokenizer)
    out = tmp / "data"
    prepare_data(PrepareRequest(tokenizer, ("corpus:shakespeare",), str(out), valid_tokens=20000, num_shards=1))
    return out


class PeakProbe:
    """Best FLOP/s of square matmuls of ``size`` in ``dtype``; probed once per round, like a contender."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int, sync):
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.size, self.sync, self.best = size, sync, 0.0
        self.a @ self.b  # warm-up
        sync()

    def run(self, reps: int = 3) -> None:
        for _ in range(reps):
            start = time.perf_counter()
            self.a @ self.b
            self.sync()
            self.best = max(self.best, 2 * self.size**3 / (time.perf_counter() - start))


def head_fraction(trainer: Trainer) -> float:
    """Head positions evaluated per token over the steps so far (from the objective's own target counts)."""
    p = trainer.pending
    steps = p.get("steps", 0.0)
    if not steps:
        return 1.0
    return (p.get("ar_targets", 0.0) + p.get("md_targets", 0.0)) / (steps * trainer.plan.tokens_per_step)


class Memory:
    """Peak memory during one contender's steps: CUDA max_memory_allocated, else the process's VmHWM."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        with suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> float:
        """Bytes."""
        if self.cuda:
            return float(torch.cuda.max_memory_allocated())
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class Contender:
    """A named step function, the head matrices it evaluates per head position and f (head positions per token)."""

    def __init__(self, name: str, step, head_params: int, fraction, tolerant: bool = False):
        self.name, self.step, self.head_params, self.fraction, self.tolerant = (
            name,
            step,
            head_params,
            fraction,
            tolerant,
        )
        self.times: list[float] = []
        self.first: list[float] = []  # warm-up step times (compile time shows here)
        self.memory = 0.0
        self.failed: str | None = None


def run_steps(c: Contender, count: int, sync, memory: Memory, record: list[float]) -> None:
    if c.failed:
        return
    memory.reset()
    try:
        for _ in range(count):
            sync()
            start = time.perf_counter()
            c.step()
            sync()
            record.append(time.perf_counter() - start)
    except Exception as err:  # a failed contender (compile, out of memory) must not sink the others
        if not c.tolerant and not isinstance(err, torch.OutOfMemoryError):
            raise
        traceback.print_exc(file=sys.stderr)
        c.failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    c.memory = max(c.memory, memory.peak())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--shape", default=DEFAULT_SHAPE, help="model overrides k=v,k=v ('' = the bare preset)")
    parser.add_argument("--vocab", type=int, default=8192, help="size of the tokenizer trained on the corpus")
    parser.add_argument("--tokenizer", help="use this tokenizer JSON instead of training one")
    parser.add_argument("--data", help="use this prepare-data folder instead of building one")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-rows", type=int, default=8)
    parser.add_argument("--global-batch-tokens", type=int, help="default: one micro-batch per step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contender")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds the timed steps are split into")
    parser.add_argument("--compile", action="store_true", help="also time ours (dual) with train.compile=true")
    parser.add_argument("--compile-warmup", type=int, default=3, help="warm-up steps of the compiled contender")
    parser.add_argument("--only", default="ar,md,dual,peer", help="contenders (ar, md, dual, peer)")
    parser.add_argument("--set", action="append", default=[], help="extra Trainer override key=value")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--matmul-size", type=int, help="peak probe size (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--peak-flops", type=float, help="nominal peak FLOP/s for a second MFU (H100 bf16: 989e12)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, seq_len = args.micro_batch_rows, args.seq_len
    global_tokens = args.global_batch_tokens or rows * seq_len
    accumulation = global_tokens // (rows * seq_len)
    memory = Memory(device)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        data = build_data(args, tmp)
        data_seconds = time.perf_counter() - started
        vocab = TokenShards(data).manifest["vocab_size"]

        shape_overrides = [f"model.{kv.strip()}" for kv in args.shape.split(",") if kv.strip()]
        base = [
            f"data.path={data}",
            f"data.seq_len={seq_len}",
            f"train.micro_batch_rows={rows}",
            f"train.global_batch_tokens={global_tokens}",
            "train.steps=1000000",  # the schedule stays in its stable phase
            f"train.dtype={args.dtype}",
            f"model.preset={args.preset}",
            *shape_overrides,
            *args.set,
        ]
        info = DistInfo(device=device)
        trainers: dict[str, Trainer] = {}

        def make(name: str, extra: list[str]) -> Trainer:
            cfg = load_train_config(None, [*base, f"output={tmp / name}", *extra])
            trainers[name] = Trainer(cfg, info)
            return trainers[name]

        shape = load_train_config(None, base).model.shape(vocab, max(seq_len, 2048))
        counts = parameter_counts(shape)
        h, v = shape.hidden_size, shape.vocab_size
        n_head_ours, n_head_peer = h * h + h * v, h * v
        n_trunk = counts["non_embedding"] - h * h  # non-embedding minus our head projection
        attention = 12 * shape.num_layers * seq_len * shape.num_heads * shape.head_dim

        contenders: list[Contender] = []
        for name, label, alpha in (
            ("ar", "ours AR-only (alpha=1)", 1),
            ("md", "ours MD-only (alpha=0)", 0),
            ("dual", "ours dual (alpha=63/64)", None),
        ):
            if name in wanted:
                trainer = make(name, [] if alpha is None else [f"objective.alpha={alpha}"])
                contenders.append(Contender(label, trainer.train_step, n_head_ours, partial(head_fraction, trainer)))
        if args.compile:
            try:
                trainer = make("compiled", ["train.compile=true"])
                fraction = partial(head_fraction, trainer)
                contenders.append(Contender("ours dual compiled", trainer.train_step, n_head_ours, fraction, True))
            except Exception as err:  # reported, not raised
                traceback.print_exc(file=sys.stderr)
                contenders.append(Contender("ours dual compiled", None, n_head_ours, lambda: 1.0))
                contenders[-1].failed = f"{type(err).__name__}: {err}"[:300]

        peer = peer_opt = None
        if "peer" in wanted:
            torch.manual_seed(0)
            peer = LlamaForCausalLM(llama_config(shape)).to(device).train()
            peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3)
            loader = PackedLoader(TokenShards(data), seq_len, rows, seed=0)
            autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

            def peer_step() -> float:
                total = 0.0
                for _ in range(accumulation):
                    ids = loader.next_batch().inputs.to(device)
                    with autocast:
                        loss = peer(input_ids=ids, labels=ids, use_cache=False).loss
                    (loss / accumulation).backward()
                    total += float(loss.detach()) / accumulation
                peer_opt.step()
                peer_opt.zero_grad(set_to_none=True)
                return total

            contenders.append(Contender(PEER, peer_step, n_head_peer, lambda: 1.0))

        size = args.matmul_size or (8192 if cuda else 2048)
        probe = PeakProbe(device, dtype, size, sync)
        probe.run()

        for c in contenders:
            run_steps(c, args.compile_warmup if c.tolerant else args.warmup, sync, memory, c.first)
        per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
        for count in per_round:
            for c in contenders:
                run_steps(c, count, sync, memory, c.times)
            probe.run()
        peak = probe.best
        del probe

        # the optimiser step alone, with synthetic gradients (after the timed rounds: it moves the weights)
        opt_times = {}
        ours = next(iter(trainers.values()), None)
        for label, model, opt in (
            ("ours Muon+AdamW", ours and ours.model, ours and ours.optimizer),
            ("peer torch AdamW", peer, peer_opt),
        ):
            if model is None:
                continue
            samples = []
            for _ in range(4):
                for p in model.parameters():
                    p.grad = torch.randn_like(p) * 1e-3
                sync()
                start = time.perf_counter()
                opt.step()
                sync()
                samples.append(time.perf_counter() - start)
                opt.zero_grad(set_to_none=True)
            opt_times[label] = statistics.median(samples[1:])

    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name(device) if cuda else f"{cpu}, {torch.get_num_threads()} threads"
    print(
        f"model: preset {args.preset}" + (f" + {args.shape}" if args.shape else "") + f", vocab {vocab}; "
        f"{counts['non_embedding'] / 1e6:.2f}M non-embedding params (trunk {n_trunk / 1e6:.2f}M + head projection "
        f"{h * h / 1e6:.2f}M), embedding {v * h / 1e6:.2f}M, output layer {(v * h + v) / 1e6:.2f}M"
    )
    print(
        f"batch: {rows} rows x {seq_len} tokens x {accumulation} micro-batch(es) = {global_tokens} tokens/step; "
        f"{args.dtype} on {where}; torch {torch.__version__}; warm-up {args.warmup}, timed {args.steps} steps "
        f"in {args.rounds} rounds; data+tokenizer {data_seconds:.1f}s"
    )
    print(
        f"measured peak: {args.dtype} torch.matmul {size}^3, best of {3 * (args.rounds + 1)} "
        f"(3 before the rounds, 3 after each): {peak / 1e9:,.1f} GFLOP/s"
    )
    if args.peak_flops:
        print(f"nominal peak: {args.peak_flops / 1e12:,.1f} TFLOP/s")
    print(
        "FLOPs/token = 6 x (N_trunk + f x N_head) + 12 x layers x seq_len x attn_dim; "
        f"N_trunk {n_trunk:,}, N_head ours {n_head_ours:,} (proj + output), peer {n_head_peer:,}, "
        f"attention {attention:,}; f = head positions per token"
    )
    mem_label = "peak CUDA alloc" if cuda else "peak RSS"
    header = f"  {'contender':<28} {'step ms':>9} {'tokens/s':>10} {'f':>5} {'GFLOP/tok':>9} {'GFLOP/s':>9} {'MFU':>6}"
    if args.peak_flops:
        header += f" {'MFU nom':>7}"
    print(header + f" {mem_label:>15}  warm-up step s")
    rate: dict[str, float] = {}
    step_ms: dict[str, float] = {}
    for c in contenders:
        if c.failed or not c.times:
            print(f"  {c.name:<28} failed: {c.failed}")
            continue
        median = statistics.median(c.times)
        rate[c.name] = global_tokens / median
        step_ms[c.name] = median * 1e3
        fraction = c.fraction()
        flops = 6 * (n_trunk + fraction * c.head_params) + attention
        achieved = rate[c.name] * flops
        line = (
            f"  {c.name:<28} {median * 1e3:>9.1f} {rate[c.name]:>10,.0f} {fraction:>5.2f} {flops / 1e9:>9.4f} "
            f"{achieved / 1e9:>9.1f} {achieved / peak:>6.1%}"
        )
        if args.peak_flops:
            line += f" {achieved / args.peak_flops:>7.1%}"
        warm = ", ".join(f"{t:.1f}" for t in c.first)
        print(line + f" {c.memory / 2**20:>11,.0f} MiB  {warm}")
    print(f"process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    for label, seconds in opt_times.items():
        print(f"optimiser step alone ({label}, synthetic grads): {seconds * 1e3:.1f} ms")

    peer_name = PEER

    def ratio(text: str, a: str, b: str, target: str, invert: bool = False) -> None:
        if a in rate and b in rate:
            value = step_ms[a] / step_ms[b] if invert else rate[a] / rate[b]
            print(f"{text:<44} {value:.3f}  ({target})")
        else:
            failed = [f"{c.name} failed: {c.failed}" for c in contenders if c.name in (a, b) and c.failed]
            print(f"{text:<44} n/a" + (f"  ({'; '.join(failed)})" if failed else ""))

    ratio("ratio ours dual / peer (tokens/s):", "ours dual (alpha=63/64)", peer_name, "target >= 1.0")
    ratio("ratio ours AR-only / peer (tokens/s):", "ours AR-only (alpha=1)", peer_name, "no target")
    ratio(
        "MD-only step time / AR-only step time:",
        "ours MD-only (alpha=0)",
        "ours AR-only (alpha=1)",
        "target <= 1.0",
        invert=True,
    )
    if args.compile:
        ratio("ratio ours dual compiled / peer (tokens/s):", "ours dual compiled", peer_name, "target >= 1.25")
        ratio(
            "ratio ours dual compiled / eager (tokens/s):", "ours dual compiled", "ours dual (alpha=63/64)", "no target"
        )


if __name__ == "__main__":
    main()
