"""Perturbed models for comparisons that must see every weight.

A fresh model starts with zero attention-output and down projections (the reference initialisation), so
scrambling or losing its q/k/v/gate/up weights changes its logits by exactly 0.0. Every save/reload and
cross-process comparison perturbs the model first."""

from __future__ import annotations

import torch


def perturbed(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with seeded Gaussian noise of std ``scale`` added to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_(noise.to(parameter.dtype) * scale)
    return model.eval()


def peaked_tiny_model() -> torch.nn.Module:
    """A tiny model whose next-token distributions are peaked, and differ between the causal and the
    bidirectional mode, so speculative sampling meets both accepted and rejected drafts."""
    from dual_lm.config import PRESETS, llama_config
    from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM

    torch.manual_seed(0)
    model = DLMLlamaForCausalLM(llama_config(PRESETS["tiny"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.output.weight.mul_(30)
    return model
