"""Re-export of dual_lm's model classes under the model card's import path."""

from dual_lm.modeling_dlm_llama import (
    DLMLlamaForCausalLM,
    DLMLlamaForMaskedLM,
    DLMLlamaForQuestionAnswering,
    DLMLlamaForSequenceClassification,
    DLMLlamaForTokenClassification,
    DLMLlamaPreTrainedModel,
)

__all__ = [
    "DLMLlamaForCausalLM",
    "DLMLlamaForMaskedLM",
    "DLMLlamaForQuestionAnswering",
    "DLMLlamaForSequenceClassification",
    "DLMLlamaForTokenClassification",
    "DLMLlamaPreTrainedModel",
]
