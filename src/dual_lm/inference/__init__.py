"""Inference: shared sampling helpers, causal/prefix generation, diffusion, self-speculative decoding and scoring.

The names of the modes and options live here, free of torch, so the command line can offer them as
choices without importing a model.
"""

MODES = ("causal", "prefix", "diffusion", "speculative")  # dual-lm generate --mode
STRATEGIES = ("confidence", "random")  # diffusion: which masked slots commit first
DRAFTS = ("cached", "full")  # speculative: the draft pass over the KV cache, or over the whole sequence
SCORE_MODES = ("causal", "prefix", "masked")  # how a continuation is read
