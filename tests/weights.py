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
