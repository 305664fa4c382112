"""Dual-objective LLaMA models (causal, masked and prefix attention on one set of weights).

This file is self-contained: it imports torch and transformers only, because
``save_pretrained`` copies it into every model folder so that
``AutoModelFor*.from_pretrained(folder, trust_remote_code=True)`` works without dual_lm.

The trunk is exactly transformers' ``LlamaModel``. The head replaces the plain lm_head:
final RMSNorm (the trunk's ``norm``) -> Linear H->H (no bias) -> GELU(tanh) -> Linear H->V
(with bias). Every position predicts the *next* token in every mode (MNTP): in masked use the
token at a ``<mask>`` in position i is read from the output at position i-1.

Attention patterns, selected per call:
  causal          query q sees key k iff k <= q
  bidirectional   every position sees every position
  prefix          causal, plus the first ``prefix_lengths[b]`` tokens of row b see each other
``document_ids`` [B, T] restricts attention to the same document in any mode, and a padding
``attention_mask`` [B, P+T] (1 = token, 0 = padding) combines with all of them. ``run_trunk`` also
takes ``row_causal`` [B] (bool) instead of a mode: causal rows where True, bidirectional rows where
False, in one pass (the dual objective's mixed AR/MD batches).

Prefix mode with one prefix length for the whole batch (no padding, no cache before the call, the
sdpa backend, run eagerly) needs no mask: ``prefix_attention`` runs it as unmasked SDPA kernel
calls, reached through transformers' ``sdpa`` attention function (``_sdpa_with_prefix``). Every other
pattern takes one dense boolean mask (``allowed_attention``), the slow twin the tests compare against.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, GenerationMixin, LlamaConfig
from transformers import initialization as init
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel
from transformers.utils import can_return_tuple

ATTENTION_MODES = ("causal", "bidirectional", "prefix")
_PER_ROW = "per-row"  # run_trunk's pattern when row_causal mixes causal and bidirectional rows
MODELING_FILE = "modeling_dlm_llama.py"
PIPELINE_FILE = "pipeline_dlm_fill_mask.py"  # the MNTP fill-mask pipeline, copied into every folder beside this file
CUSTOM_PIPELINES = {  # config.custom_pipelines: pipeline("fill-mask", model=FOLDER, trust_remote_code=True) uses it
    "fill-mask": {"impl": "pipeline_dlm_fill_mask.MNTPFillMaskPipeline", "pt": ["AutoModelForMaskedLM"], "tf": []}
}
AUTO_MAP = {
    "AutoModelForCausalLM": "modeling_dlm_llama.DLMLlamaForCausalLM",
    "AutoModelForMaskedLM": "modeling_dlm_llama.DLMLlamaForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_dlm_llama.DLMLlamaForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_dlm_llama.DLMLlamaForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_dlm_llama.DLMLlamaForQuestionAnswering",
}


# --------------------------------------------------------------------------- attention masks


def resolve_mode(attention_mode: str | None, prefix_lengths, default: str) -> str:
    """Return the attention mode of a call: explicit, else prefix when prefix_lengths is given, else default."""
    mode = attention_mode or ("prefix" if prefix_lengths is not None else default)
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention_mode {mode!r}; choose one of {', '.join(ATTENTION_MODES)}")
    if mode == "prefix" and prefix_lengths is None:
        if attention_mode is None:  # the model's default (config.dlm_task_attention), not the caller's choice
            raise ValueError(
                "config.dlm_task_attention='prefix' needs prefix_lengths (a LongTensor [B]) in every call, which "
                "transformers' pipelines do not pass; set it to 'bidirectional' or 'causal' to use them"
            )
        raise ValueError("attention_mode='prefix' needs prefix_lengths (a LongTensor [B])")
    if mode != "prefix" and prefix_lengths is not None:
        raise ValueError(f"prefix_lengths is only used with attention_mode='prefix', not {mode!r}")
    return mode


def _check_prefix_mask(mode: str, attention_mask, prefix_lengths, past_len: int) -> None:
    """A ready-made 4-D mask (``generate`` builds one for a static cache and padding) says only what is
    causal: it cannot carry the prefix, so a query inside a prefix would silently attend causally."""
    if mode != "prefix" or attention_mask is None or attention_mask.dim() != 4 or not _eager():
        return
    if bool((prefix_lengths > past_len).any()):
        raise ValueError(
            "prefix mode needs the [B, T] padding mask, not a 4-D attention mask, while queries lie inside the "
            "prefix (generate builds a 4-D mask for a static cache with padding: use the default dynamic cache)"
        )


def allowed_attention(
    mode: str,
    batch: int,
    q_len: int,
    past_len: int = 0,
    padding_mask: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, T, P+T] matrix: True where query q (absolute position P+i) may attend to key k.

    Padding keys are never visible; a padding query that would see nothing sees itself, so no
    softmax row is empty (its output is garbage by definition and never read).
    """
    kv_len = past_len + q_len
    q = torch.arange(past_len, kv_len, device=device)[:, None]  # [T, 1]
    k = torch.arange(kv_len, device=device)[None, :]  # [1, P+T]
    if mode == "bidirectional":
        allowed = torch.ones(batch, q_len, kv_len, dtype=torch.bool, device=device)
    else:
        allowed = (k <= q).expand(batch, q_len, kv_len)
        if mode == "prefix":
            in_prefix = k[None] < prefix_lengths.to(device)[:, None, None]  # [B, 1, P+T]
            allowed = allowed | in_prefix
    if document_ids is not None:
        docs = document_ids.to(device)  # [B, P+T]
        allowed = allowed & (docs[:, -q_len:, None] == docs[:, None, :])
    if padding_mask is not None:
        valid = padding_mask.to(device=device, dtype=torch.bool)  # [B, P+T]
        allowed = allowed & valid[:, None, :]
        lonely = ~allowed.any(-1, keepdim=True)  # [B, T, 1]
        allowed = allowed | (lonely & (k == q)[None])
    return allowed[:, None]


