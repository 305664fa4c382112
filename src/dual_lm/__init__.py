"""dual-lm: dual-objective (autoregressive + masked-diffusion) LLaMA models."""

from dual_lm.modeling_dlm_llama import (
    DLMLlamaForCausalLM,
    DLMLlamaForMaskedLM,
    DLMLlamaForQuestionAnswering,
    DLMLlamaForSequenceClassification,
    DLMLlamaForTokenClassification,
)

__version__ = "0.1.0"
__all__ = [
    "DLMLlamaForCausalLM",
    "DLMLlamaForMaskedLM",
    "DLMLlamaForQuestionAnswering",
    "DLMLlamaForSequenceClassification",
    "DLMLlamaForTokenClassification",
    "__version__",
]
