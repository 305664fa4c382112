"""The request bodies the server accepts, checked field by field where they enter.

A bad field is an ``ApiError`` (HTTP 400, OpenAI's error shape) that names the field and what is
allowed; a field the server does not honour is refused rather than ignored, so a client never gets
an answer to a question it did not ask. The OpenAI fields follow the completions API reference
(defaults included: ``max_tokens`` 16, ``temperature`` 1, ``top_p`` 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from dual_lm.inference import DRAFTS, MODES

# the options each mode adds to the OpenAI fields (name -> the mode it belongs to)
MODE_FIELDS = {"k": "speculative", "draft": "speculative", "steps": "diffusion", "block_length": "diffusion"}
MODE_FIELDS |= {"threshold": "diffusion"}
# OpenAI fields accepted only at their neutral value (we do not implement them)
NEUTRAL = {"n": 1, "best_of": 1, "logprobs": None, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0}
NEUTRAL |= {"logit_bias": None}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream"}
KNOWN |= {"stream_options", "echo", "user", "mode", *MODE_FIELDS, *NEUTRAL}
MAX_STOPS = 4  # as OpenAI
MAX_PROMPTS = 64  # a list prompt: one choice each


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Completion:
    """One checked ``/v1/completions`` body (``prompts`` is always a list; one choice per prompt)."""

    prompts: list[str]
    mode: str = "causal"
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    options: dict = field(default_factory=dict)  # the mode's own: k, draft, steps, block_length, threshold


@dataclass(frozen=True)
class Fill:
    """One checked ``/v1/fill`` body."""

    text: str
    top_k: int = 5


def shown(value) -> str:
    """``value`` as the client wrote it (JSON: ``true``, ``null``, ``"10"``, ``NaN``), cut short if long."""
    text = json.dumps(value)  # ASCII: a lone surrogate is shown escaped, never breaks the error body
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: str, name: str) -> str:
    """``value`` unless it holds a lone surrogate (JSON allows ``"\\ud800"``; no tokenizer encodes it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{name} holds a lone UTF-16 surrogate, which is not text: {shown(value)}", name) from None
    return value


def _body(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def _whole(body: dict, name: str, default, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:  # absent or null: OpenAI's fields are nullable, null meaning the default
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(f"{name} must be a whole number {bound}, got {shown(value)}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    # an int is finite, and may be too large for math.isfinite (JSON integers have no limit)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (isinstance(value, int) or math.isfinite(value))
    if not ok or value < low or value > high or (low_open and value == low):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(f"{name} must be a finite number in {bound}, got {shown(value)}", name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {shown(value)}", name)
    return value


def _prompts(body: dict) -> list[str]:
    if "prompt" not in body:
        raise ApiError("prompt is required", "prompt")
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(
            "prompt must be a string or a non-empty list of strings (token arrays are not accepted)", "prompt"
        )
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(f"prompt lists hold at most {MAX_PROMPTS} prompts, got {len(prompts)}", "prompt")
    return [_text(p, "prompt") for p in prompts]


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    return tuple(_text(s, "stop") for s in stops)


def _refuse_unsupported(body: dict) -> None:
    for name in body:
        if name not in KNOWN:
            raise ApiError(f"unknown field {shown(name)}", name)
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if name == "logit_bias" and value == {}:  # what some OpenAI clients send by default: no bias
            continue
        if value is not None and (value != neutral or isinstance(value, bool)):  # true == 1 in Python, not in JSON
            raise ApiError(f"{name} is not supported: leave it out or set it to {shown(neutral)}", name)


def _choice(body: dict, name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (absent or null: ``default``); anything else, ``""`` included, is refused."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise ApiError(f"unknown {name} {shown(value)}; choose one of {', '.join(choices)}", name)
    return value


def _mode_options(body: dict, mode: str) -> dict:
    """The mode's own fields; another mode's field is refused, as ``dual-lm generate`` refuses it."""
    for name, owner in MODE_FIELDS.items():
        if name in body and body[name] is not None and owner != mode:
            raise ApiError(f"{name} applies only to mode {owner!r}, not {mode!r}", name)
    if mode == "speculative":
        draft = _choice(body, "draft", DRAFTS, "one-pass")
        return {"k": _whole(body, "k", 4, 1, 64), "draft": draft}
    if mode == "diffusion":
        options = {"steps": _whole(body, "steps", 32, 1), "block_length": _whole(body, "block_length", None, 1)}
        if body.get("threshold") is not None:
            options["threshold"] = _number(body, "threshold", 1.0, 0, 1, low_open=True)
        return options
    return {}


def parse_completion(body) -> Completion:
    """A ``/v1/completions`` body, checked (``ApiError`` for the first bad field)."""
    body = _body(body)
    _refuse_unsupported(body)
    mode = _choice(body, "mode", MODES, "causal")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError("model must be a string", "model")
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    top_k = _whole(body, "top_k", 0, 0)
    if mode in ("speculative", "diffusion") and (top_p != 1 or top_k):
        name = "top_p" if top_p != 1 else "top_k"
        raise ApiError(f"{name} applies only to the causal and prefix modes, not {mode!r}", name)
    stream_options = body.get("stream_options")
    if stream_options is not None and (not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}):
        raise ApiError("stream_options may hold only include_usage", "stream_options")
    completion = Completion(
        prompts=_prompts(body),
        mode=mode,
        max_tokens=_whole(body, "max_tokens", 16, 1),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=top_p,
        top_k=top_k,
        stop=_stops(body),
        seed=_whole(body, "seed", None, 0, 2**63 - 1),
        stream=_flag(body, "stream"),
        include_usage=_flag(stream_options or {}, "include_usage"),
        echo=_flag(body, "echo"),
        options=_mode_options(body, mode),
    )
    if completion.include_usage and not completion.stream:
        raise ApiError("stream_options applies only with stream: true", "stream_options")
    block = completion.options.get("block_length")
    if block is not None and block > completion.max_tokens:
        raise ApiError(f"block_length ({block}) must be <= max_tokens ({completion.max_tokens})", "block_length")
    return completion


def parse_fill(body) -> Fill:
    """A ``/v1/fill`` body: ``text`` with ``<mask>``, ``top_k`` candidates per mask (``ApiError`` if bad)."""
    body = _body(body)
    for name in body:
        if name not in ("model", "text", "top_k"):
            raise ApiError(f"unknown field {shown(name)}", name)
    text = body.get("text")
    if not isinstance(text, str) or "<mask>" not in text:
        raise ApiError("text must be a string with at least one <mask>", "text")
    return Fill(_text(text, "text"), _whole(body, "top_k", 5, 1, 100))
