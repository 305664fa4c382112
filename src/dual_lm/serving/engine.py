"""The one thread that runs the model: requests queue here, and the causal and prefix ones that
arrive together run as one left-padded batch.

Each prompt of a request is a ``Job``. The engine takes the oldest waiting job and, when it is a
causal or prefix job, the waiting jobs that sample the same way (greedy, or the same temperature,
top-p and top-k) and fit beside it in the context, up to ``max_batch``, in arrival order. After an
idle spell it gathers the requests that arrive together (``_gather``). A batch is one
``model.generate`` call, as ``dual-lm generate --prompts`` makes (``generation.left_pad``): each row
stops at its own ``max_tokens``, ``</s>`` or stop string, or when its client goes away (a stopping
criterion per row), and the call ends when every row has. Speculative, diffusion and fill jobs, and
seeded sampling (whose draws must not depend on the other rows), run one at a time. Greedy rows are
exactly what they would be alone (tests/test_serve_load.py).

A batch is not joined once it runs: requests that arrive meanwhile wait for it to end (at most the
longest row's ``max_tokens`` steps) and form the next batch together. The oldest job always leads the
next batch, so no request waits behind more than the batches ahead of it when it came.

Events go back through ``Job.emit`` (called on this thread; the server hands them to its event
loop): ``{"index", "text", "event"?}`` while the job runs, then one with ``finish_reason``,
``usage`` and ``stats``, or one ``{"error": message}`` if the model failed.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from dual_lm.inference.diffusion import DiffusionConfig, diffusion_generate
from dual_lm.inference.generation import (
    check_sampling,
    continuation_text,
    encode_with_masks,
    fill_masks,
    left_pad,
)
from dual_lm.inference.sampling import check_room
from dual_lm.inference.speculative import check_options, speculative_generate
from dual_lm.serving.requests import ApiError, Completion, Fill
from dual_lm.serving.text import Continuation
from dual_lm.tokens import MASK_ID, PAD_ID

BATCHED = ("causal", "prefix")


@dataclass(eq=False)  # compared by identity: two jobs are never "equal"
class Job:
    """One prompt of a request (``kind`` "completion") or one fill request (``kind`` "fill")."""

    kind: str
    emit: Callable[[dict], None]
    index: int = 0
    request: Completion | None = None
    prompt_ids: list[int] = field(default_factory=list)
    continuation: Continuation | None = None
    fill: tuple[str, int] | None = None  # (text, top_k)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # its last event is sent

    def batch_key(self):
        """Jobs with equal keys may share a batch; None: this job runs alone."""
        r = self.request
        if self.kind != "completion" or r.mode not in BATCHED or (r.temperature > 0 and r.seed is not None):
            return None
        return (r.mode, 0.0, 1.0, 0) if r.temperature == 0 else (r.mode, r.temperature, r.top_p, r.top_k)


def sampling_options(request: Completion) -> dict:
    """``model.generate``'s sampling arguments for a causal or prefix request (``top_k=0``: no top-k)."""
    if request.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}


