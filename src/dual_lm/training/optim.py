"""The reference trainer's optimiser (Muon + AdamW) and its warmup-stable-decay schedule.

Facts followed (DESIGN.md section 3, pinned by ``reference/parity-tiny/optimizer.{safetensors,json}``):

* Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-Schulz", with the update
  scale of Liu et al. 2025, "Muon is Scalable for LLM Training") for every 2-D trunk matrix and
  the head projection: Nesterov momentum 0.95 as ``buf = m*buf + g; u = g + m*buf``, five quintic
  Newton-Schulz steps (3.4445, -4.7750, 2.0315) in float32 after Frobenius normalisation, update
  scaled by ``lr * 0.2 * sqrt(max(rows, cols))``.
* AdamW (betas 0.9/0.95, eps 1e-8) for the embedding, the output layer and its bias, the norm
  gains (and any task head). eps is added to ``sqrt(v)`` *before* bias correction:
  ``p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``. ``torch.optim.AdamW`` adds eps
  after bias correction and does not match the reference when ``|g|`` is near eps.
* Decoupled weight decay on every parameter, applied *before* the update:
  ``p *= 1 - lr * wd`` and then ``p -= update`` (the fixture distinguishes the two orders).
* One learning rate (0.007) for both kinds, no clipping; warmup-stable-decay schedule with linear
  decay to zero over the last 25% of the steps.

Usage in a training loop::

    optimizer, table = build_optimizer(model, lr=0.007, weight_decay=0.1)
    print(table)
    for step in range(start_step, total_steps):
        set_lr_factor(optimizer, wsd_lr_factor(step, total_steps))
        loss = ...; loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save({"optimizer": optimizer.state_dict(), "step": step + 1}, path)  # resume: load_state_dict
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor, nn

__all__ = [
    "AdamW",
    "Muon",
    "MuonAdamW",
    "build_optimizer",
    "classify_parameter",
    "group_table",
    "newton_schulz",
    "parameter_groups",
    "set_lr_factor",
    "wsd_lr_factor",
    "wsd_scheduler",
]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_SCALE = 0.2
DECAY_KINDS = ("linear", "sqrt", "cosine")


# --------------------------------------------------------------------------- Newton-Schulz


def newton_schulz(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately orthogonalise ``g`` (``U S V^T -> U S' V^T`` with ``S'`` near 1) by the quintic Newton-Schulz map.

    Follows Muon (Jordan et al. 2024): ``X = G / (||G||_F + 1e-7)``, working on the wide
    orientation (transposed when rows > cols), then ``steps`` times ``A = X X^T``,
    ``X = a X + (b A + c A A) X`` with ``(a, b, c) = (3.4445, -4.7750, 2.0315)``. The reference
    runs it in float32 (``newton_schulz_dtype`` in ``optimizer.json``), the default here.

    ``g`` has at least two dimensions; leading dimensions are a batch, each trailing matrix is
    normalised and orthogonalised on its own. Returns a new tensor of ``dtype`` and ``g``'s shape.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (or a batch of them), got shape {tuple(g.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, ord="fro", keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT.contiguous() if tall else x


# --------------------------------------------------------------------------- optimisers


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser with two kinds of parameter groups: ``kind="muon"`` and ``kind="adamw"``.

    Each group may carry ``lr``, ``weight_decay`` and the settings of its kind (``momentum``,
    ``nesterov``, ``ns_steps``, ``batched`` for Muon; ``betas``, ``eps`` for AdamW) and a free
    ``name``; missing keys come from the constructor's defaults. ``step``, ``zero_grad``,
    ``state_dict`` and ``load_state_dict`` are the ordinary ``torch.optim.Optimizer`` ones, so
    ``torch.optim.lr_scheduler`` works on every group alike.

    Muon step for each 2-D parameter with a gradient (reference behaviour, see module docstring)::

        buf = momentum * buf + g
        u   = g + momentum * buf            (nesterov; else u = buf)
        o   = newton_schulz(u, ns_steps)    (float32)
        p  *= 1 - lr * weight_decay
        p  -= lr * 0.2 * sqrt(max(rows, cols)) * o

    With ``batched=True`` (default) the updates of same-shape matrices are stacked and
    orthogonalised in one batched Newton-Schulz call; the result equals the per-matrix path up to
    float rounding.

    AdamW step for every parameter with a gradient (reference behaviour: eps before bias correction)::

        t  += 1
        m   = lerp(m, g, 1 - b1);  v = lerp(v, g*g, 1 - b2)
        p  *= 1 - lr * weight_decay
        p  -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    Parameters without a gradient are skipped entirely (no weight decay either). States live in
    the parameter's dtype and device; Newton-Schulz runs in ``ns_dtype`` (float32 by default, as the fixture).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.007,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        batched: bool = True,
        kind: str | None = None,
        ns_dtype: str = "float32",
    ):
        if lr < 0 or weight_decay < 0 or eps < 0:
            raise ValueError(f"lr, weight_decay and eps must be >= 0, got {lr}, {weight_decay}, {eps}")
        if not 0 <= momentum < 1 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"momentum and betas must be in [0, 1), got {momentum}, {betas}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=tuple(betas),
            eps=eps,
            batched=batched,
            kind=kind,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As ``Optimizer.add_param_group``; then checks ``kind`` and, for Muon, that every parameter is 2-D."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["kind"] not in ("muon", "adamw"):
            raise ValueError(
                f"parameter group {group.get('name', len(self.param_groups) - 1)!r} needs kind 'muon' or "
                f"'adamw', got {group['kind']!r}"
            )
        if group["kind"] == "muon":
            bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
            if bad:
                raise ValueError(f"Muon orthogonalises matrices only; group {group.get('name')!r} has shapes {bad}")
        group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one update of every group (see the class docstring); returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        params, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(p.grad)
            params.append(p)
            updates.append(p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf)
        if not params:
            return
        full = [_full_tensor(u) for u in updates]  # FSDP2 shards: orthogonalise the whole matrix
        dtype = getattr(torch, group.get("ns_dtype", "float32"))
        orthogonal = _orthogonalise(full, group["ns_steps"], group["batched"], dtype)
        for p, o in zip(params, orthogonal, strict=True):
            p.mul_(1 - lr * wd)
            p.add_(_shard_like(o.to(p.dtype), p), alpha=-lr * MUON_SCALE * math.sqrt(max(p.shape)))

    def _adamw_group(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.lerp_(p.grad.square(), 1 - beta2)
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            p.mul_(1 - lr * wd)
            p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)


def _full_tensor(t: Tensor) -> Tensor:
    """The whole matrix of a (possibly FSDP2-sharded) DTensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_like(update: Tensor, param: Tensor) -> Tensor:
    """``update`` laid out like ``param``: every rank computed the same full update, so each keeps its slice."""
    if not hasattr(param, "device_mesh"):
        return update
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)


