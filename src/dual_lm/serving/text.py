"""A completion's text as its tokens arrive: the limit, ``</s>`` and stop strings, and the deltas a
stream sends (held back while they might still turn into a stop string, or end inside a character)."""

from __future__ import annotations

from dual_lm.inference.generation import continuation_text
from dual_lm.tokens import EOS_ID


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (so may not be sent yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest


class Continuation:
    """The new tokens of one prompt. ``add`` takes tokens as they come and returns the text they let
    the stream send; once ``finish_reason`` is set (``"length"`` at ``max_tokens``, ``"stop"`` at
    ``</s>`` or a stop string) later tokens are ignored. ``text`` is cut before the first stop string,
    which is not part of it (OpenAI's rule)."""

    def __init__(self, tokenizer, prompt_ids: list[int], max_tokens: int, stops: tuple[str, ...] = ()):
        self.tokenizer, self.prompt_ids, self.max_tokens, self.stops = tokenizer, list(prompt_ids), max_tokens, stops
        self.decoded_prompt: str | None = None  # decoded at the first token, on the thread that decodes the rest
        self.tokens: list[int] = []  # the tokens that count: up to the limit, </s> or the one ending a stop string
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, tokens: list[int]) -> str:
        """Take ``tokens``; return the text that may be sent now."""
        for token in tokens:
            if self.done:
                break
            if token == EOS_ID:
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            self._read()
            if not self.done and len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        return self._delta()

    def _read(self) -> None:
        if self.decoded_prompt is None:
            self.decoded_prompt = self.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)
        text = continuation_text(self.tokenizer, self.prompt_ids, self.tokens, self.decoded_prompt)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            text, self.finish_reason = text[: min(cuts)], "stop"
        self.text = text

    def _delta(self) -> str:
        if self.done:
            ready = len(self.text)
        elif self.text.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
            ready = self.sent
        else:
            ready = len(self.text) - held_back(self.text, self.stops)
        delta = self.text[self.sent : max(ready, self.sent)]
        self.sent = max(ready, self.sent)
        return delta

    def finish(self) -> str:
        """The generator stopped (its own limit or ``</s>`` cut the tokens short): the rest of the text."""
        if not self.done:
            self.finish_reason = "length" if len(self.tokens) >= self.max_tokens else "stop"
        return self._delta()
