"""The training loop of one rank, the same code for one process and for any layout.

The rank's parts (model shard, pipeline, update strategy) come from the wiring point,
:func:`loom.train.wiring.build_rank`; this file runs them: data, steps, evaluation,
metrics, checkpoints.

One optimizer step of global batch B = micro_batch * grad_accum * dp sequences:
the step's B windows are a pure function of (seed, step) (see ``loom.train.data``);
micro-batch k of data-parallel rank r takes rows [(r * accum + k) * micro, +micro).
The loss of a step is the mean over its B * seq_len tokens, so any split of the batch
gives the same gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from loom import __version__
from loom.config import Config
from loom.distributed.context import DistContext
from loom.errors import LoomError
from loom.optim.lr import lr_at
from loom.parallel.host_allocator import huge_pages_on, set_host_allocator
from loom.parallel.memory import host_and_device_peaks
from loom.parallel.pipeline.simulate import TIMELINE_FILE
from loom.plan.hardware import hardware_of
from loom.plan.layout import Prediction
from loom.plan.model import count_parameters
from loom.plan.report import COMM_GROUPS, measured, predict_run, side_by_side
from loom.train.batches import batch_offsets, batch_rows, get_batch
from loom.train.checkpoint import capture_rng_state, restore_rng_state, set_aside_newer
from loom.train.data import TokenData, prepare_dataset
from loom.train.metrics import LoopClock, MetricsWriter, TrainProgress, make_console, read_metrics, write_summary
from loom.train.numerics import first_non_finite, is_bad
from loom.train.precision import Precision, resolve_device
from loom.train.profiling import StepProfiler
from loom.train.rank_figures import RankFigures
from loom.train.sharded_checkpoint import open_checkpoint, save_sharded
from loom.train.tokenizer import load_tokenizer
from loom.train.wiring import build_rank

TRAIN_STREAM, VAL_STREAM = 0, 1


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool = False


@dataclass
class RunState:
    """What, besides model and optimizer, a resumed run must get back."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_val_loss: float | None = None


