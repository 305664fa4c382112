"""dual-lm: dual-objective (autoregressive + masked-diffusion) LLaMA models.

The model classes load lazily (module ``__getattr__``, PEP 562), so ``import dual_lm`` and
``dual-lm --help`` import neither torch nor transformers.
"""

__version__ = "0.1.0"
__all__ = [
    "DLMLlamaForCausalLM",
    "DLMLlamaForMaskedLM",
    "DLMLlamaForQuestionAnswering",
    "DLMLlamaForSequenceClassification",
    "DLMLlamaForTokenClassification",
    "__version__",
]


def __getattr__(name: str):
    if name in __all__:
        from dual_lm import modeling_dlm_llama

        return getattr(modeling_dlm_llama, name)
    raise AttributeError(f"module 'dual_lm' has no attribute {name!r}")