def allowed_attention_per_row(
    row_causal: torch.Tensor,
    q_len: int,
    past_len: int = 0,
    padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, T, P+T]: row b is causal where ``row_causal[b]``, bidirectional elsewhere.

    Each pattern is ``allowed_attention``'s own, picked per row, so a mixed batch sees exactly what
    each row would see alone.
    """
    batch = row_causal.shape[0]
    causal = allowed_attention("causal", batch, q_len, past_len, padding_mask, None, document_ids, device)
    bidirectional = allowed_attention("bidirectional", batch, q_len, past_len, padding_mask, None, document_ids, device)
    return torch.where(row_causal.to(device)[:, None, None, None], causal, bidirectional)


def to_attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask (0 where allowed, the dtype's minimum elsewhere) for eager attention."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- prefix attention without a mask

PREFIX_KERNELS = ("lse", "split", "lower_right")


def prefix_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float = 0.0) -> str:
    """The kernel ``prefix_attention`` uses by default: ``lse`` on the CPU without gradients or dropout
    (the least work), ``split`` on the CPU otherwise (autograd through stock SDPA), ``lower_right`` elsewhere."""
    if query.device.type != "cpu":
        return "lower_right"
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return (
        "split"
        if grad or dropout or not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
        else "lse"
    )


def prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_length: int,
    scale: float | None = None,
    dropout: float = 0.0,
    kernel: str | None = None,
) -> torch.Tensor:
    """Prefix attention with one prefix length P for every row, and no mask: [B, H, T, D] in and out.

    Queries [0, P) see keys [0, P); a query i >= P sees keys [0, i] (the prefix is inside that already).
    Query, key and value hold the same T positions with as many key as query heads. The kernels:

    - ``lse``: every query against the prefix keys (unmasked, T x P) and the suffix queries against the
      suffix keys (causal, square), the suffix merged by the two log-sum-exps: the pattern's own work,
      P x T + (T-P)^2 / 2 scores. CPU only (its flash kernel returns the log-sum-exp), no gradient.
    - ``split``: the whole sequence causal and the prefix block bidirectional, the prefix rows taken from
      the latter; P^2 / 2 more scores than the pattern, plain SDPA calls, so any device and autograd.
    - ``lower_right``: the prefix block unmasked, and the suffix queries against every key under
      torch's bottom-right causal bias, which the flash and memory-efficient kernels of accelerators
      take without a mask (the CPU materialises it).
    """
    q_len = query.shape[2]
    if not 0 <= prefix_length <= q_len or key.shape[2] != q_len:
        raise ValueError(
            f"prefix_attention needs 0 <= P <= T keys = T queries, got P={prefix_length}, "
            f"{q_len} queries, {key.shape[2]} keys"
        )
    sdpa = F.scaled_dot_product_attention
    if prefix_length == 0:
        return sdpa(query, key, value, dropout_p=dropout, is_causal=True, scale=scale)
    if prefix_length == q_len:
        return sdpa(query, key, value, dropout_p=dropout, scale=scale)
    kernel = kernel or prefix_kernel(query, key, value, dropout)
    P = prefix_length
    if kernel == "lse":
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            raise ValueError("the 'lse' prefix kernel has no gradient (its log-sum-exps are constants); use 'split'")
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse_prefix = flash(query, key[:, :, :P], value[:, :, :P], dropout, False, scale=scale)
        suffix, lse_suffix = flash(query[:, :, P:], key[:, :, P:], value[:, :, P:], dropout, True, scale=scale)
        # softmax over both key sets = a mix of the two partial outputs weighted by exp(lse):
        # weight of the prefix part = e^a / (e^a + e^b) = sigmoid(a - b)
        weight = torch.sigmoid(lse_prefix[:, :, P:].float() - lse_suffix.float()).unsqueeze(-1)
        mixed = torch.lerp(suffix.float(), out[:, :, P:].float(), weight)
        out[:, :, P:] = mixed.to(out.dtype)  # a fresh kernel output, not part of any graph
        return out
    if kernel == "split":
        head = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], dropout_p=dropout, scale=scale)
        causal = sdpa(query, key, value, dropout_p=dropout, is_causal=True, scale=scale)
        return torch.cat([head, causal[:, :, P:]], dim=2)
    if kernel == "lower_right":
        from torch.nn.attention.bias import causal_lower_right

        head = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], dropout_p=dropout, scale=scale)
        bias = causal_lower_right(q_len - P, q_len)
        tail = sdpa(query[:, :, P:], key, value, attn_mask=bias, dropout_p=dropout, scale=scale)
        return torch.cat([head, tail], dim=2)
    raise ValueError(f"unknown prefix kernel {kernel!r}; choose one of {', '.join(PREFIX_KERNELS)}")


_PREFIX_PROTOCOL = 1  # what ``run_trunk`` passes the attention function (``dlm_prefix_length``); bump on change


def _sdpa_with_prefix(module, query, key, value, attention_mask, *args, dlm_prefix_length=None, **kwargs):
    """transformers' ``sdpa`` attention function, registered in its place: every call runs the stock
    function unchanged, except ``run_trunk``'s shared-prefix calls (``dlm_prefix_length`` = P), which run
    ``prefix_attention``. Those come with no padding and no cached keys before them, so the only mask
    transformers may still hand over encodes causality and a static cache's empty slots: the first T
    keys and ``prefix_attention``'s pattern replace it exactly."""
    if dlm_prefix_length is None:
        return _sdpa_with_prefix._dlm_base(module, query, key, value, attention_mask, *args, **kwargs)
    q_len = query.shape[2]
    key, value = key[:, :, :q_len], value[:, :, :q_len]
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = prefix_attention(
        query, key, value, dlm_prefix_length, scale=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0)
    )
    return out.transpose(1, 2).contiguous(), None