class Trainer:
    """Builds tokenizer, data, model and optimizer from a config and runs the loop."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        resume_from: Path | None = None,
        console: Console | None = None,
        live_progress: bool = True,
        dist: DistContext | None = None,
    ) -> None:
        # before the model exists: large host buffers go back to the OS when freed, on huge pages
        set_host_allocator()
        self.huge_pages = huge_pages_on()  # whether it took (loom train sets it before its first tensor)
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = dist or DistContext.single(resolve_device(config.train.device))
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.console = console or make_console()
        self.log = self.console.print if self.is_main else (lambda *_: None)
        self.live_progress = live_progress
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self._fit_vocab()
        self.data = self._prepare_data()
        self.precision = Precision(config.train.precision, self.device)
        rank = build_rank(config, self.dist, self.precision)  # the one place a rank's parts are decided
        self.batch, self.plans, self.tp, self.rng = rank.batch, rank.plans, rank.tp, rank.rng
        self.model, self.pipeline, self.update, self.meter = rank.model, rank.pipeline, rank.update, rank.meter
        self.recompute_note = rank.recompute_note
        self.pp = self.dist.comm("pp")
        self.state = RunState()
        self.bad_steps = 0  # non-finite steps in a row (train.max_bad_steps)
        train = config.train
        self.profiler = StepProfiler(
            train.profile_start,
            train.profile_steps,
            self.run_dir,
            self.dist.rank,
            self.is_main or train.profile_all_ranks,
            self.device.type == "cuda",
            self.log,
        )
        if resume_from is not None:
            self._restore(resume_from)

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> StepResult:
        """Forward/backward over the step's micro-batches, clip, and update."""
        train = self.config.train
        lr = lr_at(step, train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
        offsets = batch_offsets(
            len(self.data.train), train.seq_len, self.batch.global_batch, train.seed, step, TRAIN_STREAM
        )
        accum = self.batch.grad_accum
        dp_rank = self.dist.coords.dp
        self.rng.reseed(train.seed, step, accum)  # dropout: a pure function of (seed, step, micro-batch, site)
        batches = [
            get_batch(
                self.data.train,
                train.seq_len,
                offsets[batch_rows(self.batch.micro_batch, accum, dp_rank, k)],
                self.device,
            )
            for k in range(accum)
        ]
        update, span = self.update, self.profiler.span  # span: a named range while the profiler records
        carried = False
        if self.pipeline is not None:
            # gradients sync once after the whole schedule: backwards of micro-batches interleave
            with update.no_sync(), span("loom.pipeline"):
                total = self.pipeline.step(batches, update.scale_loss, self.profiler.action_span())
        else:
            total = torch.zeros((), device=self.device)
            with update.step_context():  # 1-bit Adam compressing: no gradient sync at all
                for k, (x, y) in enumerate(batches):
                    last = k == accum - 1
                    self.rng.microbatch(k)
                    with contextlib.nullcontext() if last else update.no_sync():
                        with self.precision.autocast(), self.meter.forward(k, alike="model"), span("loom.forward"):
                            loss = self.model.loss(x, y) / accum
                        total += loss.detach().float()
                        carried = last and update.carry(total)  # the mean loss rides in DDP's last bucket
                        with span("loom.backward"):
                            update.scale_loss(loss).backward()
                        self.meter.release(k)
        with span("loom.sync_gradients"):
            update.sync_gradients()  # the dp reduction, then the tp sums and the tied embedding
        # the global batch's mean loss for the log: carried in DDP's last bucket, or reduced with the norm
        max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
        with span("loom.clip"):
            grad_norm = update.clip_grad_norm(max_norm, None if carried else total)
            total_loss = total.item()
        if train.precision != "fp16" and is_bad(total_loss, grad_norm):  # fp16: the loss scaler skips it
            self._bad_step(step, total_loss, grad_norm)
            skipped = True
        else:
            self.bad_steps = 0
            with span("loom.update"):
                skipped = not update.step(lr)
        if self._evaluates(step + 1) or self._saves(step + 1):
            update.settle()  # 0/1 Adam: pending local steps averaged over dp, one model on every rank
        return StepResult(loss=total_loss, grad_norm=grad_norm, lr=lr, skipped=skipped)

    def _evaluates(self, step: int) -> bool:
        """Whether the run evaluates after step ``step`` (1-based): every ``eval_every`` and the last."""
        train = self.config.train
        return bool(train.eval_every and step % train.eval_every == 0) or step == train.steps

    def _saves(self, step: int) -> bool:
        """Whether the run writes a checkpoint after step ``step``: every ``ckpt_every`` and the last."""
        train = self.config.train
        return bool(train.ckpt_every and step % train.ckpt_every == 0) or step == train.steps

    def _bad_step(self, step: int, loss: float, grad_norm: float) -> None:
        """Skip a step whose loss or gradient norm is not finite (every rank sees the same figures);
        stop after ``train.max_bad_steps`` in a row, naming the first non-finite gradient."""
        self.bad_steps += 1
        stage = self.dist.coords.pp
        where = first_non_finite(self.update.gradients(), self.dist.comm("world"), stage, self.device)
        self.update.skip()
        limit = self.config.train.max_bad_steps
        what = f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; first non-finite gradient: {where}"
        if self.bad_steps >= limit:
            raise LoomError(
                f"{what}. That is {self.bad_steps} non-finite steps in a row (train.max_bad_steps = {limit}); "
                "the run stops, its last checkpoint holds only finite values.",
                "lower train.lr, raise train.warmup_steps, turn on train.grad_clip (e.g. 1.0), or train in fp32; "
                "resume from the last checkpoint with --resume.",
            )
        self.log(f"skipped {what} ({self.bad_steps} of train.max_bad_steps = {limit} in a row)")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``eval_batches`` fixed validation micro-batches."""
        train = self.config.train
        self.model.eval()
        batches = []
        for i in range(train.eval_batches):
            offsets = batch_offsets(
                len(self.data.val), train.seq_len, self.batch.micro_batch, train.seed, i, VAL_STREAM
            )
            batches.append(get_batch(self.data.val, train.seq_len, offsets, self.device))
        if self.pipeline is not None:
            loss = self.pipeline.evaluate(batches)
        else:
            losses = []
            for x, y in batches:
                with self.precision.autocast():
                    losses.append(self.model.loss(x, y).float())
            loss = torch.stack(losses).mean()
        self.model.train()
        return loss.item()

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        train = self.config.train
        tokens_per_step = self.batch.global_batch * train.seq_len
        metrics = MetricsWriter(self.run_dir) if self.is_main else None
        if metrics is not None:
            metrics.truncate_after(self.state.step)
        start_step = self.state.step
        huge = ", huge pages" if self.huge_pages else ""
        self.log(
            f"model: {self.config.model.preset} ({self.config.model.family}), {self._describe_params()}; "
            f"batch {self.batch.global_batch} x {train.seq_len} tokens "
            f"(micro {self.batch.micro_batch} x accum {self.batch.grad_accum} x dp {self.batch.dp}); "
            f"{self.dist.dims.describe()}, device {self.device}"
            + (f" ({_count(torch.get_num_threads(), 'thread')}{huge})" if self.device.type == "cpu" else "")
            + f", {train.precision}"
        )
        if (described := self.update.describe()) is not None:
            self.log(described)
        if self.config.train.recompute != "none":
            chunks = [len(plan.layers) for plan in self.plans]
            self.log(self.recompute_note or self.model.recompute.describe(chunks))
        self.prediction = self._predict()
        self.log(self._describe_prediction())
        if start_step:
            self.log(f"resuming at step {start_step} of {train.steps}")
        result = None
        progress = (
            TrainProgress(train.steps, start_step, self.console, live=self.live_progress)
            if self.is_main
            else contextlib.nullcontext()
        )
        self.dist.ledger.take_step_totals()  # setup traffic is not a step's
        # every rank's figures, max and sum, in rank 0's records: gathered in batches of about a second of steps
        figures = RankFigures(self.dist.comm("world"), metrics.log if metrics is not None else None)
        clock = LoopClock()  # tokens_per_s: the loop's whole time per step, evaluation and checkpoints aside
        try:
            with progress:
                for step in range(start_step, train.steps):
                    self.profiler.begin(step + 1)
                    began = time.perf_counter()
                    result = self.train_step(step)
                    step_s = time.perf_counter() - began
                    profiled = self.profiler.end(step + 1)
                    self.state.step = step + 1
                    self.state.tokens_seen += tokens_per_step
                    record = {
                        "step": self.state.step,
                        "loss": result.loss,
                        "lr": result.lr,
                        "grad_norm": result.grad_norm,
                        "tokens": self.state.tokens_seen,
                        "tokens_per_s": None,  # set below: the step's share of the loop (LoopClock)
                        "step_s": step_s,
                        "elapsed_s": None,
                        **self.dist.ledger.take_step_totals(),
                    }
                    if result.skipped:
                        record["skipped"] = True
                    if profiled:  # the profiler slowed it: not the run's speed
                        record["profiled"] = True
                    if self.pipeline is not None:
                        record["bubble_measured"] = self.pipeline.last_timing.bubble
                    record.update(self.update.memory())  # model states: parameters, gradients, optimizer
                    record.update(self.meter.take_step())  # activations saved for backward
                    record.update(host_and_device_peaks(self.device))
                    if self.update.dp_phase is not None:  # what this step sent over dp (plan.report splits on it)
                        record["dp_phase"] = self.update.dp_phase
                    took = clock.lap()
                    self.state.elapsed_s += took
                    record["tokens_per_s"] = tokens_per_step / took
                    record["elapsed_s"] = self.state.elapsed_s
                    if self._evaluates(self.state.step):
                        with clock.aside():
                            self.state.last_val_loss = record["val_loss"] = self.evaluate()
                    figures.add(record)  # written once its batch's gather lands
                    if self._saves(self.state.step):
                        with clock.aside():
                            figures.flush()  # no checkpoint covers a step its record lacks
                            self.save()  # (a resume drops the records past its checkpoint's step)
                    self.dist.ledger.take_step_totals()  # evaluation, checkpoint and metrics traffic is not the step's
                    if self.is_main:
                        progress.update(self.state.step, result.loss, record["tokens_per_s"], result.lr)
                figures.flush()
        except BaseException:
            figures.abandon()  # the last record as this rank has it: a peer may be gone
            raise
        finally:
            self.profiler.close()  # a run stopped inside the profiled steps still writes what it recorded
            if metrics is not None:
                metrics.close()
        coords = self.dist.coords
        if self.pipeline is not None and coords.dp == 0 and coords.tp == 0:
            self.pipeline.write_timeline(self.run_dir / TIMELINE_FILE)
        self.update.finish_run()  # ZeRO-3 keeps parameters gathered (rank 0 samples alone); DDP stops its shm worker
        summary = {
            "params": count_parameters(self.config.model),
            "steps": self.state.step,
            "tokens": self.state.tokens_seen,
            "final_loss": result.loss if result else None,
            "final_val_loss": self.state.last_val_loss,
            "elapsed_s": self.state.elapsed_s,
            "tokens_per_s": self.state.tokens_seen / self.state.elapsed_s if self.state.elapsed_s else None,
            "config": self.config.to_dict(),
            "loom_version": __version__,
            "world_size": self.dist.dims.world_size,
            "device": self.device.type,
            **self._host(),
            "host_huge_pages": self.huge_pages,
        }
        if self.is_main:  # the planner's prediction for this layout beside what rank 0 measured
            tokens = self.batch.global_batch * train.seq_len
            optim = self.config.optim
            freeze = optim.freeze(self.config.train.steps) if optim.name == "onebit_adam" else None
            summary["plan"] = side_by_side(self.prediction, measured(read_metrics(self.run_dir), tokens, freeze))
        if self.is_main:
            write_summary(self.run_dir, summary)
        return summary

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """A sharded checkpoint: every rank writes what it holds, rank 0 the index and the train
        state (``loom.train.sharded_checkpoint``); it reloads under any layout."""
        train_state = {
            "optimizer": {"param_groups": self.update.param_groups()},
            "scaler": self.update.scaler_state(),
            "rng": capture_rng_state(),
            "run": {
                "step": self.state.step,
                "tokens_seen": self.state.tokens_seen,
                "elapsed_s": self.state.elapsed_s,
                "last_val_loss": self.state.last_val_loss,
            },
        }
        meta = {
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.fingerprint,
            "params": count_parameters(self.config.model),
            "data": self.data.meta,
            # what a resume keeps under any layout (loom.config.resume_config): the step's batch
            "batch": {"global_batch": self.batch.global_batch, "micro_batch": self.batch.micro_batch},
        }
        return save_sharded(
            self.run_dir,
            self.state.step,
            self.update.pieces(),
            train_state,
            meta,
            keep=self.config.train.keep_ckpts,
            comm=self.dist.comm("world"),
            device=self.device,
        )

    def _restore(self, path: Path) -> None:
        """Read this rank's boxes from a checkpoint of any layout and format, then the run's state."""
        checkpoint = open_checkpoint(path, self.dist.comm("world"), self.device)
        self.update.load_pieces(checkpoint.tensors, checkpoint.path)
        checkpoint.tensors.close()
        state = checkpoint.train_state
        if state.get("scaler"):
            self.update.load_scaler(state["scaler"])
        restore_rng_state(state["rng"])
        aside = set_aside_newer(self.run_dir, checkpoint.step) if self.is_main else None
        if aside is not None:
            self.log(f"resuming at step {checkpoint.step}: later checkpoints of this run moved to {aside}")
        run = state["run"]
        self.state = RunState(run["step"], run["tokens_seen"], run["elapsed_s"], run["last_val_loss"])
        if self.state.step >= self.config.train.steps:
            raise LoomError(
                f"checkpoint {path} is at step {self.state.step}, and train.steps = {self.config.train.steps}.",
                f"raise train.steps above {self.state.step} to train further.",
            )

    def _predict(self) -> Prediction:
        """The planner's prediction for this run's layout, with its recompute count."""
        train = self.config.train
        count = self.model.recompute.count
        config = dataclasses.replace(self.config, train=dataclasses.replace(train, recompute_layers=count))
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        hardware = hardware_of(self.device.type, name, **self._host())
        return predict_run(config, self.dist.dims.world_size, hardware, self.device.type)

    def _host(self) -> dict:
        """This host's share of the run, which a CPU prediction needs: its processes and their threads."""
        return {"local_processes": int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "threads": torch.get_num_threads()}

    def _describe_prediction(self) -> str:
        p, mib = self.prediction, 2**20
        m = p.memory
        comm = ", ".join(f"{g} {p.comm_bytes[g] / mib:.3g}" for g in COMM_GROUPS if p.comm_bytes.get(g))
        return (
            f"predicted per rank: model states {(m.params + m.grads + m.optim) / mib:.1f} MiB, activations "
            f"{m.activations / mib:.1f} MiB"
            + (f", 16-bit weight copies {m.weight_copies / mib:.1f} MiB" if m.weight_copies else "")
            + (f"; MiB sent per step: {comm}" if comm else "")
            + (f"; bubble {p.bubble:.3f}" if p.bubble else "")
            + " (memory and traffic exact models; step time: loom plan --calibrate RUN_DIR)"
        )

    def _describe_params(self) -> str:
        total, here = count_parameters(self.config.model), self.model.num_params()
        return f"{total:,} parameters" + (f" ({here:,} on this rank)" if here != total else "")

    def _prepare_data(self) -> TokenData:
        """Rank 0 tokenises (or finds the cache) first; the others then read its cache."""
        world = self.dist.comm("world")
        if not self.is_main:
            world.barrier()
        data = prepare_dataset(self.config.data, self.tokenizer, log=self.log)
        if self.is_main:
            world.barrier()
        return data

    def _fit_vocab(self) -> None:
        model = self.config.model
        if model.vocab_size is None:
            model.vocab_size = self.tokenizer.vocab_size
        elif model.vocab_size < self.tokenizer.vocab_size:
            raise LoomError(
                f"model.vocab_size = {model.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size} tokens.",
                "remove model.vocab_size (it then follows the tokenizer) or raise it.",
            )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