class _Rows(StoppingCriteria):
    """Feeds each row's newest token to its job and says which rows are finished (or abandoned)."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs = engine, jobs

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, newest, strict=True):
            if not job.continuation.done and not job.cancelled.is_set():
                self.engine.advance(job, [token])
                if job.continuation.done:  # its client gets the end now, not when the whole batch ends
                    self.engine.finish(job)
        return torch.tensor([j.continuation.done or j.cancelled.is_set() for j in self.jobs], device=input_ids.device)


class Engine:
    """Owns the model and its thread; ``submit`` checks a request and queues its jobs."""

    def __init__(self, model, tokenizer, max_batch: int = 32, gather_s: float = 0.01, gather_max_s: float = 0.05):
        self.model, self.tokenizer = model, tokenizer
        self.encoder = _copy(tokenizer)  # the request side's own copy: a Rust tokenizer is not shared across threads
        self.max_batch, self.gather_s, self.gather_max_s = max_batch, gather_s, gather_max_s
        self.anchor = tokenizer("a", add_special_tokens=False)["input_ids"]  # see _pieces
        self.context = model.config.max_position_embeddings
        self.arrivals: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []  # touched by the engine thread only
        self.batches: list[int] = []  # the size of every batch run (the load test reads it)
        self.thread = threading.Thread(target=self._loop, name="dual-lm-engine", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.arrivals.put(None)
        self.thread.join(timeout=30)

    # --- the request side (the server's event loop) -------------------------------------------------

    def completion_jobs(self, request: Completion, emit: Callable[[dict], None]) -> list[Job]:
        """The jobs of a checked request, each prompt checked against the context (``ApiError``)."""
        jobs = []
        for index, prompt in enumerate(request.prompts):
            ids = self.encoder(prompt)["input_ids"]
            self._check_room(request, len(ids))
            cont = Continuation(self.tokenizer, ids, request.max_tokens, request.stop)  # decodes on the engine thread
            jobs.append(Job("completion", emit, index, request, ids, cont))
        return jobs

    def fill_job(self, fill: Fill, emit: Callable[[dict], None]) -> Job:
        """The job of a checked fill request, its text checked against the context (``ApiError``)."""
        length = len(encode_with_masks(self.encoder, fill.text))
        if length > self.context:
            raise ApiError(f"text is {length} tokens, more than the model's context of {self.context}", "text")
        return Job("fill", emit, fill=(fill.text, fill.top_k))

    def _check_room(self, request: Completion, length: int) -> None:
        try:
            if request.mode == "speculative":
                o = request.options
                check_options(length, request.max_tokens, self.context, o["k"], request.temperature, o["draft"])
            else:
                check_room(length, request.max_tokens, self.context)
            if request.mode == "diffusion":
                _diffusion_config(request).validate(request.max_tokens)
            if request.mode in BATCHED:
                check_sampling(sampling_options(request))
        except ValueError as err:
            raise ApiError(str(err), "prompt" if "context" in str(err) else None) from None

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.arrivals.put(job)

    # --- the engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            if not self.waiting:
                job = self.arrivals.get()
                if job is None or not self._gather(job):
                    return
            elif not self._drain():
                return
            self.waiting = [j for j in self.waiting if not j.cancelled.is_set()]  # its client went away
            if self.waiting:
                self._next_round()

    def _next_round(self) -> None:
        """Run the next batch. Nothing may end this thread (every request would hang): a failure outside
        the model's own (which ``_run`` reports) fails the jobs it was taking."""
        batch = self.waiting[:1]
        try:
            batch = self._next_batch()
            self._run(batch)
        except Exception as err:
            self.waiting = [j for j in self.waiting if j not in batch]
            self._fail(batch, err)

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (``/health`` says 503 when it does not)."""
        return self.thread.is_alive()

    def _gather(self, first: Job) -> bool:
        """After an idle spell (``first`` ended it), take arrivals until none has come for ``gather_s``,
        ``max_batch`` jobs wait, or ``gather_max_s`` has passed; False once ``stop`` was called.

        Clients that start together reach the engine tens of milliseconds apart (the event loop
        parses and tokenizes one request after the other), so a fixed window would catch the first
        few and leave the rest to wait for a whole batch. A lone request waits ``gather_s``."""
        self.waiting.append(first)
        deadline = time.monotonic() + self.gather_max_s
        while len(self.waiting) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self.arrivals.get(timeout=min(self.gather_s, left))
            except queue.Empty:
                break
            if job is None:
                return False
            self.waiting.append(job)
        return True

    def _drain(self) -> bool:
        """Move every arrival into ``waiting``; False once ``stop`` was called."""
        while True:
            try:
                job = self.arrivals.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self.waiting.append(job)

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job, with the jobs that share its batch, taken out of ``waiting``."""
        head = self.waiting[0]
        batch = [head] if head.batch_key() is None else self._fellows(head)
        taken = set(batch)
        self.waiting = [j for j in self.waiting if j not in taken]
        return batch

    def _fellows(self, head: Job) -> list[Job]:
        """``head`` and the later jobs of its key that fit beside it, in arrival order, up to ``max_batch``.

        Every row of a batch runs to the longest prompt plus the most new tokens of any row (a finished
        row's positions still advance), so that sum must fit the context, though each job alone did."""
        key, batch, width, new = head.batch_key(), [head], len(head.prompt_ids), head.request.max_tokens
        for job in self.waiting[1:]:
            if len(batch) == self.max_batch:
                break
            if job.batch_key() != key:  # first: a fill job has no request
                continue
            grown = max(width, len(job.prompt_ids)), max(new, job.request.max_tokens)
            if sum(grown) <= self.context:
                batch.append(job)
                width, new = grown
        return batch

    def _run(self, batch: list[Job]) -> None:
        self.batches.append(len(batch))
        try:
            with torch.no_grad():
                if batch[0].kind == "fill":
                    self._fill(batch[0])
                elif batch[0].request.mode in BATCHED:
                    self._generate(batch)
                elif batch[0].request.mode == "speculative":
                    self._speculate(batch[0])
                else:
                    self._diffuse(batch[0])
        except Exception as err:  # a model failure ends these jobs, never the server
            self._fail(batch, err)

    def _fail(self, batch: list[Job], err: Exception) -> None:
        for job in batch:
            if not job.finished:  # a row that ended before the failure keeps its answer
                job.finished = True
                with contextlib.suppress(Exception):  # the server may be closing its event loop
                    job.emit({"index": job.index, "error": f"generation failed: {type(err).__name__}: {err}"})

    def advance(self, job: Job, tokens: list[int]) -> None:
        """Give ``job`` new tokens; send the text they let out."""
        self._send(job, job.continuation.add(tokens))

    def _send(self, job: Job, text: str, event: dict | None = None) -> None:
        if text or event is not None:
            job.emit({"index": job.index, "text": text, **({"event": event} if event else {})})

    def finish(self, job: Job, stats: dict | None = None) -> None:
        """Send ``job``'s last event (the rest of its text, why it ended, usage and ``stats``), once."""
        cont = job.continuation
        if job.finished:
            return
        job.finished = True
        tail = cont.finish()
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(cont.tokens)}
        job.emit({"index": job.index, "text": tail, "finish_reason": cont.finish_reason, "usage": usage,
                  "stats": stats or {}})  # fmt: skip

    def _generate(self, batch: list[Job]) -> None:
        request = batch[0].request
        ids, mask = left_pad([j.prompt_ids for j in batch], PAD_ID)
        if request.temperature > 0:
            # a seeded job runs alone, so its draws are its own (as `dual-lm generate --seed` draws them);
            # an unseeded batch gets a fresh seed, not the stream a seeded job left or torch's fixed default
            torch.manual_seed(_seed(request))
        self.model.generate(
            ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
            max_new_tokens=max(j.request.max_tokens for j in batch),
            max_length=None,  # the folder's max_length (the context) yields without a warning
            prefix_attention=request.mode == "prefix",
            pad_token_id=PAD_ID,
            stopping_criteria=StoppingCriteriaList([_Rows(self, batch)]),
            **sampling_options(request),
        )
        for job in batch:
            if not job.cancelled.is_set():
                self.finish(job)

    def _speculate(self, job: Job) -> None:
        request, cont = job.request, job.continuation

        def on_round(drafts: list[int], new: list[int]) -> bool:
            if job.cancelled.is_set():
                return True
            before = len(cont.tokens)
            text = cont.add(new)
            event = None
            if request.stream:  # the round as the playground shows it; a whole answer has no use for it
                taken = new[: len(cont.tokens) - before]  # what the text took: not past the limit, </s>, a stop
                event = {"event": "round", "drafts": self._pieces(drafts), "accepted": len(new) - 1}
                event["added"] = self._pieces(taken)
            self._send(job, text, event)
            return cont.done

        options = request.options
        result = speculative_generate(
            self.model,
            torch.tensor(job.prompt_ids),
            request.max_tokens,
            k=options["k"],
            draft=options["draft"],
            temperature=request.temperature,
            seed=_seed(request),
            on_round=on_round,
        )
        if job.cancelled.is_set():
            return
        answered = len(cont.tokens) / result.forwards if result.forwards else 0.0  # a stop string cuts the tokens
        stats = {"forwards": result.forwards, "tokens_per_forward": round(answered, 4)}
        stats |= {"acceptance_rate": round(result.acceptance_rate, 4), "drafted": result.drafted}
        self.finish(job, stats)

    def _diffuse(self, job: Job) -> None:
        request, start = job.request, len(job.prompt_ids)
        steps = []

        def on_step(canvas: torch.Tensor, committed: torch.Tensor) -> bool:
            if job.cancelled.is_set() or not request.stream:  # a whole answer has no use for the canvas
                return job.cancelled.is_set()
            slots = canvas[start : start + request.max_tokens].tolist()
            event = {"event": "step", "step": len(steps), "committed": (committed - start).tolist()}
            event["slots"] = [
                None if t == MASK_ID else piece for t, piece in zip(slots, self._pieces(slots), strict=True)
            ]
            steps.append(1)
            job.emit({"index": job.index, "text": "", "event": event})
            return job.cancelled.is_set()

        new, result = diffusion_generate(
            self.model, torch.tensor(job.prompt_ids), request.max_tokens, _diffusion_config(request), on_step=on_step
        )
        if job.cancelled.is_set():
            return
        self.advance(job, new)
        self.finish(job, {"forwards": result.forwards, "passes_per_token": round(result.passes_per_token, 4)})

    def _fill(self, job: Job) -> None:
        text, top_k = job.fill
        try:
            results = fill_masks(self.model, self.tokenizer, text, top_k)
        except ValueError as err:
            job.emit({"error": str(err), "status": 400})
            return
        masks = [{"index": n, "candidates": [{"token": t, "probability": p} for t, p in r.candidates]}
                 for n, r in enumerate(results)]  # fmt: skip
        job.emit({"masks": masks})

    def _pieces(self, tokens: list[int]) -> list[str]:
        """Each token decoded alone, with its leading space (decoded after an anchor token and cut after it)."""
        return [continuation_text(self.tokenizer, self.anchor, [t]) for t in tokens]


def _diffusion_config(request: Completion) -> DiffusionConfig:
    return DiffusionConfig(temperature=request.temperature, seed=_seed(request), **request.options)


def _seed(request: Completion) -> int:
    """The request's seed; without one, greedy needs none and sampling draws a fresh one."""
    if request.seed is not None:
        return request.seed
    return 0 if request.temperature == 0 else secrets.randbits(63)


def _copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)
