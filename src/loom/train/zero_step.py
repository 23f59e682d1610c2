"""ZeRO in the training loop: gradient sync, clipping, update and state when ``zero.stage >= 1``.

:class:`ZeroStep` holds a :class:`~loom.parallel.zero.optimizer.ZeroOptimizer` over the dp group and
does what the plain path (DDP, AdamW, the tp and pp chores on ``.grad``) does, on ZeRO's
flat gradient buffers instead:

1. Backward. Micro-batches but the last accumulate under ``no_sync``; the last one's
   gradients are reduced (reduce-scattered from stage 1 on) while backward produces them.
   A pipeline runs its whole schedule under ``no_sync``, then syncs once.
2. Before the dp reduction (pipeline): the tied embedding's copies on the first and last
   stage add each other's local, full-size gradient, as the plain path does after its sync.
3. After it, on the reduced shards: the tp sums (sequence-parallel parameters over the tp
   group, replicated K/V heads over their replicas). Sums over tp and over dp commute, and
   the tp ranks of one dp rank have the same flat layout (equal parameter shapes, equal dp
   slices; checked at start), so their shards cover the same elements.
4. Clipping: the global norm (``loom.parallel.grads.global_norm``) of the owned shards, every
   parameter once (a tp replica on its owner, the pipeline's tied copy on the first stage),
   summed over dp, tp and pp.
5. Update: an fp16 overflow anywhere skips the step everywhere (the scaler's flag is
   all-reduced over dp, tp and pp), AdamW on the fp32 master slice with decay on matrices
   (dim >= 2) only, as :func:`loom.optim.adamw.build_adamw`, then the parameters published.

Precision: the model's parameters (and gradients, unless ``zero.grad_dtype = "fp32"``)
take ``train.precision``'s dtype, master weights and moments stay fp32; forward still runs
under autocast. Checkpoints hold what the plain path's hold (name-keyed full fp32
parameters, AdamW moments in torch's layout, the loss scale in GradScaler's), so each path
resumes the other's.
"""

from __future__ import annotations

import contextlib

import torch

from loom.distributed.comm import Comm
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.parallel.grads import global_norm, sum_partial_grads, tensor_norms
from loom.parallel.pieces import Piece, Reader, onebit_pieces, read_onebit
from loom.parallel.pipeline.rank import PipelineRank
from loom.parallel.tensor import TensorParallel
from loom.parallel.zero import state as zero_state
from loom.parallel.zero.onebit import ZeroOneBit
from loom.parallel.zero.optimizer import ZeroOptimizer

MEMORY_KEYS = ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes")