_sdpa_with_prefix._dlm_base = sdpa_attention_forward
_sdpa_with_prefix._dlm_prefix_protocol = _PREFIX_PROTOCOL


def _prefix_kernels_ready() -> bool:
    """Whether the ``sdpa`` attention function takes ``run_trunk``'s shared-prefix calls; registers
    ``_sdpa_with_prefix`` in place of transformers' own on first use (a copy of this file loaded with
    trust_remote_code finds it registered). Another ``sdpa`` override is left alone: then prefix mode
    keeps its dense mask."""
    current = ALL_ATTENTION_FUNCTIONS.get("sdpa")
    if getattr(current, "_dlm_prefix_protocol", None) == _PREFIX_PROTOCOL:
        return True
    if current is not sdpa_attention_forward:
        return False
    AttentionInterface.register("sdpa", _sdpa_with_prefix)
    return ALL_ATTENTION_FUNCTIONS.get("sdpa") is _sdpa_with_prefix


# --------------------------------------------------------------------------- modules


class DLMHead(nn.Module):
    """Projection Linear(H, H, no bias) -> GELU(tanh) -> Linear(H, V, with bias); input is already normed."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(self.projection(hidden_states), approximate="tanh"))


def _tag_reference_init(model: nn.Module, config: LlamaConfig) -> None:
    """Attach the reference trainer's init std to each weight (read back by ``_init_weights``).

    sigma = sqrt(2/(5H)) for q, k, v, gate, up and the head projection; sqrt(2/(H+V)) for the
    embedding and output layer; zero for attention-output and down projections; layer l's up and
    gate scaled by sqrt(1/(2(l+1))). Truncation at +-2 sigma happens in ``_init_weights``.
    """
    for module in model.modules():  # LlamaModel's own post_init already ran its default init; redo it ours
        module.__dict__.pop("_is_hf_initialized", None)
    hidden, vocab = config.hidden_size, config.vocab_size
    std_in = math.sqrt(2.0 / (5 * hidden))
    std_vocab = math.sqrt(2.0 / (hidden + vocab))
    trunk = model.model
    trunk.embed_tokens._dlm_std = std_vocab
    for idx, layer in enumerate(trunk.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj._dlm_std = std_in
        attn.o_proj._dlm_std = 0.0
        mlp.gate_proj._dlm_std = mlp.up_proj._dlm_std = std_in * math.sqrt(1.0 / (2 * (idx + 1)))
        mlp.down_proj._dlm_std = 0.0
    head = getattr(model, "lm_head", None)
    if head is not None:
        head.projection._dlm_std = std_in
        head.output._dlm_std = std_vocab


class _ReferenceInit:
    """``_init_weights`` that honours the ``_dlm_std`` tags; used by the trunk and the full models alike."""

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(module, "_dlm_std", None)
        if std is None:
            super()._init_weights(module)
            return
        if std == 0.0:
            init.zeros_(module.weight)
        else:
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)


class DLMLlamaModel(_ReferenceInit, LlamaModel):
    """Exactly ``LlamaModel``; only its initialisation follows the reference trainer."""


def _eager() -> bool:
    """Whether this call runs eagerly: not traced by ``torch.compile`` or ``torch.export``."""
    return not torch.compiler.is_compiling()


def _known_all_true(flags: torch.Tensor) -> bool:
    """True when ``flags`` are all True and the call runs eagerly. Under compilation and export the
    answer is False, so the general path (a mask that happens to allow everything) is traced: the
    same outputs, no branch on a tensor's value."""
    return _eager() and bool(flags.all())