def _orthogonalise(
    updates: list[Tensor], steps: int, batched: bool, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """``newton_schulz`` of each update; with ``batched`` same-shape/device updates share one batched call."""
    if not batched:
        return [newton_schulz(u, steps, dtype) for u in updates]
    buckets: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        buckets.setdefault((tuple(u.shape), u.device), []).append(i)
    out: list[Tensor] = [torch.empty(0)] * len(updates)
    for indices in buckets.values():
        if len(indices) == 1:
            out[indices[0]] = newton_schulz(updates[indices[0]], steps, dtype)
            continue
        stacked = newton_schulz(torch.stack([updates[i] for i in indices]), steps, dtype)
        for i, o in zip(indices, stacked.unbind(0), strict=True):
            out[i] = o
    return out


class Muon(MuonAdamW):
    """``MuonAdamW`` whose groups default to ``kind="muon"`` (every parameter must be 2-D)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, kind="muon", **kwargs)


class AdamW(MuonAdamW):
    """``MuonAdamW`` whose groups default to ``kind="adamw"``: the reference AdamW, eps added before bias correction.

    Differs from ``torch.optim.AdamW`` (eps after bias correction) whenever ``sqrt(v)`` is near eps.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, kind="adamw", **kwargs)


# --------------------------------------------------------------------------- parameter assignment

