"""Training-step throughput: our Trainer (AR-only, MD-only, dual) vs a plain transformers Llama + AdamW loop.

One optimiser step (the global batch) of ``dual_lm.training.train.Trainer.train_step`` at objective.alpha
= 1 (AR only), 0 (MD only) and 63/64 (the default dual mix), against transformers'
``LlamaForCausalLM`` of the same dimensions (plain lm_head, no document masking) trained with
``torch.optim.AdamW(lr=1e-3)`` on rows of the same packed loader. All contenders are measured in
this one run, interleaved by rounds, medians reported. Usage:

    .venv/bin/python bench/train.py [--steps 8] [--seq-len 256] [--micro-batch-rows 8] [--compile] [--checkpointing]
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
lookup, norms, softmax, loss and optimiser are not counted (the optimiser's time is shown apart:
each contender's optimizer.step() is timed inside its steps). The peak is measured here: the best
of a few large torch.matmul calls in the compute dtype (--peak-flops adds a nominal peak, e.g.
989e12 for H100 SXM dense bf16). Memory: the process's peak RSS (ru_maxrss) and, per contender,
the RSS peak during its steps (CPU) or torch.cuda.max_memory_allocated (CUDA), and that peak's excess
over what was held when its steps began ("above start": activations, gradients and workspace, the
memory activation checkpointing saves; --checkpointing adds ours with train.activation_checkpointing).
"""

from __future__ import annotations

import argparse
import json
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
from dual_lm.data.corpus import expand_sources, iter_documents
from dual_lm.data.loader import PackedLoader, TokenShards
from dual_lm.data.prepare import PrepareRequest, prepare_data
from dual_lm.tokenizer import save_tokenizer, train_tokenizer
from dual_lm.training.dist import DistInfo
from dual_lm.training.train import Trainer

AR, MD, DUAL, COMPILED, CHECKPOINTED = (
    "ours AR-only (alpha=1)",
    "ours MD-only (alpha=0)",
    "ours dual (alpha=63/64)",
    "ours dual compiled",
    "ours dual, act. checkpointing",
)
PEER = "transformers Llama + AdamW"
DEFAULT_SHAPE = "num_layers=6,hidden_size=384,num_heads=6,head_dim=64,intermediate_size=1024"


def build_data(args, tmp: Path) -> tuple[Path, str]:
    """A prepare-data folder of corpus:shakespeare (tokenizer trained here unless --tokenizer) and a note.

    The corpus holds fewer BPE merges than 51,200 (a trained tokenizer stops near 44,800), so a
    trained tokenizer's vocabulary is padded to --vocab in the manifest of this temporary folder:
    the model then has the requested embedding and output-layer size (the extra rows never occur).
    """
    if args.data:
        return Path(args.data), ""
    tokenizer, note = args.tokenizer, ""
    if tokenizer is None:
        tokenizer = str(tmp / "tokenizer.json")
        texts = iter_documents(expand_sources(["corpus:shakespeare"]))
        trained = train_tokenizer(texts, args.vocab)
        save_tokenizer(trained, tokenizer)
        note = f"tokenizer trained on corpus:shakespeare, {trained.get_vocab_size()} tokens"
    out = tmp / "data"
    manifest = prepare_data(
        PrepareRequest(tokenizer, ("corpus:shakespeare",), str(out), valid_tokens=20000, num_shards=1)
    )
    if args.tokenizer is None and manifest["vocab_size"] < args.vocab:
        manifest["vocab_size"] = args.vocab
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        note += f" (model vocabulary padded to {args.vocab})"
    return out, note or f"tokenizer {args.tokenizer}"