# --------------------------------------------------------------------------- the reference trainer's names

# reference tensor name inside layer N -> ours (``model.layers.N.`` + the value)
REFERENCE_LAYER_NAMES = {
    "attention.pre_norm.weight": "input_layernorm.weight",
    "attention.qkv_proj.weights.0": "self_attn.q_proj.weight",
    "attention.qkv_proj.weights.1": "self_attn.k_proj.weight",
    "attention.qkv_proj.weights.2": "self_attn.v_proj.weight",
    "attention.out_proj.weight": "self_attn.o_proj.weight",
    "mlp.pre_norm.weight": "post_attention_layernorm.weight",
    "mlp.up_proj.weights.0": "mlp.up_proj.weight",  # W0: the linear half of SwiGLU
    "mlp.up_proj.weights.1": "mlp.gate_proj.weight",  # W1: the gate, passed through silu
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
REFERENCE_GLOBAL_NAMES = {
    "embedding.word_embedding.weight": "model.embed_tokens.weight",
    "classifier.pre_norm.weight": "model.norm.weight",
    "classifier.projection.weight": "lm_head.projection.weight",
    "classifier.emb2vocab.weight": "lm_head.output.weight",
    "classifier.emb2vocab.bias": "lm_head.output.bias",
}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, as the reference's checkpoints may hold


def reference_key_mapping() -> dict[str, str]:
    """``from_pretrained``'s ``key_mapping``: regexes that rename the reference trainer's tensor names
    (behind any DDP or compile prefixes) to ours; they match none of our own names."""
    wrapped = "^(?:" + "|".join(p.replace(".", r"\.") for p in WRAPPER_PREFIXES) + ")*"
    mapping = {f"{wrapped}{_escaped(k)}$": v for k, v in REFERENCE_GLOBAL_NAMES.items()}
    for theirs, ours in REFERENCE_LAYER_NAMES.items():
        mapping[rf"{wrapped}encoder\.layers\.(\d+)\.{_escaped(theirs)}$"] = rf"model.layers.\1.{ours}"
    return mapping


def _escaped(name: str) -> str:
    return name.replace(".", r"\.")


class DLMLlamaPreTrainedModel(_ReferenceInit, LlamaPreTrainedModel):
    """Shared plumbing: the LlamaModel trunk, attention modes, reference init, self-contained saving."""

    default_attention_mode = "causal"
    _new_heads: tuple[str, ...] = ()  # prefixes of head tensors that a model folder may lack (trained first here)
    _dropped: tuple[str, ...] = ()  # prefixes of folder tensors this class has no use for

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, but never a silent random initialisation: a weight the
        folder lacks (a task head being trained for the first time excepted) or a tensor this class
        does not know raises one error naming them. Weights stored under the reference trainer's
        names load too (``reference_key_mapping``, the renaming ``convert-reference`` applies)."""
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("key_mapping", reference_key_mapping())
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(cls._new_heads))
        unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(cls._dropped))
        if missing or unexpected:
            found = [
                f"missing {_listed(missing)}" if missing else "",
                f"unexpected {_listed(unexpected)}" if unexpected else "",
            ]
            raise ValueError(
                f"{cls.__name__}: the checkpoint does not match this model ({'; '.join(f for f in found if f)}); "
                "refusing to fill the gap with random weights"
            )
        return (model, info) if wants_info else model

    def _mode_for(self, attention_mode: str | None, prefix_lengths, row_causal, batch: int) -> str:
        """The call's pattern: ``resolve_mode``'s, or from ``row_causal`` causal, bidirectional or per-row."""
        if row_causal is None:
            return resolve_mode(attention_mode, prefix_lengths, self.default_attention_mode)
        if attention_mode is not None or prefix_lengths is not None:
            raise ValueError("row_causal sets each row's pattern; pass it without attention_mode and prefix_lengths")
        if row_causal.dtype != torch.bool or tuple(row_causal.shape) != (batch,):
            raise ValueError(
                f"row_causal must be a BoolTensor [B={batch}], "
                f"got {row_causal.dtype} of shape {tuple(row_causal.shape)}"
            )
        if _known_all_true(row_causal):  # one pattern for the whole batch takes that pattern's own (faster) path
            return "causal"
        return "bidirectional" if _known_all_true(~row_causal) else _PER_ROW

    def run_trunk(
        self,
        *,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        attention_mode: str | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        row_causal: torch.BoolTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the LlamaModel trunk (final norm included) under the requested attention pattern.

        The one entry of every forward and of callers that want hidden states (objectives, scoring);
        keyword-only, so each caller names what it passes. The pattern is ``attention_mode`` (with
        ``prefix_lengths``) for the whole batch, or ``row_causal`` [B] per row: causal where True,
        bidirectional where False.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch, q_len = ref.shape[0], ref.shape[1]
        kwargs.pop("return_dict", None)  # the trunk's output is read by name; the forwards honour return_dict
        mode = self._mode_for(attention_mode, prefix_lengths, row_causal, batch)
        past_len = cache.get_seq_length() if cache is not None else 0
        self._check_inputs(batch, q_len, past_len, attention_mask, prefix_lengths, document_ids, position_ids)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # left padding: rotary positions count real tokens only, so padding never shifts logits
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        plain_causal = mode == "causal" and document_ids is None
        _check_prefix_mask(mode, attention_mask, prefix_lengths, past_len)
        shared = self._shared_prefix(mode, q_len, past_len, attention_mask, prefix_lengths, document_ids)
        if shared is not None:  # one prefix length, nothing padded: unmasked kernels (prefix_attention)
            attention_mask, kwargs["dlm_prefix_length"] = None, shared
        elif not plain_causal and (attention_mask is None or attention_mask.dim() == 2):
            allowed = self._allowed(mode, row_causal, ref, past_len, attention_mask, prefix_lengths, document_ids)
            if self.config._attn_implementation == "sdpa" and _known_all_true(allowed):
                # everything visible: no mask at all lets SDPA pick its fastest kernel
                attention_mask, kwargs["is_causal"] = None, False
            else:
                attention_mask = self._mask_for_backend(allowed)
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    split_prefix_attention = True  # False: prefix mode always takes the dense mask (the slow twin)

    def _shared_prefix(self, mode, q_len, past_len, attention_mask, prefix_lengths, document_ids) -> int | None:
        """The prefix length P of a prefix-mode call that ``prefix_attention`` runs without a mask, else None:
        sdpa backend, run eagerly, one P for every row, no padding, no documents, nothing cached before."""
        if (
            mode != "prefix"
            or not self.split_prefix_attention
            or self.config._attn_implementation != "sdpa"
            or not _eager()
            or document_ids is not None
            or past_len != 0
            or prefix_lengths.numel() == 0
        ):
            return None
        if attention_mask is not None and (attention_mask.dim() != 2 or not _known_all_true(attention_mask.bool())):
            return None
        if not _known_all_true(prefix_lengths == prefix_lengths[0]) or not _prefix_kernels_ready():
            return None
        return int(prefix_lengths[0])

    @staticmethod
    def _allowed(mode, row_causal, ref, past_len, attention_mask, prefix_lengths, document_ids) -> torch.Tensor:
        """Boolean [B, 1, T, P+T] visibility of a call whose pattern needs a mask (``ref``: ids or embeddings)."""
        batch, q_len = ref.shape[0], ref.shape[1]
        if mode == _PER_ROW:
            return allowed_attention_per_row(row_causal, q_len, past_len, attention_mask, document_ids, ref.device)
        return allowed_attention(mode, batch, q_len, past_len, attention_mask, prefix_lengths, document_ids, ref.device)

    def _mask_for_backend(self, allowed: torch.Tensor) -> torch.Tensor:
        impl = self.config._attn_implementation
        if impl == "sdpa":
            return allowed
        if impl == "eager":
            return to_attention_bias(allowed, self.model.embed_tokens.weight.dtype)
        raise ValueError(f"attention implementation {impl!r} cannot take non-causal masks; use 'sdpa' or 'eager'")

    def _check_inputs(self, batch, q_len, past_len, attention_mask, prefix_lengths, document_ids, position_ids):
        """Shapes always; values (positions, prefix lengths) only outside compilation and export, where a
        branch on a tensor's value would break the graph. With explicit ``position_ids`` (a packed,
        padding-free row) the positions are checked, not the row's length."""
        limit = self.config.max_position_embeddings
        if position_ids is None and isinstance(past_len, int) and past_len + q_len > limit:
            raise ValueError(
                f"sequence of {past_len + q_len} tokens is longer than the position limit "
                f"max_position_embeddings={limit}; truncate the input"
            )
        if position_ids is not None and position_ids.numel() and _eager() and int(position_ids.max()) >= limit:
            raise ValueError(
                f"position_ids reach {int(position_ids.max())}, past the position limit "
                f"max_position_embeddings={limit}; truncate the input"
            )
        mask_2d = attention_mask is not None and attention_mask.dim() == 2
        if mask_2d and tuple(attention_mask.shape) != (batch, past_len + q_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past_len + q_len)}"
            )
        if prefix_lengths is not None:
            if prefix_lengths.dim() != 1 or prefix_lengths.shape[0] != batch:
                raise ValueError(
                    f"prefix_lengths must be a LongTensor [B={batch}], got shape {tuple(prefix_lengths.shape)}"
                )
            if _eager() and (bool((prefix_lengths < 0).any()) or bool((prefix_lengths > past_len + q_len).any())):
                raise ValueError(
                    f"prefix_lengths must lie in [0, {past_len + q_len}] (the sequence length), "
                    f"got {prefix_lengths.tolist()}"
                )
        if document_ids is not None:
            if past_len:
                raise ValueError("document_ids cannot be combined with a KV cache; run the packed batch in one pass")
            if tuple(document_ids.shape) != (batch, q_len):
                raise ValueError(
                    f"document_ids must have the shape of input_ids {(batch, q_len)}, got {tuple(document_ids.shape)}"
                )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config as transformers does, plus this modeling file and an ``auto_map``."""
        self.config.auto_map = dict(AUTO_MAP)
        self.config.custom_pipelines = {k: dict(v) for k, v in CUSTOM_PIPELINES.items()}
        # always under our names: weights loaded from the reference's names are not renamed back on save
        kwargs.setdefault("save_original_format", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        for name in (MODELING_FILE, PIPELINE_FILE):  # the pipeline file lies beside this one
            source, target = Path(__file__).with_name(name), Path(save_directory) / name
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)


class _OnePassForward:
    """The forward shared by the masked LM and the sequence and token classifiers: one pass without a
    cache, the trunk under the requested pattern, then the class's ``_head_outputs``."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mode: str | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        outputs = self.run_trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            attention_mode=attention_mode,
            prefix_lengths=prefix_lengths,
            document_ids=document_ids,
            **kwargs,
        )
        return self._head_outputs(outputs, labels, input_ids, attention_mask, **kwargs)


