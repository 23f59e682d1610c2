"""The update without ZeRO: AdamW on ``.grad``, DDP's bucketed all-reduce over dp, tp and pp chores.

:class:`PlainStep` is what the trainer drives when ``zero.stage = 0``; it has the interface
of :class:`~loom.train.zero_step.ZeroStep`, which does the same on ZeRO's flat buffers:

1. Backward. ``scale_loss`` applies fp16's loss scale and, under DDP without a pipeline,
   1/dp (the buckets then skip their division pass). Micro-batches but the last accumulate
   under ``no_sync``; the last one's buckets all-reduce while backward produces them, with
   the step's loss riding in the last bucket (``carry``). A pipeline runs its whole
   schedule under ``no_sync`` and syncs once.
2. ``sync_gradients``: wait for the buckets, then, on the synced ``.grad``, the tp sums
   (sequence-parallel parameters, replicated K/V heads) and the pipeline's tied embedding.
3. ``clip_grad_norm``: unscale (fp16), then clip by the global norm over tp and pp, or, for
   pure dp, by the norm DDP measured while its last buckets were in flight.
4. ``step``: AdamW, unless fp16's loss scaler found an inf or NaN on any rank of dp, tp or pp
   (one scaler for the whole run: every rank skips the same steps, the scales stay equal), then zero the gradients
   (DDP drops them too: the next backward's first gradients are copied into its bucket slots).
"""

from __future__ import annotations

import contextlib

import torch

from loom.distributed.comm import Comm
from loom.errors import LoomError
from loom.model.transformer import Transformer
from loom.optim.onebit import OneBitAdam
from loom.optim.scaler import DynamicLossScaler
from loom.optim.zero_one import ZeroOneAdam
from loom.parallel.ddp import DataParallel
from loom.parallel.grads import clip_grad_norm, sum_partial_grads
from loom.parallel.memory import tensor_bytes
from loom.parallel.pieces import Piece, Reader, load_plain, onebit_pieces, plain_pieces, read_onebit
from loom.parallel.pipeline.rank import PipelineRank
from loom.parallel.tensor import TensorParallel
from loom.train.precision import Precision


