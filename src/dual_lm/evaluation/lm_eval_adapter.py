"""The ``dual-lm`` model for lm-evaluation-harness (optional extra ``lm-eval``).

``--model dual-lm --model_args pretrained=FOLDER,mode=causal|prefix|masked[,mask_n=1,dtype=float32,device=cpu]``.
Importing this module registers the model; unknown model args are an error. ``loglikelihood`` scores
with ``dual_lm.inference.scoring`` (length-bucketed batches); ``loglikelihood_rolling`` uses lm-eval's disjoint
rolling windows sized so that each fits the model's context whole (every token scored once);
``generate_until`` decodes greedily in left-padded batches (causal, prefix) or by masked diffusion
(masked mode) and cuts the text at the first stop string.
"""

from __future__ import annotations

import json
import warnings

import lm_eval.models  # noqa: F401 - lm-eval fills its own registry lazily only while it is empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from dual_lm.config import closest
from dual_lm.errors import UserError
from dual_lm.evaluation.runner import EvalSettings, fit_context, score_all
from dual_lm.folder import load_folder

GENERATION_MODES = {"causal": "causal", "prefix": "prefix", "masked": "diffusion"}


def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def pick_device(device: str | None) -> str:
    """``device``, or the CPU (with a warning) when it names CUDA and none is available: lm-eval's CLI passes
    ``cuda:0`` when no ``--device`` is given, so an explicit request cannot be told from its default."""
    import torch

    if not device:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r}: CUDA is not available; the dual-lm model runs on the CPU", stacklevel=2)
        return "cpu"
    return str(device)


MODEL_ARGS = ("pretrained", "mode", "mask_n", "batch_size", "max_batch_size", "device", "dtype", "max_gen_toks",
              "diffusion_steps")  # fmt: skip


def check_model_args(unknown: dict) -> None:
    """One clear error for model args the adapter does not know, naming the closest valid one."""
    if not unknown:
        return
    hints = [f"{key!r}{closest(key, MODEL_ARGS)}" for key in sorted(unknown)]
    raise UserError(f"unknown dual-lm model_args {', '.join(hints)}; valid: {', '.join(MODEL_ARGS)}")


def count_arg(name: str, value, low: int = 1) -> int:
    """A whole-number model arg (lm-eval passes ``2``, ``2.0`` or ``"2"``), at least ``low``; 2.5, true,
    nan and words are refused rather than rounded or defaulted."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    whole = whole or (isinstance(value, float) and value.is_integer())
    whole = whole or (isinstance(value, str) and value.strip().lstrip("+-").isdigit())
    number = int(value) if whole else None
    if number is None or number < low:
        raise UserError(f"dual-lm model_args {name}={value!r}: expected a whole number >= {low}")
    return number


def batch_size_arg(value) -> int:
    """lm-eval's ``--batch_size``: a number, or ``auto`` / ``auto:N`` (fixed batches of 16 here)."""
    return 16 if str(value).startswith("auto") else count_arg("batch_size", value)


def mode_arg(mode) -> str:
    if mode not in GENERATION_MODES:
        raise UserError(f"dual-lm model_args mode={mode!r}: choose one of {', '.join(GENERATION_MODES)}")
    return mode


@register_model("dual-lm")
class DualLMEval(TemplateLM):
    """A dual-lm model folder scored in one of three modes (DESIGN.md section 4)."""

    def __init__(
        self,
        pretrained: str | None = None,
        mode: str = "causal",
        mask_n: int = 1,
        batch_size: int | str = 16,
        device: str = "cpu",
        dtype: str = "float32",
        max_gen_toks: int = 256,
        diffusion_steps: int | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it; batches are fixed-size here
        **unknown,
    ) -> None:
        super().__init__()
        check_model_args(unknown)  # every arg is checked before the model loads, each with one line
        if pretrained is None or str(pretrained) == "":
            raise UserError("dual-lm model_args need pretrained=FOLDER (a dual-lm model folder with its tokenizer)")
        self.settings = EvalSettings(mode_arg(mode), count_arg("mask_n", mask_n), batch_size_arg(batch_size), True)
        self.max_gen_toks = count_arg("max_gen_toks", max_gen_toks)
        self.diffusion_steps = None if diffusion_steps is None else count_arg("diffusion_steps", diffusion_steps)
        self.model, self.tokenizer = load_folder(str(pretrained), pick_device(device), dtype)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; ``<s>`` is prepended unless asked otherwise or the string already starts with it."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.bos_token)
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [fit_context((list(c), list(w)), self.max_length) for _, c, w in requests]
        settings = EvalSettings(self.settings.mode, self.settings.mask_n, self.settings.batch_size, not disable_tqdm)
        scored = score_all(self.model, pairs, settings, desc=f"dual-lm {self.settings.mode}")
        out = []
        for (key, _, _), s in zip(requests, scored, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
            out.append((s.logprob, s.greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts from lm-eval's disjoint rolling windows (the first after ``<s>``).

        lm-eval sizes a window as ``1 + max_seq_len`` tokens because its backends never feed the last
        token; ``dual_lm.inference.scoring`` feeds every token, so ``max_seq_len`` is the context minus one: each
        window fits whole and every token of the text is scored exactly once.
        """
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            rolling = lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length - 1, 1)
            for context, target in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, target))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _new_tokens(self, requested: int) -> int:
        """Tokens to generate: as asked, but at least 1 and at most ``max_length - 1`` (``<s>`` needs a place)."""
        return max(1, min(int(requested), self.max_length - 1))

    def _fit_prompt(self, context: str, new_tokens: int) -> str:
        """``context``, cut on token ids from the left until its encoding (with ``<s>``) leaves room for
        ``new_tokens``; the check is on the re-encoded text, since decoding can merge or split tokens."""
        room = self.max_length - new_tokens
        ids = self.tokenizer(context)["input_ids"]
        if len(ids) <= room:
            return context
        body = ids[1:] if ids and ids[0] == self.tokenizer.bos_token_id else ids
        keep = room - 1  # <s> comes back when the prompt is encoded again
        while keep > 0:
            prompt = self.tok_decode(body[-keep:])
            if len(self.tokenizer(prompt)["input_ids"]) <= room:
                return prompt
            keep -= 1
        return ""

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched per distinct set of generation arguments, cut at the stop strings."""
        from dual_lm.inference.generation import generate_batch

        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out = [""] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            stops = [until] if isinstance(until, str) else list(until)
            new_tokens = self._new_tokens(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompts = [self._fit_prompt(requests[i].args[0], new_tokens) for i in indices]
            texts = self._generate(generate_batch, prompts, new_tokens)
            for i, text in zip(indices, texts, strict=True):
                out[i] = cut_at_stops(text, [*stops, self.tokenizer.eos_token])
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generate(self, generate_batch, prompts: list[str], new_tokens: int) -> list[str]:
        mode = GENERATION_MODES[self.settings.mode]
        options = {"do_sample": False} if mode != "diffusion" else {"steps": self.diffusion_steps or new_tokens}
        batch = self.settings.batch_size
        return generate_batch(self.model, self.tokenizer, prompts, mode, new_tokens, batch, **options)