def weighted_next_token_loss(logits: torch.Tensor, shift_labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j w_j CE_j / (B x T) over positions with a label (-100: none): the reference trainer's AR
    (w = AR weight) and MD (w = 1 / t~) losses, normalised by every position of the batch."""
    if shift_labels is None or shift_labels.shape != logits.shape[:2] or weights.shape != logits.shape[:2]:
        raise ValueError("label_weights needs shift_labels, both of the logits' shape [B, T]")
    ce = F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten(), reduction="none", ignore_index=-100)
    return (weights.flatten().float() * ce).sum() / shift_labels.numel()


class _DLMWithLMHead(DLMLlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = DLMLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = DLMHead(config)
        _tag_reference_init(self, config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.output

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.output = new_embeddings


class DLMLlamaForCausalLM(_DLMWithLMHead, GenerationMixin):
    """Causal LM by default; ``attention_mode`` / ``prefix_lengths`` / ``document_ids`` select other patterns.

    ``labels`` gives the shifted next-token cross-entropy exactly as ``LlamaForCausalLM``.
    ``shift_labels`` (aligned with the logits) with ``label_weights`` [B, T] and ``row_causal`` [B] gives
    the dual objective's weighted loss, sum w CE / (B x T), each row causal or bidirectional: what
    ``dual_lm.DualObjectiveCollator`` feeds it under ``Trainer``.
    """

    default_attention_mode = "causal"

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        attention_mode: str | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        past_key_values=None,
        label_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.run_trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            attention_mode=attention_mode,
            prefix_lengths=prefix_lengths,
            document_ids=document_ids,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if label_weights is not None:
            loss = weighted_next_token_loss(logits, shift_labels, label_weights)
        elif labels is not None or shift_labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, shift_labels=shift_labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def generate(self, inputs=None, *args, prefix_attention: bool = False, **kwargs):
        """transformers' ``generate``; ``prefix_attention=True`` encodes the whole prompt bidirectionally
        once and then decodes causally from that KV cache (left padding stays invisible)."""
        if prefix_attention:
            ids = inputs if inputs is not None else kwargs["input_ids"]
            kwargs["prefix_lengths"] = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        return super().generate(inputs, *args, **kwargs)


class DLMLlamaForMaskedLM(_OnePassForward, _DLMWithLMHead):
    """Bidirectional (MNTP) LM: logits[:, i] predict token i+1, so a ``<mask>`` at i is read at i-1.

    ``labels`` [B, T] follow transformers' MLM convention: aligned with ``input_ids`` (the original
    token where the input is masked, -100 elsewhere), as ``DataCollatorForLanguageModeling(mlm=True)``
    makes them. The next-token shift is applied inside, as ``LlamaForCausalLM`` does for causal labels:
    the label at i is the target of the logits at i-1. Labels already aligned with the logits go in
    ``shift_labels`` instead (transformers' keyword for exactly that).
    """

    default_attention_mode = "bidirectional"

    def _head_outputs(self, outputs, labels, input_ids, attention_mask, **kwargs) -> MaskedLMOutput:
        if _eager():  # frame inspection cannot be traced; a compiled pipeline is not the stock one anyway
            _warn_if_stock_fill_mask()
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = ForCausalLMLoss(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


STOCK_FILL_MASK_WARNING = (
    "transformers' stock FillMaskPipeline reads the prediction at the <mask> position, but this MNTP "
    "model predicts the token at position i from position i-1: its answers are wrong. Load the pipeline "
    "from the model folder instead: pipeline('fill-mask', model=FOLDER, trust_remote_code=True), or pass "
    "pipeline_class=dual_lm.MNTPFillMaskPipeline"
)


def _warn_if_stock_fill_mask(depth: int = 8) -> None:
    """Warn (once per process, through ``warnings``) when transformers' own ``FillMaskPipeline`` calls
    this model: a caller frame whose ``self`` is such a pipeline, not the folder's MNTP subclass."""
    import sys
    import warnings

    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return
        caller = frame.f_locals.get("self")
        names = {c.__name__ for c in type(caller).__mro__}
        if "FillMaskPipeline" in names and not getattr(caller, "reads_before_mask", False):
            warnings.warn(STOCK_FILL_MASK_WARNING, UserWarning, stacklevel=2)
            return
        frame = frame.f_back


def _listed(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} tensor(s): {', '.join(names[:shown])}{more}"


class _DLMTaskModel(DLMLlamaPreTrainedModel):
    """Task heads read the final-normed trunk states; attention from ``config.dlm_task_attention``."""

    _new_heads = ("score.", "qa_outputs.")  # a task head starts from the reference initialisation
    _dropped = ("lm_head.",)  # an LM folder's head: a task model has none

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = DLMLlamaModel(config)
        _tag_reference_init(self, config)

    @property
    def default_attention_mode(self) -> str:
        return getattr(self.config, "dlm_task_attention", "bidirectional")

    def _tag_head(self, layer: nn.Linear) -> None:
        layer._dlm_std = math.sqrt(2.0 / (5 * self.config.hidden_size))


class DLMLlamaForSequenceClassification(_OnePassForward, _DLMTaskModel):
    """Pools the state of the last real token (as ``LlamaForSequenceClassification``) into ``score``.

    The last real token is the last position where ``attention_mask`` is 1, else the last token
    that is not ``pad_token_id``. With bidirectional attention (the default) it has seen the
    whole sequence.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self._tag_head(self.score)
        self.post_init()

    def _head_outputs(self, outputs, labels, input_ids, attention_mask, **kwargs) -> SequenceClassifierOutputWithPast:
        logits = self.score(outputs.last_hidden_state)  # [B, T, C]
        last = self._last_real_token(input_ids, attention_mask, logits)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _last_real_token(self, input_ids, attention_mask, logits) -> torch.Tensor:
        positions = torch.arange(logits.shape[1], device=logits.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.to(logits.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(logits.device) != self.config.pad_token_id
        else:
            return torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device)
        return (positions * real).argmax(-1)


class DLMLlamaForTokenClassification(_OnePassForward, _DLMTaskModel):
    """Per-token labels from dropout + ``score`` on each trunk state, as ``LlamaForTokenClassification``."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, self.num_labels)
        self._tag_head(self.score)
        self.post_init()

    def _head_outputs(self, outputs, labels, input_ids, attention_mask, **kwargs) -> TokenClassifierOutput:
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class DLMLlamaForQuestionAnswering(_DLMTaskModel):
    """Extractive QA: ``qa_outputs`` gives start and end logits per token, as ``LlamaForQuestionAnswering``."""

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._tag_head(self.qa_outputs)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        attention_mode: str | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        outputs = self.run_trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            attention_mode=attention_mode,
            prefix_lengths=prefix_lengths,
            document_ids=document_ids,
            **kwargs,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "ATTENTION_MODES",
    "DLMHead",
    "DLMLlamaForCausalLM",
    "DLMLlamaForMaskedLM",
    "DLMLlamaForQuestionAnswering",
    "DLMLlamaForSequenceClassification",
    "DLMLlamaForTokenClassification",
    "DLMLlamaPreTrainedModel",
    "allowed_attention",
    "allowed_attention_per_row",
    "prefix_attention",
    "resolve_mode",
    "to_attention_bias",
]
