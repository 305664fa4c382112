"""``dual-lm train``: the dual-objective training loop (single process or under torchrun with DDP).

The loop knows neither the model nor the losses: it draws batches from the packed loader,
decides which rows (or, by ranks, which whole ranks) run AR and which MD, calls the
``DualObjective`` module, steps Muon + AdamW under the warmup-stable-decay schedule, and logs,
validates and checkpoints. Every random draw comes from the loader state or from one generator
per rank that is checkpointed, so a resumed run continues exactly where the killed one was.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dual_lm import __version__
from dual_lm.atomic import write_json_atomic
from dual_lm.config import CONTEXT, SEED_STRIDE, TrainConfig, config_from_dict, llama_config, run_identity
from dual_lm.data.loader import PackedLoader, TokenShards
from dual_lm.errors import UserError
from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM
from dual_lm.training.checkpoint import (
    DamagedCheckpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from dual_lm.training.dist import DistInfo, all_keys, barrier, init_distributed, shutdown, sum_across_ranks
from dual_lm.training.objectives import DualObjective, md_ranks, rank_runs_md, rotation_epoch, rows_for_ar
from dual_lm.training.optim import build_optimizer, set_lr_factor, wsd_lr_factor
from dual_lm.training.origins import (
    check_same_past,
    check_same_tokenizer,
    first_difference,
    identity_but_schedule,
    init_weights,
    with_init_shape,
)
from dual_lm.training.runfolder import check_started_alike, own_run, remove_run_leftovers
from dual_lm.training.runlog import VAL_KEYS, MetricsLog

EVAL_SEED = 1234
TRAINER_KEYS = ("optimizer", "loader", "generators", "torch_rng", "pending", "world_size")


@dataclass(frozen=True)
class Plan:
    """What a config means on this world: accumulation steps, MD ranks (m of every d), tokens per step."""

    accumulation: int
    md_ranks: tuple[int, int] | None  # (m, d) with 1 - alpha = m/d, for objective.alpha_mode=ranks
    tokens_per_step: int


def make_plan(cfg: TrainConfig, info: DistInfo) -> Plan:
    """Validate the config (``TrainConfig.validate``), then against the world size and the schedule;
    one clear error for each impossible setting."""
    cfg.validate()
    o, t = cfg.objective, cfg.train
    micro_tokens = t.micro_batch_rows * cfg.data.seq_len * info.world_size
    if t.global_batch_tokens % micro_tokens:
        raise UserError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of micro_batch_rows x seq_len x "
            f"world_size = {t.micro_batch_rows} x {cfg.data.seq_len} x {info.world_size} = {micro_tokens}"
        )
    ranks = None
    if o.alpha_mode == "ranks":
        try:
            ranks = md_ranks(o.alpha, info.world_size)
            rotation_epoch(0, t.steps, cfg.data.repetitions)
        except ValueError as err:
            raise UserError(f"objective.alpha_mode=ranks: {err}") from None
    try:
        wsd_lr_factor(0, t.steps, cfg.optim.warmup, cfg.optim.decay, cfg.optim.decay_kind)
    except ValueError as err:
        raise UserError(f"optim schedule: {err}") from None
    if t.fsdp and not info.distributed:
        raise UserError("train.fsdp=true shards over ranks: launch with torchrun --nproc_per_node=2 or more")
    return Plan(t.global_batch_tokens // micro_tokens, ranks, t.global_batch_tokens)


def compute_dtype(cfg: TrainConfig, info: DistInfo) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if info.device.type == "cuda" else torch.float32
    return getattr(torch, cfg.train.dtype)


def summarise(sums: dict[str, float], seq_len: int) -> dict[str, float]:
    """Per-objective metrics from summed statistics (see ``DualObjective``)."""
    out: dict[str, float] = {}
    for name in ("ar", "md"):
        targets = sums.get(f"{name}_targets", 0.0)
        if not targets:
            continue
        out[f"{name}_nll"] = sums[f"{name}_ce"] / targets
        out[f"{name}_acc"] = sums[f"{name}_correct"] / targets
        out[f"{name}_loss"] = sums[f"{name}_weighted"] / (sums[f"{name}_rows"] * seq_len)
        out[f"{name}_tokens"] = targets
        out[f"{name}_rows"] = sums[f"{name}_rows"]
    return out


class Trainer:
    """One training run: build everything from the config, optionally resume, then ``fit``."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.plan = make_plan(cfg, info)
        self.run_dir = Path(cfg.output)
        self.shards = TokenShards(cfg.data.path)
        tokenizer = Path(cfg.data.path) / "tokenizer.json"
        self.tokenizer = tokenizer if tokenizer.is_file() else None
        vocab = self.shards.manifest["vocab_size"]
        torch.manual_seed(cfg.train.seed)
        shape = cfg.model.shape(vocab, max(cfg.data.seq_len, CONTEXT))
        if shape.vocab_size < vocab:
            raise UserError(f"model.vocab_size={shape.vocab_size} is smaller than the data's vocabulary ({vocab})")
        with info.device:  # initialise on the device: a 470M model takes ~25 s to initialise on a CPU
            self.model = DLMLlamaForCausalLM(llama_config(shape))
        if cfg.train.activation_checkpointing:  # per decoder layer, recomputed in the backward pass
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.compile:
            self.model.model.compile()
        self.objective = DualObjective(self.model, cfg.objective)
        self.wrapped = self._wrap(self.objective)
        self.optimizer, self.group_table = build_optimizer(
            self.model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, ns_dtype=cfg.optim.ns_dtype
        )
        self.loader = PackedLoader(
            self.shards,
            cfg.data.seq_len,
            cfg.train.micro_batch_rows,
            cfg.data.repetitions,
            cfg.train.seed,
            info.rank,
            info.world_size,
        )
        self.generator = torch.Generator().manual_seed(cfg.train.seed * SEED_STRIDE + info.rank)
        self.valid = self._valid_shards()
        self.step = 0
        self.pending: dict[str, float] = {}
        self.dtype = compute_dtype(cfg, info)

    def _wrap(self, module):
        if not self.info.distributed:
            return module
        if self.cfg.train.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.model.layers:
                fully_shard(layer)
            fully_shard(self.model.model)  # embedding and final norm
            fully_shard(self.model.lm_head)  # the objective calls the head on its own
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _valid_shards(self) -> TokenShards | None:
        valid = TokenShards(self.cfg.data.path, "valid")
        if valid.num_tokens < self.cfg.data.seq_len:  # one packed row needs seq_len (input, target) pairs
            return None
        return valid

    # ------------------------------------------------------------------ state
    def _full_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self) -> dict:
        """Full, unsharded weights (a collective under FSDP: every rank calls it)."""
        if not self.cfg.train.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._full_options())

    def optimizer_state(self) -> dict:
        if not self.cfg.train.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=self._full_options())

    def load_states(self, weights: dict, optimizer: dict | None) -> None:
        """Full weights and, unless None (a fresh optimiser), the optimiser state, on every rank."""
        if not self.cfg.train.fsdp:
            self.model.load_state_dict(weights)
            if optimizer is not None:
                self.optimizer.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.model, weights, options=self._full_options())
        if optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=self._full_options())

    def trainer_state(self) -> dict:
        generators = self._gather(self.generator.get_state())
        return {
            "optimizer": self.optimizer_state(),
            "loader": self.loader.state_dict(),
            "generators": generators,
            "torch_rng": torch.get_rng_state(),
            "pending": dict(self.pending),
            "world_size": self.info.world_size,
        }

    def _gather(self, obj):
        if not self.info.distributed:
            return [obj]
        import torch.distributed as tdist

        out: list = [None] * self.info.world_size
        tdist.all_gather_object(out, obj)
        return out

    def resume(self) -> bool:
        """Load the newest checkpoint of the run that reads back whole; False when there is none."""
        found = list_checkpoints(self.run_dir)
        if not found:
            return False
        try:
            step, loaded = self._newest_readable(found)
            failure = None
        except UserError as err:
            step, failure = -1, err
        self._agree_on_step(step)
        if failure is not None:
            raise failure
        self._load(step, *loaded[:2])
        return True

    def start(self) -> str:
        """Start a run that has no checkpoint of its own: from ``train.decay_from``'s checkpoint, from
        ``model.init_from``'s weights (a fresh optimiser at step 0) or as initialised; says which."""
        if self.cfg.train.decay_from:
            path, step, loaded, failure = None, -1, None, None
            try:
                path = resolve_checkpoint(self.cfg.train.decay_from)
                loaded = load_checkpoint(path)
                self._check_same_run(path, loaded[2])
                self._check_fits(path, *loaded)
                check_same_tokenizer(path, Path(self.cfg.data.path), "train.decay_from")
                step = loaded[2]["step"]
                if step >= self.cfg.train.steps:
                    raise UserError(f"{path} has taken {step} updates already: train.steps={step} leaves none to take")
            except UserError as err:
                failure = err
            self._agree_on_step(step)  # every rank branches from the same checkpoint, or all stop together
            if failure is not None:
                raise failure
            self._load(step, *loaded[:2])
            return f"continuing from {path} (step {self.step})"
        if self.cfg.model.init_from:
            weights = init_weights(self.cfg.model.init_from)
            self._check_weights(Path(self.cfg.model.init_from) / "model.safetensors", weights)
            self.load_states(weights, None)
            return f"starting from the weights of {self.cfg.model.init_from}"
        return "starting from step 0"

    def _load(self, step: int, weights: dict, state: dict) -> None:
        self.load_states(weights, state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["generators"][self.info.rank])
        torch.set_rng_state(state["torch_rng"])
        self.pending = dict(state["pending"])
        self.step = step

    def _agree_on_step(self, step: int) -> None:
        """Every rank must resume from the same step (a rank-local read error would otherwise leave the
        ranks in different collectives): one all-reduce, and the same error on every rank if not."""
        sums = sum_across_ranks({"ranks": 1.0, "step": float(step), "square": float(step) ** 2}, self.info)
        mean = sums["step"] / sums["ranks"]
        if sums["square"] / sums["ranks"] - mean**2 > 1e-6:
            raise UserError(
                f"the ranks found different newest readable checkpoints in {self.run_dir}; "
                "check that every rank sees the same run folder"
            )

    def _newest_readable(self, found: list[tuple[int, Path]]) -> tuple[int, tuple[dict, dict, dict]]:
        """The newest checkpoint whose files read back and fit this model, saying which newer ones were
        skipped and why (a kill or a full disk while it was copied, bit rot); one line when none does."""
        skipped = []
        for step, path in reversed(found):
            try:
                loaded = load_checkpoint(path)
                self._check_same_run(path, loaded[2])
                self._check_fits(path, *loaded)
            except DamagedCheckpoint as err:
                skipped.append(f"{path.name}: {err}")
                continue
            if skipped and self.info.is_main:
                note = f"resuming from {path.name}, the newest readable checkpoint; skipped {'; '.join(skipped)}"
                print(note, file=sys.stderr)
            return step, loaded
        raise UserError(
            f"none of the {len(found)} checkpoint(s) of {self.run_dir} reads back (newest, {skipped[0]}); "
            "train again into a new output"
        )

    def _check_same_run(self, path: Path, meta: dict) -> None:
        """Another config is the user's mistake, not damage: refused, never skipped. Only the schedule
        may differ, when the updates already taken keep their learning rates (``origins``)."""
        found = first_difference(identity_but_schedule(meta["config"]), identity_but_schedule(self.cfg.to_dict()))
        if found is not None:
            key, then, now = found
            raise UserError(
                f"{path} was written with another config ({key}={then!r} there, {now!r} now); continue it "
                "with the same config and overrides"
            )
        if run_identity(meta["config"]) != run_identity(self.cfg.to_dict()):
            check_same_past(config_from_dict(meta["config"]), self.cfg, meta["step"], str(path))

    def _check_fits(self, path: Path, weights: dict, state: dict, meta: dict) -> None:
        """A checkpoint whose files parse but hold other tensors or too little state is damaged too."""
        missing = [k for k in TRAINER_KEYS if k not in state]
        if missing:
            raise DamagedCheckpoint(f"{path / 'trainer.pt'} lacks {', '.join(missing)}")
        if state["world_size"] != self.info.world_size:
            raise UserError(f"{path} was written by {state['world_size']} rank(s); resume with the same world size")
        self._check_weights(path / "model.safetensors", weights)

    def _check_weights(self, where: Path, weights: dict) -> None:
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in weights.items()}
        if found != expected:
            wrong = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
            raise DamagedCheckpoint(f"{where} does not hold this model's tensors ({wrong[0]})")

    def checkpoint(self) -> None:
        state, weights = self.trainer_state(), self.model_state()
        if self.info.is_main:
            meta = {
                "config": self.cfg.to_dict(),
                "version": __version__,
                "tokens": self.step * self.plan.tokens_per_step,
            }
            save_checkpoint(self.run_dir, self.step, weights, state, meta, self.tokenizer)
            keep = self.cfg.checkpoint
            prune_checkpoints(self.run_dir, keep.keep_last, keep.exponential, upto=self.step)
        barrier(self.info)

    # ------------------------------------------------------------------ steps
    def ar_rows_for(self, batch) -> torch.Tensor:
        rows = batch.inputs.shape[0]
        if self.plan.md_ranks is None:
            return rows_for_ar(rows, self.cfg.objective.alpha, self.generator)
        # the reference's rotation: its epoch counts optimiser steps, not data passes (the loader's batch.epoch)
        epoch = rotation_epoch(self.step, self.cfg.train.steps, self.cfg.data.repetitions)
        md = rank_runs_md(epoch, self.info.rank, *self.plan.md_ranks)
        return torch.full((rows,), not md, dtype=torch.bool)

    def gradient_sync(self, last: bool):
        """Synchronise gradients only on the last micro-batch of a step."""
        if not self.info.distributed:
            return nullcontext()
        if self.cfg.train.fsdp:
            self.wrapped.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.wrapped.no_sync()

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.dtype)

    def train_step(self) -> float:
        """One optimiser step over ``accumulation`` micro-batches; returns the step's loss."""
        factor = wsd_lr_factor(
            self.step, self.cfg.train.steps, self.cfg.optim.warmup, self.cfg.optim.decay, self.cfg.optim.decay_kind
        )
        set_lr_factor(self.optimizer, factor)
        total = 0.0
        for micro in range(self.plan.accumulation):
            batch = self.loader.next_batch()
            ar_rows = self.ar_rows_for(batch)
            last = micro == self.plan.accumulation - 1
            with self.gradient_sync(last):
                with self.autocast():
                    loss, stats = self.wrapped(
                        batch.inputs.to(self.info.device),
                        batch.targets.to(self.info.device),
                        batch.document_ids.to(self.info.device),
                        ar_rows,
                        self.generator,
                    )
                (loss / self.plan.accumulation).backward()
            total += float(loss.detach()) / self.plan.accumulation
            for key, value in stats.items():
                self.pending[key] = self.pending.get(key, 0.0) + float(value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending["loss_sum"] = self.pending.get("loss_sum", 0.0) + total
        self.pending["steps"] = self.pending.get("steps", 0.0) + 1
        self.pending["lr"] = self.cfg.optim.lr * factor
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """AR and MD losses on the first ``eval.batches`` validation batches (fixed rows and masks)."""
        if self.valid is None:
            return {}
        self.model.eval()
        loader = PackedLoader(self.valid, self.cfg.data.seq_len, self.cfg.train.micro_batch_rows, seed=EVAL_SEED)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        sums: dict[str, float] = {}
        for _ in range(self.cfg.eval.batches):
            batch = loader.next_batch()
            args = [t.to(self.info.device) for t in (batch.inputs, batch.targets, batch.document_ids)]
            rows = batch.inputs.shape[0]
            for ar in (True, False):
                with self.autocast():
                    _, stats = self.objective(*args, torch.full((rows,), ar), generator)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        self.model.train()
        metrics = summarise(sums, self.cfg.data.seq_len)
        return {f"val_{k}": v for k, v in metrics.items() if f"val_{k}" in VAL_KEYS}


def fit(trainer: Trainer, resume: bool) -> dict:
    """Train to ``train.steps``; returns the last logged record."""
    cfg, info = trainer.cfg, trainer.info
    if not resume and list_checkpoints(trainer.run_dir):
        raise UserError(f"{trainer.run_dir} already holds checkpoints; pass --resume or choose another output")
    resumed = resume and trainer.resume()
    if not resumed:
        started = trainer.start()
        if info.is_main and (resume or cfg.train.decay_from or cfg.model.init_from):
            print(f"no checkpoint in {trainer.run_dir}; {started}" if resume else started)
    check_started_alike(trainer.run_dir, cfg, schedule_may_differ=resumed)
    if info.is_main:  # config.json first: from here on the folder is recognisably a run folder
        remove_run_leftovers(trainer.run_dir)
        write_json_atomic(trainer.run_dir / "config.json", cfg.to_dict())
    log = MetricsLog(trainer.run_dir, trainer.step, info.is_main, cfg.log.tensorboard)
    if info.is_main:
        print(trainer.group_table)
    # a with-block: an error (a full disk) ends the bar's line before the one-line message is printed
    with tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step", disable=not info.is_main) as bar:
        last: dict = {}
        clock, tokens_since = time.perf_counter(), 0
        while trainer.step < cfg.train.steps:
            trainer.train_step()
            tokens_since += trainer.plan.tokens_per_step
            step = trainer.step
            final = step == cfg.train.steps
            validate = bool(cfg.eval.every and step % cfg.eval.every == 0) or final
            if step % cfg.log.every == 0 or validate:  # a validation step is logged whatever log.every says
                last = log_record(trainer, tokens_since / max(time.perf_counter() - clock, 1e-9))
                clock, tokens_since = time.perf_counter(), 0
                if validate:
                    last.update(trainer.evaluate())
                log.write(last)
                bar.set_postfix(
                    {k: f"{last[k]:.3f}" for k in ("loss", "ar_nll", "md_loss") if k in last}
                    | {"tok/s": f"{last['tokens_per_s']:,.0f}"}
                )
            if step % cfg.checkpoint.every == 0 or final:
                trainer.checkpoint()
            bar.update(1)
    return last


def log_record(trainer: Trainer, rate: float) -> dict:
    """Sum the pending statistics over ranks into one record and reset them."""
    info = trainer.info
    keys = all_keys(set(trainer.pending), info)
    sums = sum_across_ranks({k: trainer.pending.get(k, 0.0) for k in keys}, info)
    steps = max(sums.pop("steps", 1.0) / info.world_size, 1.0)
    lr = sums.pop("lr", 0.0) / info.world_size
    record = {
        "step": trainer.step,
        "tokens": trainer.step * trainer.plan.tokens_per_step,
        "lr": lr,
        "loss": sums.pop("loss_sum", 0.0) / info.world_size / steps,
        **summarise(sums, trainer.cfg.data.seq_len),
        "tokens_per_s": rate,
    }
    trainer.pending = {}
    return record


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Entry point of ``dual-lm train`` (also under torchrun)."""
    info = init_distributed()
    try:
        make_plan(cfg, info)  # a bad config is refused before the output is touched
        cfg = with_init_shape(cfg)
        with own_run(cfg, info):
            trainer = Trainer(cfg, info)
            return fit(trainer, resume)
    finally:
        shutdown(info)