# (group name, kind, pattern on our parameter names); a parameter matches at most one pattern.
_GROUP_RULES: tuple[tuple[str, str, re.Pattern], ...] = (
    (
        "trunk matrices",
        "muon",
        re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"),
    ),
    ("head projection", "muon", re.compile(r"lm_head\.projection\.weight")),
    ("embedding", "adamw", re.compile(r"model\.embed_tokens\.weight")),
    ("output layer", "adamw", re.compile(r"lm_head\.output\.(weight|bias)")),
    ("norm gains", "adamw", re.compile(r"model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight")),
    ("task heads", "adamw", re.compile(r"(score|qa_outputs)\.(weight|bias)")),
)


def classify_parameter(name: str) -> tuple[str, str] | None:
    """``(group name, kind)`` for one of our parameter names, or None when no rule covers it."""
    hits = [(group, kind) for group, kind, pattern in _GROUP_RULES if pattern.fullmatch(name)]
    if len(hits) > 1:
        raise AssertionError(f"parameter {name} matches several optimiser groups: {hits}")
    return hits[0] if hits else None


def parameter_groups(model: nn.Module) -> list[dict]:
    """Split ``model``'s parameters into named groups ``{"name", "kind", "params", "param_names"}``.

    Muon: every q/k/v/o/gate/up/down weight of the trunk and ``lm_head.projection.weight``. AdamW:
    ``model.embed_tokens.weight``, ``lm_head.output.weight`` / ``.bias``, every norm gain, and the
    task heads (``score``, ``qa_outputs``). Every parameter lands in exactly one group (shared
    tensors count once); any parameter no rule covers raises ``ValueError`` naming it. Empty
    groups are left out.
    """
    groups = {name: {"name": name, "kind": kind, "params": [], "param_names": []} for name, kind, _ in _GROUP_RULES}
    unassigned = []
    for name, param in model.named_parameters():
        hit = classify_parameter(name)
        if hit is None:
            unassigned.append(name)
            continue
        groups[hit[0]]["params"].append(param)
        groups[hit[0]]["param_names"].append(name)
    if unassigned:
        raise ValueError("no optimiser group for parameter(s): " + ", ".join(unassigned))
    result = [group for group in groups.values() if group["params"]]
    assigned = [id(p) for group in result for p in group["params"]]
    expected = {id(p) for p in model.parameters()}
    if len(assigned) != len(set(assigned)) or set(assigned) != expected:
        raise AssertionError("optimiser groups do not cover every parameter exactly once")
    return result


def build_optimizer(model: nn.Module, **options) -> tuple[MuonAdamW, str]:
    """The reference optimiser for ``model`` and its printable group table (``group_table``).

    One ``MuonAdamW`` holds every group of ``parameter_groups(model)``; ``options`` are its keyword
    arguments (``lr``, ``weight_decay``, ``ns_dtype``, ...) with the reference defaults. Each group
    also records ``base_lr`` (= ``lr``) for ``set_lr_factor``.
    """
    optimizer = MuonAdamW(parameter_groups(model), **options)
    return optimizer, group_table(optimizer)


