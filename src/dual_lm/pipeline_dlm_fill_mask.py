"""The fill-mask pipeline of a dual-lm model folder (self-contained: copied into every folder).

A dual-lm model is an MNTP model: in every mode the logits at position i predict token i+1, so the
token at a ``<mask>`` in position i is read from the logits at position i-1. transformers' stock
``FillMaskPipeline`` reads at the mask itself. The folder's ``config.json`` declares this class in
``custom_pipelines``, so ``pipeline("fill-mask", model=FOLDER, trust_remote_code=True)`` uses it and
returns what ``dual-lm fill`` returns: every mask's top-k tokens with their probabilities over the
whole vocabulary, from one bidirectional pass (``AutoModelForMaskedLM``'s default attention).
"""

from __future__ import annotations

import torch
from transformers import FillMaskPipeline


class MNTPFillMaskPipeline(FillMaskPipeline):
    """``FillMaskPipeline`` with the MNTP read: a mask at position i takes the logits of i - 1."""

    reads_before_mask = True  # the model's stock-pipeline check looks for this

    def preprocess(self, inputs, return_tensors=None, tokenizer_kwargs=None, **preprocess_parameters):
        model_inputs = super().preprocess(inputs, return_tensors, tokenizer_kwargs, **preprocess_parameters)
        if bool((model_inputs["input_ids"][:, 0] == self.tokenizer.mask_token_id).any()):
            raise ValueError("a <mask> at the first position has no position before it to be read from; keep <s> first")
        return model_inputs

    def _forward(self, model_inputs):
        logits = self.model(**model_inputs).logits
        # position i gets the logits of i - 1: the stock postprocess, which reads at the mask, then reads MNTP's
        shifted = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return {"logits": shifted, "input_ids": model_inputs["input_ids"]}
