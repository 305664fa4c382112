"""Zero-shot evaluation (DESIGN.md section 4): the nine tasks, three scoring modes, and an lm-eval adapter.

- ``tasks`` / ``prompts`` / ``data``: where each task's data lives and lm-eval's zero-shot format;
- ``metrics``: accuracy, length-normalised accuracy, normalized accuracy (pure functions);
- ``runner`` / ``evaluate``: scoring every choice with ``dual_lm.inference.scoring``; ``results``: JSON and table;
- ``compare``: bar charts of several runs; ``lm_eval_adapter``: the ``dual-lm`` model for lm-eval.
"""
