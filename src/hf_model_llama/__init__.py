"""The import path of the public model card: ``from hf_model_llama.modeling_dlm_llama import ...``."""
