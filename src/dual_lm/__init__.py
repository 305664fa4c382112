"""dual-lm: dual-objective (autoregressive + masked-diffusion) LLaMA models.

The model classes load lazily (module ``__getattr__``, PEP 562), so ``import dual_lm`` and
``dual-lm --help`` import neither torch nor transformers.
"""

__version__ = "0.1.0"
# each public name and the module it lives in
_HOMES = {
    "DLMLlamaForCausalLM": "dual_lm.modeling_dlm_llama",
    "DLMLlamaForMaskedLM": "dual_lm.modeling_dlm_llama",
    "DLMLlamaForQuestionAnswering": "dual_lm.modeling_dlm_llama",
    "DLMLlamaForSequenceClassification": "dual_lm.modeling_dlm_llama",
    "DLMLlamaForTokenClassification": "dual_lm.modeling_dlm_llama",
    "MNTPFillMaskPipeline": "dual_lm.pipeline_dlm_fill_mask",
    "DualObjectiveCollator": "dual_lm.training.collator",
}
__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dual_lm' has no attribute {name!r}")