class PeakProbe:
    """Best FLOP/s of square matmuls of ``size`` in ``dtype``; probed once per round, like a contender."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int):
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.size, self.best = size, 0.0
        self.a @ self.b  # warm-up
        sync()

    def run(self, reps: int = 3) -> None:
        for _ in range(reps):
            start = time.perf_counter()
            self.a @ self.b
            sync()
            self.best = max(self.best, 2 * self.size**3 / (time.perf_counter() - start))


def head_fraction(trainer: Trainer) -> float:
    """Head positions evaluated per token over the steps so far (from the objective's own target counts)."""
    p = trainer.pending
    steps = p.get("steps", 0.0)
    if not steps:
        return 1.0
    return (p.get("ar_targets", 0.0) + p.get("md_targets", 0.0)) / (steps * trainer.plan.tokens_per_step)


class Memory:
    """Peak memory during one contender's steps: CUDA max_memory_allocated, else the process's VmHWM.

    On Linux the resident-set peak is reset before each contender's steps (/proc/self/clear_refs),
    which also resets what ru_maxrss reports, so the process-wide peak is kept here (``overall``).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.overall = rss_peak()
        self.base = 0.0  # what was held when the peak was reset: the peak's excess is the steps' own memory

    def reset(self) -> None:
        self.overall = max(self.overall, rss_peak())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = float(torch.cuda.memory_allocated())
            return
        with suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        self.base = rss_now()

    def peak(self) -> float:
        """Bytes."""
        self.overall = max(self.overall, rss_peak())
        return float(torch.cuda.max_memory_allocated()) if self.cuda else rss_peak()


def rss_now() -> float:
    """Resident set size now, in bytes (Linux /proc/self/statm; 0 where it is absent)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_peak() -> float:
    """Peak resident set size in bytes: ru_maxrss (which Linux reads from the same high-water mark as VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class Contender:
    """A named step function, the head matrices it evaluates per head position and f (head positions per token)."""

    def __init__(self, name: str, step, head_params: int, fraction, optimizer=None, tolerant: bool = False):
        self.name, self.step, self.head_params, self.fraction = name, step, head_params, fraction
        self.tolerant = tolerant  # compile may fail: report it instead of raising
        self.times: list[float] = []  # timed steps
        self.first: list[float] = []  # warm-up steps (compilation shows here)
        self.opt_times: list[float] = []  # the optimizer.step() inside each timed step
        self.opt_log: list[float] = []
        self.memory = 0.0
        self.excess = 0.0  # peak memory above what was held before its steps (activations, gradients, workspace)
        self.failed: str | None = None
        if optimizer is not None:
            inner = optimizer.step

            def timed_step(*args, **kwargs):
                sync()
                start = time.perf_counter()
                out = inner(*args, **kwargs)
                sync()
                self.opt_log.append(time.perf_counter() - start)
                return out

            optimizer.step = timed_step


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_steps(c: Contender, count: int, memory: Memory, timed: bool) -> None:
    if c.failed:
        return
    memory.reset()
    try:
        for _ in range(count):
            c.opt_log.clear()
            sync()
            start = time.perf_counter()
            c.step()
            sync()
            (c.times if timed else c.first).append(time.perf_counter() - start)
            if timed:
                c.opt_times.append(sum(c.opt_log))
    except Exception as err:  # a failed contender (compile, out of memory) must not sink the others
        if not c.tolerant and not isinstance(err, torch.OutOfMemoryError):
            raise
        traceback.print_exc(file=sys.stderr)
        text = str(err).strip()
        c.failed = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    c.memory = max(c.memory, memory.peak())
    c.excess = max(c.excess, c.memory - memory.base)


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
    parser.add_argument(
        "--checkpointing", action="store_true", help="also time ours (dual) with train.activation_checkpointing=true"
    )
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
    rows, seq_len = args.micro_batch_rows, args.seq_len
    global_tokens = args.global_batch_tokens or rows * seq_len
    accumulation = global_tokens // (rows * seq_len)
    memory = Memory(device)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        data, data_note = build_data(args, tmp)
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
        build_seconds: dict[str, float] = {}
        trainers: dict[str, Trainer] = {}

        def make(name: str, extra: list[str]) -> Trainer:
            cfg = load_train_config(None, [*base, f"output={tmp / name}", *extra])
            start = time.perf_counter()
            trainers[name] = Trainer(cfg, info)
            build_seconds[name] = time.perf_counter() - start
            return trainers[name]

        shape = load_train_config(None, base).model.shape(vocab, max(seq_len, 2048))
        h, v = shape.hidden_size, shape.vocab_size
        n_head_ours, n_head_peer = h * h + h * v, h * v  # matrices run per head position

        contenders: list[Contender] = []
        for name, label, alpha in (("ar", AR, 1), ("md", MD, 0), ("dual", DUAL, None)):
            if name in wanted:
                trainer = make(name, [] if alpha is None else [f"objective.alpha={alpha}"])
                fraction = partial(head_fraction, trainer)
                contenders.append(Contender(label, trainer.train_step, n_head_ours, fraction, trainer.optimizer))
        if args.checkpointing:
            trainer = make("checkpointed", ["train.activation_checkpointing=true"])
            fraction = partial(head_fraction, trainer)
            contenders.append(Contender(CHECKPOINTED, trainer.train_step, n_head_ours, fraction, trainer.optimizer))
        if args.compile:
            try:
                trainer = make("compiled", ["train.compile=true"])
                fraction = partial(head_fraction, trainer)
                contenders.append(
                    Contender(COMPILED, trainer.train_step, n_head_ours, fraction, trainer.optimizer, True)
                )
            except Exception as err:  # reported, not raised
                traceback.print_exc(file=sys.stderr)
                contenders.append(Contender(COMPILED, None, n_head_ours, lambda: 1.0))
                contenders[-1].failed = f"{type(err).__name__}: {err}"[:300]

        peer = peer_opt = None
        if "peer" in wanted:
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.device(device):  # as the Trainer builds ours
                peer = LlamaForCausalLM(llama_config(shape)).to(device).train()
            build_seconds["peer"] = time.perf_counter() - start
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

            contenders.append(Contender(PEER, peer_step, n_head_peer, lambda: 1.0, peer_opt))

        size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
        probe = PeakProbe(device, dtype, size)
        probe.run()

        for c in contenders:
            run_steps(c, args.compile_warmup if c.tolerant else args.warmup, memory, timed=False)
        per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
        for count in per_round:
            for c in contenders:
                run_steps(c, count, memory, timed=True)
            probe.run()
        peak = probe.best
        memory.peak()
        del probe

    setup = {"data": f"{data_note}, {data_seconds:.1f} s", "builds": build_seconds}
    report(args, contenders, memory, peak, size, shape, global_tokens, setup)


def report(args, contenders, memory, peak, size, shape, global_tokens, setup: dict) -> None:
    accumulation = global_tokens // (args.micro_batch_rows * args.seq_len)
    cuda = args.device.startswith("cuda")
    counts = parameter_counts(shape)
    h, v = shape.hidden_size, shape.vocab_size
    n_trunk = counts["non_embedding"] - h * h
    attention = 12 * shape.num_layers * args.seq_len * shape.num_heads * shape.head_dim
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if cuda else f"{cpu} CPU, {torch.get_num_threads()} threads"
    print(
        f"model: preset {args.preset}" + (f" + {args.shape}" if args.shape else "") + f", vocab {v}; "
        f"{counts['non_embedding'] / 1e6:.2f}M non-embedding params (trunk {n_trunk / 1e6:.2f}M + head projection "
        f"{h * h / 1e6:.2f}M), embedding {v * h / 1e6:.2f}M, output layer {(v * h + v) / 1e6:.2f}M"
    )
    print(
        f"batch: {args.micro_batch_rows} rows x {args.seq_len} tokens x {accumulation} micro-batch(es) = "
        f"{global_tokens} tokens/step; {args.dtype} on {where}; torch {torch.__version__}; warm-up {args.warmup}, "
        f"timed {args.steps} steps in {args.rounds} interleaved rounds"
    )
    builds = ", ".join(f"{name} {seconds:.1f}" for name, seconds in setup["builds"].items())
    print(f"setup: {setup['data']}; model builds (on the device) s: {builds}")
    print(
        f"measured peak: {args.dtype} torch.matmul {size}^3, best of {3 * (args.rounds + 1)} "
        f"(3 before the rounds, 3 after each): {peak / 1e9:,.1f} GFLOP/s"
        + (f"; nominal peak {args.peak_flops / 1e12:,.1f} TFLOP/s" if args.peak_flops else "")
    )
    print(
        "MFU = tokens/s x FLOPs/token / peak, FLOPs/token = 6 x (N_trunk + f x N_head) + 12 x layers x seq_len x "
        f"attn_dim with N_trunk {n_trunk:,}, N_head {h * h + h * v:,} (ours: projection + output layer) or "
        f"{h * v:,} (peer: lm_head), attention term {attention:,}; f = head positions evaluated per token"
    )
    mem_label = "peak CUDA alloc" if cuda else "process RSS peak"
    header = f"  {'contender':<28} {'step ms':>9} {'optim ms':>8} {'tokens/s':>10} {'f':>5} {'GFLOP/tok':>9}"
    header += f" {'GFLOP/s':>9} {'MFU':>6}" + (f" {'MFU nom':>7}" if args.peak_flops else "")
    print(header + f" {mem_label:>15} {'above start':>11}  warm-up steps s")
    rate, step_ms, opt_ms = {}, {}, {}
    for c in contenders:
        if c.failed or not c.times:
            print(f"  {c.name:<28} failed: {c.failed}")
            continue
        step_ms[c.name] = statistics.median(c.times) * 1e3
        opt_ms[c.name] = statistics.median(c.opt_times) * 1e3
        rate[c.name] = global_tokens / step_ms[c.name] * 1e3
        fraction = c.fraction()
        flops = 6 * (n_trunk + fraction * c.head_params) + attention
        achieved = rate[c.name] * flops
        line = f"  {c.name:<28} {step_ms[c.name]:>9.1f} {opt_ms[c.name]:>8.1f} {rate[c.name]:>10,.0f}"
        line += f" {fraction:>5.2f} {flops / 1e9:>9.4f} {achieved / 1e9:>9.1f} {achieved / peak:>6.1%}"
        line += f" {achieved / args.peak_flops:>7.1%}" if args.peak_flops else ""
        line += f" {c.memory / 2**20:>11,.0f} MiB {c.excess / 2**20:>7,.0f} MiB  "
        print(line + ", ".join(f"{t:.1f}" for t in c.first))
    peak_rss = f"process peak RSS (ru_maxrss, whole run): {memory.overall / 2**20:,.0f} MiB"
    if cuda and contenders:
        peak_rss += (
            f"; CUDA max_memory_allocated, max over contenders: {max(c.memory for c in contenders) / 2**30:.2f} GiB"
        )
    print(peak_rss)

    def ratio(text: str, a: str, b: str, target: str, invert: bool = False) -> None:
        if a in rate and b in rate:
            value = step_ms[a] / step_ms[b] if invert else rate[a] / rate[b]
            print(f"{text:<46} {value:.3f}  ({target})")
        elif {a, b} <= {c.name for c in contenders}:
            failed = [f"{c.name} failed: {c.failed}" for c in contenders if c.name in (a, b) and c.failed]
            print(f"{text:<46} n/a" + (f"  ({'; '.join(failed)})" if failed else ""))

    ratio("ratio ours dual / peer (tokens/s):", DUAL, PEER, "target >= 1.0")
    ratio("ratio ours AR-only / peer (tokens/s):", AR, PEER, "no target")
    ratio("MD-only step time / AR-only step time:", MD, AR, "target <= 1.0", invert=True)
    if args.compile:
        ratio("ratio ours dual compiled / peer (tokens/s):", COMPILED, PEER, "target >= 1.25")
        ratio("ratio ours dual compiled / ours dual eager:", COMPILED, DUAL, "no target")
        compiled = next(c for c in contenders if c.name == COMPILED)
        if compiled.first and COMPILED in step_ms:
            print(
                f"compile: first compiled step {compiled.first[0]:.1f} s, i.e. about "
                f"{compiled.first[0] - step_ms[COMPILED] / 1e3:.1f} s of compilation"
            )
        elif compiled.failed:
            print(f"compile failed: {compiled.failed}")
    if args.checkpointing and CHECKPOINTED in step_ms and DUAL in step_ms:
        plain, recomputed = (next(c for c in contenders if c.name == n) for n in (DUAL, CHECKPOINTED))
        print(
            f"activation checkpointing / plain: step time {step_ms[CHECKPOINTED] / step_ms[DUAL]:.3f}, memory above "
            f"the start of the steps {recomputed.excess / max(plain.excess, 1.0):.3f} "
            f"({recomputed.excess / 2**20:,.0f} vs {plain.excess / 2**20:,.0f} MiB)"
        )
    for name in (DUAL, AR):
        if name in step_ms and PEER in step_ms:
            a, b = step_ms[name] - opt_ms[name], step_ms[PEER] - opt_ms[PEER]
            print(
                f"without optimizer.step (data + forward + backward): {name} {a:.1f} ms, peer {b:.1f} ms, "
                f"ratio ours/peer (tokens/s) {b / a:.3f}; optimizer.step {opt_ms[name]:.1f} ms vs {opt_ms[PEER]:.1f} ms"
            )
            break


if __name__ == "__main__":
    main()
