"""``dual-lm train``: the dual-objective training loop (single process or under torchrun with DDP).

The loop knows neither the model nor the losses: it draws batches from the packed loader,
decides which rows (or, by ranks, which whole ranks) run AR and which MD, calls the
``DualObjective`` module, steps Muon + AdamW under the warmup-stable-decay schedule, and logs,
validates and checkpoints. Every random draw comes from the loader state or from one generator
per rank that is checkpointed, so a resumed run continues exactly where the killed one was.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dual_lm import __version__, ownership
from dual_lm.atomic import write_json_atomic, write_text_atomic
from dual_lm.checkpoint import (
    DamagedCheckpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_leftovers,
    save_checkpoint,
)
from dual_lm.config import TrainConfig, check_shape, llama_config
from dual_lm.data import PackedLoader, TokenShards
from dual_lm.dist import DistInfo, all_keys, barrier, init_distributed, shutdown, sum_across_ranks
from dual_lm.errors import UserError
from dual_lm.modeling_dlm_llama import DLMLlamaForCausalLM
from dual_lm.objectives import DualObjective, md_ranks, rank_runs_md, rotation_epoch, rows_for_ar
from dual_lm.optim import build_optimizer, set_lr_factor, wsd_lr_factor

EVAL_SEED = 1234
TRAINER_KEYS = ("optimizer", "loader", "generators", "torch_rng", "pending", "world_size")


def run_identity(config: dict) -> dict:
    """What makes two configs the same run: everything but ``output``, so a moved or copied run folder resumes."""
    return {k: v for k, v in config.items() if k != "output"}


@dataclass(frozen=True)
class Plan:
    """What a config means on this world: accumulation steps, MD ranks (m of every d), tokens per step."""

    accumulation: int
    md_ranks: tuple[int, int] | None  # (m, d) with 1 - alpha = m/d, for objective.alpha_mode=ranks
    tokens_per_step: int


def make_plan(cfg: TrainConfig, info: DistInfo) -> Plan:
    """Validate the config against the world size; one clear error for each impossible setting."""
    o, t = cfg.objective, cfg.train
    if not 0.0 <= o.alpha <= 1.0:
        raise UserError(f"objective.alpha must lie in [0, 1], got {o.alpha}")
    for name, value, low, strict in (
        ("optim.lr", cfg.optim.lr, 0.0, True),
        ("optim.weight_decay", cfg.optim.weight_decay, 0.0, False),
        ("objective.ar_weight", o.ar_weight, 0.0, True),
        ("objective.z_loss", o.z_loss, 0.0, False),
    ):
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise UserError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value}")
    try:
        check_shape(cfg.model.shape(1, max(cfg.data.seq_len, 2048)))  # the vocabulary comes from the data
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.checkpoint.keep_last < 0:
        raise UserError(f"checkpoint.keep_last must be >= 0 (0 keeps every checkpoint), got {cfg.checkpoint.keep_last}")
    if o.alpha_mode not in ("rows", "ranks"):
        raise UserError(f"objective.alpha_mode must be 'rows' or 'ranks', got {o.alpha_mode!r}")
    for name, value in (
        ("train.steps", t.steps),
        ("train.micro_batch_rows", t.micro_batch_rows),
        ("data.seq_len", cfg.data.seq_len),
        ("data.repetitions", cfg.data.repetitions),
    ):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if cfg.optim.ns_dtype not in ("float32", "bfloat16"):
        raise UserError(f"optim.ns_dtype must be float32 or bfloat16, got {cfg.optim.ns_dtype!r}")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
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
    for name, value in (
        ("train.global_batch_tokens", t.global_batch_tokens),
        ("log.every", cfg.log.every),
        ("checkpoint.every", cfg.checkpoint.every),
        ("eval.batches", cfg.eval.batches),
    ):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if cfg.eval.every < 0 or t.seed < 0:
        raise UserError("eval.every and train.seed must be >= 0")
    try:
        wsd_lr_factor(0, t.steps, cfg.optim.warmup, cfg.optim.decay, cfg.optim.decay_kind)
    except ValueError as err:
        raise UserError(f"optim schedule: {err}") from None
    if t.fsdp and not info.distributed:
        raise UserError("train.fsdp=true shards over ranks: launch with torchrun --nproc_per_node=2 or more")
    if not cfg.data.path:
        raise UserError("data.path is not set: point it at a `dual-lm prepare-data` folder")
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
        shape = cfg.model.shape(vocab, max(cfg.data.seq_len, 2048))
        with info.device:  # initialise on the device: a 470M model takes ~25 s to initialise on a CPU
            self.model = DLMLlamaForCausalLM(llama_config(shape))
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
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + info.rank)
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

    def load_states(self, weights: dict, optimizer: dict) -> None:
        if not self.cfg.train.fsdp:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.model, weights, options=self._full_options())
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
            step, (weights, state, _) = self._newest_readable(found)
            failure = None
        except UserError as err:
            step, failure = -1, err
        self._agree_on_step(step)
        if failure is not None:
            raise failure
        self.load_states(weights, state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.generator.set_state(state["generators"][self.info.rank])
        torch.set_rng_state(state["torch_rng"])
        self.pending = dict(state["pending"])
        self.step = step
        return True

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
        """Another config is the user's mistake, not damage: refused, never skipped."""
        if run_identity(meta["config"]) != run_identity(self.cfg.to_dict()):
            raise UserError(f"{path} was written with another config; resume with the same config and overrides")

    def _check_fits(self, path: Path, weights: dict, state: dict, meta: dict) -> None:
        """A checkpoint whose files parse but hold other tensors or too little state is damaged too."""
        missing = [k for k in TRAINER_KEYS if k not in state]
        if missing:
            raise DamagedCheckpoint(f"{path / 'trainer.pt'} lacks {', '.join(missing)}")
        if state["world_size"] != self.info.world_size:
            raise UserError(f"{path} was written by {state['world_size']} rank(s); resume with the same world size")
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in weights.items()}
        if found != expected:
            wrong = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
            raise DamagedCheckpoint(f"{path / 'model.safetensors'} does not hold this model's tensors ({wrong[0]})")

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
        return {f"val_{k}": v for k, v in metrics.items() if k in ("ar_nll", "ar_acc", "md_loss", "md_nll", "md_acc")}


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn line (a kill during the append) sorts last and is cut."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON object per logged step; on resume, later lines are cut."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= start_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])


