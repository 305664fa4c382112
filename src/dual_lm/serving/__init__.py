"""Serving: ``dual-lm serve``, an OpenAI-compatible completions server for every mode, and its playground.

The wire protocol beyond OpenAI's (clients that do not know it ignore it):

- ``POST /v1/completions`` takes ``mode`` (causal, prefix, speculative, diffusion) and the mode's own
  fields (speculative: ``k``, ``draft``; diffusion: ``steps``, ``block_length``, ``threshold``), and
  ``top_k`` for the causal and prefix modes.
- A streamed chunk may carry ``dual_lm``, one step of the mode at work:
  ``{"event": "round", "drafts": [piece], "accepted": a, "added": [piece]}`` per speculative round
  (the drafts it checked, how many it accepted, the tokens it adds: the accepted drafts and the
  verifier's token); ``{"event": "step", "step": s, "slots": [piece | null], "committed": [slot]}``
  per diffusion pass (the new positions, null where still ``<mask>``, and the slots this pass
  committed); ``{"event": "done", ...}`` on a choice's last chunk, with the mode's statistics
  (``forwards``, ``tokens_per_forward``, ``acceptance_rate``, ``passes_per_token``). A piece is one
  token decoded alone. A whole (unstreamed) answer carries the statistics as each choice's ``dual_lm``.
- ``POST /v1/fill`` takes ``{"text": "... <mask> ...", "top_k": 5}`` and answers
  ``{"object": "fill", "model", "masks": [{"index", "candidates": [{"token", "probability"}]}]}``,
  the answers of ``dual-lm fill``.
- ``GET /`` is the playground page (``playground.html``, self-contained), ``GET /v1/models`` and
  ``GET /health`` as usual.
"""
