"""What every decoding mode shares: the room left in the context and the cut at ``</s>``."""

from __future__ import annotations

from dual_lm.tokens import EOS_ID


def check_room(prompt_tokens: int, new_tokens: int, limit: int, lookahead: int = 0) -> None:
    """One ValueError unless ``new_tokens`` is a whole number >= 1 and the prompt, the new tokens and
    ``lookahead`` extra positions (where a speculative round's drafts reach) fit in a context of ``limit``.

    Rotary positions past the context give confident nonsense rather than an error, so every mode
    checks before the first forward pass."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {new_tokens}")
    if prompt_tokens + new_tokens + lookahead > limit:
        extra = f" + {lookahead} positions the drafts look ahead" if lookahead else ""
        raise ValueError(
            f"the prompt ({prompt_tokens} tokens) + {new_tokens} new tokens{extra} exceed the context of {limit}"
        )


def cut_at_eos(tokens: list[int]) -> list[int]:
    """The tokens before the first ``</s>`` (all of them when there is none)."""
    return tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
