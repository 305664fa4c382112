"""Inference: shared sampling helpers, causal/prefix generation, diffusion, self-speculative decoding and scoring.

The names of the modes and options live here, free of torch, so the command line can offer them as
choices without importing a model.
"""

MODES = ("causal", "prefix", "diffusion", "speculative")  # dual-lm generate --mode
STRATEGIES = ("confidence", "random")  # diffusion: which masked slots commit first
# speculative: one pass per round (verify and draft together), or a draft pass over the KV cache or over the
# whole sequence followed by a verification pass
DRAFTS = ("one-pass", "cached", "full")
CACHES = ("causal", "none")  # block diffusion: the committed text in a causal KV cache, or recomputed
SCORE_MODES = ("causal", "prefix", "masked")  # how a continuation is read