def group_table(optimizer: torch.optim.Optimizer) -> str:
    """A fixed-width table: one row per group (name, optimiser kind, parameter count, numel) and a total."""
    rows = [
        (
            str(g.get("name", i)),
            str(g.get("kind", type(optimizer).__name__)),
            len(g["params"]),
            sum(p.numel() for p in g["params"]),
        )
        for i, g in enumerate(optimizer.param_groups)
    ]
    rows.append(("total", "", sum(r[2] for r in rows), sum(r[3] for r in rows)))
    width = max(len("group"), *(len(r[0]) for r in rows))
    lines = [f"{'group':<{width}}  {'optimizer':<9}  {'count':>5}  {'numel':>13}"]
    lines += [f"{name:<{width}}  {kind:<9}  {count:>5}  {numel:>13,}" for name, kind, count, numel in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- schedule


def wsd_lr_factor(
    step: int,
    total_steps: int,
    warmup_frac: float = 0.0,
    decay_frac: float = 0.25,
    decay: str = "linear",
) -> float:
    """Warmup-stable-decay multiplier on the base lr for the update with 0-based index ``step``.

    ``step`` is the index of the update about to be taken (0 for the first ``optimizer.step()``),
    the same number ``torch.optim.lr_scheduler.LambdaLR`` passes when ``scheduler.step()`` follows
    each ``optimizer.step()``. With ``W = int(warmup_frac * T)`` and
    ``D = min(int(decay_frac * T), T - W)``, ``T = total_steps``, truncated as the reference trainer
    does (so 0.29 x 100 = 28.999... gives 28 steps, where rounding gave 29):

    * warmup, ``step < W``: ``step / W`` (so update 0 has factor 0, as the reference);
    * stable, ``W <= step < T - D``: 1;
    * decay, ``T - D <= step < T``: ``f(p)`` with ``p = (step - (T - D)) / D`` in ``[0, 1)`` and
      ``f = 1 - p`` (linear), ``1 - sqrt(p)`` (sqrt) or ``(1 + cos(pi p)) / 2`` (cosine); so
      ``f = 1`` at the first decay step and reaches exactly 0 at ``step = T``, one past the last
      update, which keeps a small nonzero factor (``1/D`` for linear);
    * ``step >= T``: 0.

    With T = 8192 and the defaults the decay covers updates 6144..8191 (factors 1 .. 1/2048).
    Raises ``ValueError`` for fractions outside [0, 1], ``warmup_frac + decay_frac > 1``, an
    unknown ``decay``, ``total_steps < 1`` or ``step < 0``.
    """
    if not 0.0 <= warmup_frac <= 1.0 or not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"warmup_frac and decay_frac must be in [0, 1], got {warmup_frac} and {decay_frac}")
    if warmup_frac + decay_frac > 1.0:
        raise ValueError(f"warmup_frac + decay_frac must be <= 1, got {warmup_frac} + {decay_frac}")
    if decay not in DECAY_KINDS:
        raise ValueError(f"decay must be one of {', '.join(DECAY_KINDS)}, got {decay!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = int(warmup_frac * total_steps)  # truncation, as the reference's int(max_steps * proportion)
    decay_steps = min(int(decay_frac * total_steps), total_steps - warmup)
    decay_start = total_steps - decay_steps
    if step >= total_steps:
        return 0.0
    if step < warmup:
        return step / warmup
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / decay_steps
    if decay == "linear":
        return 1.0 - progress
    if decay == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_frac: float = 0.0,
    decay_frac: float = 0.25,
    decay: str = "linear",
    last_epoch: int = -1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``wsd_lr_factor``; call ``scheduler.step()`` after every ``optimizer.step()``."""
    wsd_lr_factor(0, total_steps, warmup_frac, decay_frac, decay)  # validate now, not at the first step
    factor = partial(
        wsd_lr_factor, total_steps=total_steps, warmup_frac=warmup_frac, decay_frac=decay_frac, decay=decay
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Stateless alternative to a scheduler: ``group["lr"] = group["base_lr"] * factor`` for every group.

    ``base_lr`` is recorded by ``MuonAdamW`` (the group's constructor lr) and saved in
    ``state_dict``; other optimisers get it from their current ``lr`` on the first call.
    """
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