class PlainStep:
    """AdamW (``optimizer``) and, with dp > 1, DDP (``ddp``) over this rank's (tp/pp-local) model,
    built by the wiring (``loom.train.wiring``)."""

    def __init__(
        self,
        model: Transformer,
        tp: TensorParallel,
        pp: Comm,
        pipeline: PipelineRank | None,
        precision: Precision,
        optimizer: torch.optim.Optimizer,
        ddp: DataParallel | None,
        scaler: DynamicLossScaler | None = None,
    ) -> None:
        self.model, self.tp, self.pp, self.pipeline, self.precision = model, tp, pp, pipeline, precision
        self.optimizer, self.ddp = optimizer, ddp
        # 1-bit Adam: the torch AdamW it wraps holds the state checkpoints read and write
        self.adamw = optimizer.adamw if isinstance(optimizer, OneBitAdam) else optimizer
        self.scaler = scaler  # fp16: one loss scale, its overflow check agreed over dp, tp and pp
        self._unscaled = False
        self._grad_bytes = 0  # the gradients' bytes at the last update (they may be freed after it)
        self._params = list(model.parameters())  # walked once: each step reads the gradients' bytes
        # memory()'s walks over every storage, 0.26 ms a step (DDP benchmark), done once: the
        # parameters keep their storages for the step's life, and torch's AdamW makes its state at
        # a parameter's first update (a load replaces it whole), so its bytes change only with
        # its keys (1-bit Adam's grows after the warm-up: walked every step)
        self._param_bytes: int | None = None
        self._optim_bytes: tuple[tuple[int, int], int] | None = None  # ((id, len) of the state, bytes)

    # ------------------------------------------------------------------ one step

    @property
    def compressing(self) -> bool:
        """1-bit Adam after its warm-up: gradients stay local, the optimizer sends the momentum."""
        return isinstance(self.optimizer, OneBitAdam) and self.optimizer.compressing

    @property
    def dp_phase(self) -> str | None:
        """What the last update sent over dp, for a compressing optimizer: ``"full"`` (gradients
        averaged in full: a warm-up or variance step), ``"compressed"`` (1-bit), ``"local"``
        (nothing: 0/1 Adam's local step) or ``"sync"`` (0/1 Adam's compressed synchronisation);
        None for AdamW."""
        if isinstance(self.optimizer, ZeroOneAdam):
            return self.optimizer.kind
        if isinstance(self.optimizer, OneBitAdam):
            return "compressed" if self.optimizer.steps > self.optimizer.freeze_step else "full"
        return None

    def settle(self) -> None:
        """Before an evaluation or a checkpoint: 0/1 Adam's pending local steps averaged over dp,
        so every rank holds the same model (collective over dp; nothing for other optimizers)."""
        if isinstance(self.optimizer, ZeroOneAdam):
            self.optimizer.settle()

    def step_context(self) -> contextlib.AbstractContextManager:
        """Around a whole step's backward: no gradient sync at all while 1-bit Adam compresses."""
        return self.no_sync() if self.compressing else contextlib.nullcontext()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate without DDP's sync; nothing to hold back without dp."""
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """fp16's loss scale, and under DDP loss / dp, so gradients come out divided for the mean.

        Not with a pipeline: the loss lives on the last stage, but its 1/dp would reach every
        stage's gradients, and the earlier stages' buckets would divide again.
        """
        if self.ddp is not None and self.pipeline is None and not self.compressing:  # 1-bit: the local mean
            loss = self.ddp.scale_loss(loss)
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    def carry(self, total: torch.Tensor) -> bool:
        """Average the step's loss over dp in DDP's last bucket (call before the last backward).

        False when it cannot ride along (no DDP, a pipeline, a 16-bit bucket): average it then.
        """
        return self.ddp is not None and self.pipeline is None and not self.compressing and self.ddp.carry(total)

    def sync_gradients(self) -> None:
        """DDP's dp sync, then the tp and pp chores, on ``.grad``."""
        if self.ddp is not None and not self.compressing:
            self.ddp.finish_gradient_sync()
        # after the dp sync: these write into the gradients the dp all-reduce just filled
        if self.tp.size > 1:
            grads = [(place, p.grad) for _, p, place in self.model.placements.named() if p.grad is not None]
            sum_partial_grads(grads, self.tp.comm)
        if self.pipeline is not None:
            self.pipeline.sync_tied_gradients()

    def clip_grad_norm(self, max_norm: float, loss: torch.Tensor | None = None) -> float:
        """Unscale (fp16) and clip over tp and pp (``inf``: measure only); the norm before clipping.

        ``loss``: this rank's part of the step's loss when it did not ride in DDP's last bucket
        (0 on all but the last pipeline stage); it becomes, in place, the global batch's mean,
        summed over the stages and averaged over dp in the same messages as the norm's squares.
        """
        self._unscale()
        if self.compressing:
            return self._local_norm(loss)
        if self.ddp is not None and self.ddp.measure_norm:
            if loss is not None:
                self.ddp.comm.all_reduce(loss, op="avg", tag="metrics")
            return self.ddp.clip_grad_norm(max_norm)  # measured while the last buckets were in flight
        grads = [(place, p.grad) for _, p, place in self.model.placements.named() if p.grad is not None]
        dp = self.ddp.comm if self.ddp is not None else None
        if loss is not None and self.tp.rank != 0:
            loss.zero_()  # every tp rank holds the loss: counted once
        norm = clip_grad_norm(grads, max_norm, (self.tp.comm, self.pp), carry=loss, replicas=dp)
        if loss is not None and dp is not None:
            loss.div_(dp.size)
        return norm

    def _local_norm(self, loss: torch.Tensor | None) -> float:
        """1-bit Adam's compressed phase: no clipping (the gradients are never averaged; the update
        is the mean momentum over the frozen variance); the norm reported is the root mean square
        over dp of each rank's local gradient norm, and the loss the dp mean, in one message."""
        grads = [(place, p.grad) for _, p, place in self.model.placements.named() if p.grad is not None]
        dp = self.ddp.comm if self.ddp is not None else None
        if loss is not None and self.tp.rank != 0:
            loss.zero_()  # every tp rank holds the loss: counted once
        comms = [c for c in (self.tp.comm, self.pp, dp) if c is not None]
        norm = clip_grad_norm(grads, float("inf"), comms, carry=loss)
        size = dp.size if dp is not None else 1
        if loss is not None:
            loss.div_(size)
        return norm / size**0.5

    def _unscale(self) -> None:
        """fp16: divide the gradients by the loss scale, once per step (an inf stays an inf)."""
        if self.scaler is None or self._unscaled:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        self._unscaled = True

    def step(self, lr: float) -> bool:
        """Update and clear the gradients; False when an fp16 overflow on any rank of dp, tp or pp
        skipped the step (on every rank: the scaler agrees over all three groups)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # DDP: every gradient is a view of its bucket, whose bytes do not change
        self._grad_bytes = self.ddp.grad_bytes if self.ddp is not None else tensor_bytes(p.grad for p in self._params)
        overflow = False
        if self.scaler is not None:
            self._unscale()
            overflow = self.scaler.found_overflow(p.grad for p in self.model.parameters() if p.grad is not None)
            self.scaler.update(overflow)
            self._unscaled = False
        if not overflow:
            self.optimizer.step()
        if self.ddp is not None:
            self.ddp.zero_grad()  # .grad None; the next gradients are copied into the buckets
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return not overflow

    def gradients(self) -> list[tuple[str, torch.Tensor | None]]:
        """(name, gradient) of this rank's parameters in model order, as the step left them."""
        return [(name, p.grad) for name, p, _ in self.model.placements.named()]

    def skip(self) -> None:
        """Drop this step's gradients without an update (a non-finite step)."""
        self._unscaled = False
        if self.ddp is not None:
            self.ddp.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def finish_run(self) -> None:
        """Stop DDP's shared-memory worker; nothing to gather (every rank holds its whole local model)."""
        if self.ddp is not None:
            self.ddp.close()

    # ------------------------------------------------------------------ reports

    def memory(self) -> dict:
        """This rank's model-state bytes for a metrics record: parameters, gradients (as the last
        update saw them; DDP's buckets, padding included) and AdamW's state (both moments and
        the step counters; 1-bit and 0/1 Adam add their error feedback and anchor), each distinct
        storage once; with DDP over shared memory, the peers'
        bucket segments this rank maps (``mem_shm_peer_bytes``)."""
        if self._param_bytes is None:
            self._param_bytes = tensor_bytes(self._params)
        states = self.optimizer.state
        key = (id(states), len(states))
        if self._optim_bytes is None or self._optim_bytes[0] != key or type(self.optimizer) is not torch.optim.AdamW:
            optim = (t for state in states.values() for t in state.values() if isinstance(t, torch.Tensor))
            self._optim_bytes = (key, tensor_bytes(optim))
        out = {
            "mem_params_bytes": self._param_bytes,
            "mem_grads_bytes": self._grad_bytes,
            "mem_optim_bytes": self._optim_bytes[1],
        }
        if isinstance(self.optimizer, OneBitAdam):  # 1-bit and 0/1 Adam: error feedback (and 0/1's anchor)
            out["mem_optim_bytes"] += self.optimizer.extra_bytes
        if self.ddp is not None and self.ddp.shm is not None:  # mapped, resident, shared with the peers
            out["mem_shm_peer_bytes"] = self.ddp.shm.peer_bytes
        return out

    def describe(self) -> str | None:
        """DDP's layout for the run's first lines (None without DDP)."""
        if self.ddp is None:
            return None
        ddp = self.ddp
        via = "shared memory (ddp.transport)" if ddp.transport == "shm" else "the process group's backend"
        buckets = f"{len(ddp.buckets)} gradient bucket" + ("s" if len(ddp.buckets) > 1 else "")
        return f"DDP over dp={ddp.comm.size}: {buckets}, {ddp.parameter_bytes / 2**20:.2f} MiB per step through {via}"

    # ------------------------------------------------------------------ checkpoints

    def pieces(self) -> list[Piece]:
        """What this rank writes into a sharded checkpoint: its parameters' real parts and AdamW
        state, each element once over the world (``loom.parallel.pieces``)."""
        places = self.model.placements
        names = [places.name_of(p) for group in self.adamw.param_groups for p in group["params"]]
        optim_state = {names[i]: entry for i, entry in self.adamw.state_dict()["state"].items()}
        dp = (self.ddp.comm.rank, self.ddp.comm.size) if self.ddp is not None else (0, 1)
        if isinstance(self.optimizer, ZeroOneAdam) and self.optimizer.pending:
            raise RuntimeError("0/1 Adam's local steps must be settled before a checkpoint (PlainStep.settle)")
        pieces = plain_pieces(places, optim_state, *dp)
        if isinstance(self.optimizer, OneBitAdam):  # this rank's error feedback, for a resume in the same layout
            pieces += onebit_pieces("plain", self._places(), self.optimizer.errors())
        return pieces

    def _places(self) -> list[tuple[int, int]]:
        return [(c.rank, c.size) for c in (self.optimizer.comm, self.tp.comm, self.pp)]

    def param_groups(self) -> list[dict]:
        """AdamW's hyperparameters per group (the checkpoint's record of them)."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.adamw.state_dict()["param_groups"]]

    def load_pieces(self, reader: Reader, path) -> None:
        """Read the boxes this rank holds from a checkpoint of any layout, with or without ZeRO."""
        try:
            load_plain(self.model.placements, self.adamw, reader)
            if isinstance(self.optimizer, OneBitAdam):  # the same layout's error feedback, else afresh
                steps = [int(s["step"]) for s in self.adamw.state.values() if "step" in s]
                self.optimizer.steps = max(steps, default=0)
                saved = read_onebit(reader, "plain", self._places(), self.optimizer.error_names())
                self.optimizer.restore_errors(saved)
        except ValueError as exc:
            raise LoomError(
                f"checkpoint {path} does not fit this model: {exc}",
                "resume with the same model settings the checkpoint was trained with (see its meta.json).",
            ) from None

    def scaler_state(self) -> dict:
        """The loss scale in ``torch.amp.GradScaler``'s layout ({} without fp16), as ZeRO's is."""
        return self.scaler.grad_scaler_state() if self.scaler is not None else {}

    def load_scaler(self, state: dict) -> None:
        """The loss scale a checkpoint holds (GradScaler's layout), where this run has a scaler."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
