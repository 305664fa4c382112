"""A ``dual-lm serve`` process on a free loopback port for the serving tests, and the tiny model folder it serves."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_folder(out: Path, tokenizer_json: Path) -> Path:
    """A peaked tiny model (vocab 51,200, so it reads the reference tokenizer) saved as a model folder."""
    import torch

    from dual_lm.config import PRESETS, llama_config
    from dual_lm.folder import save_folder
    from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM

    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(dataclasses.replace(PRESETS["tiny"], vocab_size=51200))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.output.weight.mul_(30)  # peaked: drafts meet both acceptances and rejections
    return Path(save_folder(model, out, tokenizer_json))


@dataclasses.dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path  # the server's stderr and access log

    def rss_kib(self) -> int:
        """The server process's resident memory (KiB), from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status)[1])


@contextlib.contextmanager
def serving(folder: Path, *extra: str, timeout: float = 120.0):
    """Start ``dual-lm serve FOLDER --port 0`` (one torch thread), yield a ``Served`` once it answers, stop it
    after. Its stderr goes to a log in the temporary folder, removed afterwards unless the block failed."""
    log = Path(tempfile.gettempdir()) / f"dual-lm-serve-{os.getpid()}-{time.monotonic_ns()}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as err:
        command = [sys.executable, "-m", "dual_lm", "serve", str(folder), "--port", "0", *extra]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env, cwd=REPO)
    try:
        line = process.stdout.readline().decode()  # "dual-lm serve: NAME at http://127.0.0.1:PORT ..." once it listens
        match = re.search(r"at (http://\S+)", line)
        if not match:
            process.wait(timeout=timeout)
            raise RuntimeError(f"the server did not start: {line!r}\n{log.read_text()}")
        log_out = open(log, "ab")  # noqa: SIM115 (the thread writes uvicorn's access log there until the server ends)
        threading.Thread(target=shutil.copyfileobj, args=(process.stdout, log_out), daemon=True).start()
        served = Served(match[1], process, log)  # a full stdout pipe would block the server: it is drained
        _wait_healthy(served, timeout)
        yield served
    except BaseException:
        print(f"the server's log is kept: {log}", file=sys.stderr)
        raise
    else:
        log.unlink(missing_ok=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(served: Served, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(served.url + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            if served.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health:\n{served.log.read_text()}") from None
            time.sleep(0.1)