class ZeroStep:
    """The trainer's ZeRO: ``zero`` built over this rank's (tp/pp-local) model by the wiring
    (``loom.train.wiring``); ``hyper`` (lr, betas, eps, weight_decay) names torch AdamW's two
    groups in checkpoints, as the plain path's optimizer has them."""

    def __init__(
        self,
        model: Transformer,
        tp: TensorParallel,
        pp: Comm,
        pipeline: PipelineRank | None,
        zero: ZeroOptimizer,
        hyper: dict,
        onebit: ZeroOneBit | None = None,
    ) -> None:
        self.model, self.tp, self.pp, self.pipeline, self.zero = model, tp, pp, pipeline, zero
        self.onebit = onebit  # 1-bit Adam's compressed phase (loom.parallel.zero.onebit), after its warm-up
        decay, rest = dict(hyper), {k: v for k, v in hyper.items() if k != "weight_decay"}
        self.hyper_groups = [decay, {**rest, "weight_decay": 0.0}]
        self._check_tp_layout()

    def _check_tp_layout(self) -> None:
        """The tp sums on shards need equal flat layouts on the tp ranks: fail loudly if not."""
        comm = self.tp.comm
        if comm.size == 1:
            return
        device = self.zero.device
        count = torch.tensor([len(self.zero.groups), -len(self.zero.groups)], dtype=torch.float64, device=device)
        comm.all_reduce(count, op="max", tag="zero-layout")
        layout = torch.tensor(
            [v for g in self.zero.groups for v in (g.numel, g.padded, g.lo)], dtype=torch.float64, device=device
        )
        both = torch.cat([layout, -layout])
        if count[0] == -count[1]:
            comm.all_reduce(both, op="max", tag="zero-layout")
        if count[0] != -count[1] or not torch.equal(both, torch.cat([layout, -layout])):
            raise RuntimeError(
                "ZeRO's flat layout differs between the ranks of a tp group; the tp gradient "
                "sums on shards need it equal (equal parameter shapes on every tp rank)"
            )

    # ------------------------------------------------------------------ one step

    @property
    def compressing(self) -> bool:
        """1-bit Adam after its warm-up: gradients stay local, the optimizer sends the momentum."""
        return self.onebit is not None and self.onebit.compressing

    def step_context(self) -> contextlib.AbstractContextManager:
        """Around a whole step's backward: no gradient sync at all while 1-bit Adam compresses."""
        return self.zero.no_sync() if self.compressing else contextlib.nullcontext()

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.zero.no_sync()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16: the loss times the scale, before backward (its gradients land in ZeRO's buffers)."""
        return self.zero.scale_loss(loss)

    def carry(self, total: torch.Tensor) -> bool:
        """The loss does not ride with ZeRO's reductions (they leave each rank a shard): False,
        so the trainer averages it with its own all-reduce."""
        return False

    def sync_gradients(self) -> None:
        """Tied-embedding exchange on local gradients, the dp reduction, then the tp sums."""
        if self.pipeline is not None:
            self.pipeline.sync_tied_gradients(self.zero.sync.local_grad)
        if self.compressing:  # the local gradients stay (full size); the tp sums act on them
            self.zero.sync.keep_local()
            if self.tp.size > 1:
                places, sync = self.model.placements, self.zero.sync
                local = [(places.of(p), sync.local_grad(p)) for g in self.zero.groups for p in g.params]
                sum_partial_grads([(place, grad) for place, grad in local if place.partial_grad], self.tp.comm)
            return
        self.zero.finish_gradient_sync()
        if self.tp.size > 1:
            places = self.model.placements
            views = self.zero.sync.shard_views(lambda p: places.of(p).partial_grad)
            sum_partial_grads([(places.of(p), view) for p, view in views], self.tp.comm)

    def clip_grad_norm(self, max_norm: float, loss: torch.Tensor | None = None) -> float:
        """The global norm of the mean gradient before clipping (``inf``: measure only).

        ``loss``: this rank's part of the step's loss (0 on all but the last pipeline stage); it
        becomes, in place, the global batch's mean, summed over the stages and averaged over dp
        in the same messages as the norm's squares.
        """
        if loss is not None and self.tp.rank != 0:
            loss.zero_()  # every tp rank holds the loss: counted once
        if self.compressing:
            return self._local_norm(loss)
        comms = [c for c in (self.tp.comm, self.pp) if c.size > 1]
        places = self.model.placements
        counts = (lambda p: places.of(p).counted) if comms else None
        norm = self.zero.clip_grad_norm(max_norm, counts, comms, carry=loss)
        if loss is not None:
            loss.div_(self.zero.comm.size)
        return norm

    def _local_norm(self, loss: torch.Tensor | None) -> float:
        """1-bit Adam's compressed phase, as the plain path's: no clipping; the norm reported is the
        root mean square over dp of each rank's local gradient norm, the loss the dp mean."""
        places, sync, dp = self.model.placements, self.zero.sync, self.zero.comm
        local = [sync.local_grad(p) for g in self.zero.groups for p in g.params if places.of(p).counted]
        norm = global_norm(tensor_norms(local), [self.tp.comm, self.pp, dp], self.zero.device, carry=loss)
        if loss is not None:
            loss.div_(dp.size)
        scale = self.zero.scaler.scale if self.zero.scaler is not None else 1.0
        return norm.item() / scale / dp.size**0.5

    @property
    def dp_phase(self) -> str | None:
        """1-bit Adam: ``"full"`` after a warm-up step (ZeRO's own), ``"compressed"`` after; None without."""
        if self.onebit is None:
            return None
        return "compressed" if self.onebit.steps > self.onebit.freeze_step else "full"

    def settle(self) -> None:
        """Nothing pends between ZeRO steps (0/1 Adam's local steps run without ZeRO)."""

    def step(self, lr: float) -> bool:
        """Update and clear the gradients; False when an fp16 overflow skipped the step."""
        if self.compressing:
            stepped = self.onebit.step(lr, self.zero.scaler)
            self.zero.zero_grad()
            return stepped
        stepped = self.zero.step(lr)
        self.zero.zero_grad()
        return stepped

    def gradients(self) -> list[tuple[str, torch.Tensor | None]]:
        """(name, gradient) this rank holds, in layout order: its owned part of each reduced gradient
        (1-bit Adam's compressed phase: the local gradients, full size)."""
        places, sync = self.model.placements, self.zero.sync
        if self.compressing:
            return [(places.name_of(p), sync.local_grad(p)) for g in self.zero.groups for p in g.params]
        return [(places.name_of(p), view) for p, view in sync.shard_views()]

    def skip(self) -> None:
        """Drop this step's gradients without an update (a non-finite step)."""
        self.zero.zero_grad()

    def finish_run(self) -> None:
        """Stage 3: keep every unit gathered, so one rank can run the model alone (a sample)."""
        if self.zero.gatherer is not None:
            self.zero.gatherer.hold()

    # ------------------------------------------------------------------ reports

    def memory(self) -> dict:
        """This rank's model-state bytes for a metrics record (live tensors, padding included)."""
        mem = self.zero.memory()
        if self.onebit is not None:  # 1/D and the compressor's buffers, once compressing
            mem["mem_optim_bytes"] += self.onebit.nbytes
        return {**{key: mem[key] for key in MEMORY_KEYS}, "mem_padding_bytes": mem["padding_bytes"]}

    def describe(self) -> str:
        mem, zero = self.zero.memory(), self.zero
        where = "host" if mem["optim_device"] == "cpu" and zero.device.type != "cpu" else mem["optim_device"]
        master = "fp32 master + " if mem["optim_bytes_per_element"] == 12 else ""  # else the parameters are
        return (
            f"ZeRO-{zero.stage} over dp={zero.comm.size}, per rank: parameters {_mib(mem['mem_params_bytes'])} "
            f"{mem['params_dtype']}, gradients {_mib(mem['mem_grads_bytes'])} {mem['grads_dtype']}, "
            f"optimizer {_mib(mem['mem_optim_bytes'])} ({master}AdamW moments, {where}); "
            f"padding {mem['padding_bytes']:,} B"
        )

    # ------------------------------------------------------------------ checkpoints

    def pieces(self) -> list[Piece]:
        """What this rank writes into a sharded checkpoint: the boxes its owned slices cover of the
        fp32 master weights and AdamW moments (``loom.parallel.zero.state.pieces``)."""
        pieces = zero_state.pieces(self.zero.groups, self.model.placements)
        if self.onebit is not None:  # this rank's error feedback, for a resume in the same layout
            pieces += onebit_pieces("zero", self._places(), self.onebit.state())
        return pieces

    def _places(self) -> list[tuple[int, int]]:
        return [(c.rank, c.size) for c in (self.zero.comm, self.tp.comm, self.pp)]

    def param_groups(self) -> list[dict]:
        """AdamW's hyperparameters per group, as torch AdamW's two groups name them."""
        return [dict(g) for g in self.hyper_groups]

    def load_pieces(self, reader: Reader, path) -> None:
        """Read the boxes this rank owns from a checkpoint of any layout, then publish them."""
        try:
            zero_state.load_pieces(self.zero.groups, self.model.placements, reader)
            if self.onebit is not None:  # the same layout's error feedback, else it starts afresh
                saved = read_onebit(reader, "zero", self._places(), self.onebit.state_names())
                self.onebit.load_state(saved, self.zero.device)
        except ValueError as exc:
            raise LoomError(
                f"checkpoint {path} does not fit this model: {exc}",
                "resume with the same model settings the checkpoint was trained with (see its meta.json).",
            ) from None
        self.zero.update.publish()

    def scaler_state(self) -> dict:
        """The loss scale in torch GradScaler's layout; {} without one (as a disabled GradScaler)."""
        return self.zero.scaler.grad_scaler_state() if self.zero.scaler is not None else {}

    def load_scaler(self, state: dict) -> None:
        """The loss scale a checkpoint holds (GradScaler's layout), where this run has a scaler."""
        if self.zero.scaler is not None and state:
            self.zero.scaler.load_state_dict(state)


def _mib(nbytes: int | float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