def fit(trainer: Trainer, resume: bool) -> dict:
    """Train to ``train.steps``; returns the last logged record."""
    cfg, info = trainer.cfg, trainer.info
    if resume and not trainer.resume() and info.is_main:
        print(f"no checkpoint in {trainer.run_dir}; starting from step 0")
    if not resume and list_checkpoints(trainer.run_dir):
        raise UserError(f"{trainer.run_dir} already holds checkpoints; pass --resume or choose another output")
    check_started_alike(trainer.run_dir, cfg)
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
            if step % cfg.log.every == 0 or final:
                last = log_record(trainer, tokens_since / max(time.perf_counter() - clock, 1e-9))
                clock, tokens_since = time.perf_counter(), 0
                if (cfg.eval.every and step % cfg.eval.every == 0) or final:
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


def check_started_alike(run_dir: Path, cfg: TrainConfig) -> None:
    """A run folder started with another config (killed before its first checkpoint) is not taken
    over by a fresh start: its config.json and metrics.jsonl would be replaced."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        started = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        started = None
    if not isinstance(started, dict) or run_identity(started) != run_identity(cfg.to_dict()):
        raise UserError(f"{run_dir} was started with another config (see {path}); choose another output")


def remove_run_leftovers(run_dir: Path) -> None:
    """Delete the staging files and folders a killed run left (the caller holds the run's lock, so no
    live process owns them): half-written checkpoints, checkpoints half-deleted by pruning, and the
    temporary files of config.json and metrics.jsonl."""
    removed = remove_leftovers(run_dir)
    for name in ("config.json", "metrics.jsonl"):
        removed += ownership.remove_stale_staging(run_dir / name, tags=("tmp",))
    if removed:
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        print(f"removed what a killed run left in {run_dir}: {names}", file=sys.stderr)


@contextmanager
def own_run(cfg: TrainConfig, info: DistInfo) -> Iterator[None]:
    """Check the output and hold the run's lock for the whole run (rank 0), before anything is written.

    The output must be new, empty or a run folder; a model, data or user folder is refused and left
    as it was. Every rank learns rank 0's outcome through one all-reduce, so a refused run stops on
    all ranks together instead of leaving the others waiting in a collective. A folder this call
    created is removed again if the run fails before writing into it.
    """
    out = Path(cfg.output)
    with ExitStack() as stack:
        refusal: Exception | None = None
        created = False
        if info.is_main:
            try:
                ownership.check_output(out, ownership.RUN, update=True, sources=(cfg.data.path,))
                created = not out.exists()
                stack.enter_context(ownership.exclusive(out, "run"))
            except (UserError, OSError) as err:
                refusal = err
        refused = sum_across_ranks({"refused": float(refusal is not None)}, info)["refused"]
        if refusal is not None:
            raise refusal
        if refused:
            raise UserError(f"rank 0 refused the output {out} (see its message)")
        try:
            yield
        except BaseException:
            if created:
                _remove_if_unused(out)
            raise


def _remove_if_unused(folder: Path) -> None:
    """Remove a folder the run created if it still holds nothing but the lock file."""
    entries = list(folder.iterdir()) if folder.is_dir() else None
    if entries is not None and all(p.name == ownership.LOCK_NAME and p.is_file() for p in entries):
        for p in entries:
            p.unlink()
        folder.rmdir()


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Entry point of ``dual-lm train`` (also under torchrun)."""
    info = init_distributed()
    try:
        make_plan(cfg, info)  # a bad config is refused before the output is touched
        with own_run(cfg, info):
            trainer = Trainer(cfg, info)
            return fit(trainer, resume)
    finally:
        shutdown(info)
