"""ZeRO stages 0-3 with mixed-precision AdamW and ZeRO-Offload, over the dp group.

Parameters are flattened into contiguous buffers ("groups"), each padded to a multiple of
the dp size N so that rank r owns the equal slice ``[lo, hi)``; parameters become views
into them, so each collective is one large message. Compute parameters and gradients are
``param_dtype`` / ``grad_dtype`` on the device; fp32 master weights and Adam moments
(:class:`~loom.optim.adam.FlatAdamW`) exist for this rank's slice only (the whole buffer
at stage 0), in host memory with ``offload="optimizer"``. fp32 parameters on the device
are their own master weights (the optimizer updates the slice in place): K = 8, not 12.

=======  ==================================  ======================================  ========
stage    gradients (synced during backward)  parameters                              per step
=======  ==================================  ======================================  ========
0 (DDP)  all-reduced, full buffer kept       full; every rank updates all of them    2Ψ
1        reduce-scattered, full buffer kept  full; own slice updated, all-gathered   2Ψ
2        reduce-scattered, full buffer freed full; own slice updated, all-gathered   2Ψ
3        reduce-scattered, full buffer freed own slice; a unit is gathered for its   3Ψ
                                             forward and its backward only
=======  ==================================  ======================================  ========

Gradients. A post-accumulate-grad hook adds each gradient into its group's full-size
buffer and drops ``param.grad``; when a group is complete its collective starts
asynchronously, groups launching in index order on every rank (as in
:mod:`loom.parallel.data`). At most two are in flight: launching a third completes the
oldest (and, at stages 2-3, frees its full-size buffer). Reduced gradients are kept as
*sums* over the ranks; :meth:`step` divides by N and the fp16 loss scale as it converts
the slice to fp32. Inside :meth:`no_sync` gradients only accumulate in the full-size
buffers, which then outlive the backward (as in FSDP); :meth:`finish_gradient_sync`
then reduces them all (a pipeline runs its whole schedule so, then syncs once). Until it
does, :meth:`local_grad` is a parameter's local gradient, full size (to combine copies of
one parameter held by other ranks first, such as a pipeline's tied embedding). Stage 3 gathering lives in
:mod:`loom.parallel.zero_flat`; its groups are units (default: each of ``model.blocks``)
plus a root group holding the rest.

Collectives go through the counted :class:`~loom.distributed.comm.Comm`, tagged "zero-grad" and
"zero-param"; :mod:`loom.plan.memory` holds the byte and memory formulas they meet.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from torch import nn

from loom.distributed.comm import Comm, Handle
from loom.optim.adam import FlatAdamW
from loom.optim.scaler import DynamicLossScaler
from loom.parallel.data import GradientSync
from loom.parallel.grads import clip_coefficient, global_norm, tensor_norms
from loom.parallel.zero_flat import FlatGroup, Unit, UnitGather, bucket_layout, flatten, unit_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_IN_FLIGHT = 2  # gradient collectives outstanding at once
GATHER_BATCH_BYTES = 64 * 2**20  # stages 1-2: updated slices all-gathered in batches of about this size


class ZeroOptimizer(GradientSync):
    """Shards ``model``'s states over ``comm`` (the dp group) and steps AdamW on them.

    Weight decay applies to parameters with dim >= 2, as in :mod:`loom.optim.adamw`. Use::

        loss = model.loss(x, y)
        zero.backward(loss)        # scales (fp16), runs backward, finishes the gradient sync
        zero.clip_grad_norm(1.0)   # optional
        zero.step(lr)              # False: skipped (fp16 overflow on some rank)
        zero.zero_grad()

    or call ``loss.backward()`` yourself (scaled by :meth:`scale_loss` under fp16); the
    hooks do the same and :meth:`step` finishes the sync.
    """

    def __init__(
        self,
        model: nn.Module,
        comm: Comm,
        stage: int,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        param_dtype: str = "fp32",
        grad_dtype: str | None = None,
        offload: str | None = None,
        bucket_mb: float = 25.0,
        units: Sequence[nn.Module] | None = None,
        scaler: DynamicLossScaler | None = None,
        root_hooks: bool = True,
    ) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {stage}")
        if offload not in (None, "optimizer"):
            raise ValueError(f"offload must be None or 'optimizer', got {offload!r}")
        for name, value in (("param_dtype", param_dtype), ("grad_dtype", grad_dtype or param_dtype)):
            if value not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
        self.model, self.comm, self.stage = model, comm, stage
        self.param_dtype, self.grad_dtype = DTYPES[param_dtype], DTYPES[grad_dtype or param_dtype]
        self.weight_decay = weight_decay
        self.sync_enabled = True
        self.scaler = scaler if scaler is not None or param_dtype != "fp16" else DynamicLossScaler([comm])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to shard")
        self.device = named[0][1].device
        self.optim_device = torch.device("cpu") if offload else self.device
        self.shards = 1 if stage == 0 else comm.size
        self._hyper = (lr, betas, eps)
        if stage == 3:
            units = list(model.blocks.values()) if units is None and hasattr(model, "blocks") else list(units or [])
            layout = unit_layout(named, units)
        else:
            layout = bucket_layout(named, int(bucket_mb * 2**20), self.param_dtype.itemsize)
        self.groups = [self._make_group(members) for members in layout]
        self._slot = {id(p): (g, o) for g in self.groups for p, o in zip(g.params, g.offsets)}
        for _, p in named:
            p.register_post_accumulate_grad_hook(self._on_grad)
        self.gatherer = self._unit_gather(units, root_hooks) if stage == 3 else None
        self._next = 0
        self._in_flight: deque[tuple[FlatGroup, Handle, torch.Tensor | None]] = deque()
        self._sync_open = False
        self._clip_coef = 1.0

    # -- layout --------------------------------------------------------------------------

    def _make_group(self, members) -> FlatGroup:
        group, full32 = flatten(members, self.shards, self.comm.rank if self.shards > 1 else 0, self.param_dtype)
        lr, betas, eps = self._hyper
        if self.stage == 3:
            group.unit = Unit(group.flat, group.flat[group.lo : group.hi].clone())
        # fp32 parameters where the optimizer lives are their own master weights: no second copy
        alias = self.param_dtype == torch.float32 and self.optim_device == self.device
        if alias:
            master = group.unit.shard if self.stage == 3 else group.flat[group.lo : group.hi]
        else:
            master = full32[group.lo : group.hi].to(self.optim_device, copy=True)
        group.optim = FlatAdamW(master, group.decay_segments(self.weight_decay), lr, betas, eps, holds_master=not alias)
        if self.stage <= 1:
            group.grad_full = torch.zeros(group.padded, dtype=self.grad_dtype, device=self.device)
            group.grad_shard = group.grad_full[group.lo : group.hi]
        else:
            group.grad_shard = torch.zeros(group.hi - group.lo, dtype=self.grad_dtype, device=self.device)
        return group

    def _unit_gather(self, units: Sequence[nn.Module], root_hooks: bool) -> UnitGather:
        """Stage 3: each unit module with the group it owns; the root group (if any) is the last.

        ``root_hooks=False``: the model's forward is not hooked for the root; the caller
        brackets the root's uses with ``gatherer.enter``/``leave``.
        """
        group_of = {id(p): g for g in self.groups for p in g.params}
        pairs: list[tuple[nn.Module, Unit]] = []
        for module in units:
            owned = [group_of[id(p)] for p in module.parameters() if id(p) in group_of]
            if owned and all(owned[0].unit is not u for _, u in pairs):
                pairs.append((module, owned[0].unit))
        has_root = len(pairs) < len(self.groups)
        root = (self.model if root_hooks else None, self.groups[-1].unit)
        return UnitGather(self.comm, pairs, root if has_root else None)

    # -- gradients -----------------------------------------------------------------------

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale_loss(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (fp16-scaled) loss; outside :meth:`no_sync`, finish the sync."""
        self.scale_loss(loss).backward()
        if self.sync_enabled:
            self.finish_gradient_sync()
        else:
            self._end_backward()

    def _on_grad(self, param: nn.Parameter) -> None:
        group, offset = self._slot[id(param)]
        grad, param.grad = param.grad, None
        with torch.no_grad():
            if group.grad_full is None:
                group.grad_full = torch.zeros(group.padded, dtype=self.grad_dtype, device=self.device)
            elif group.reduced:
                self._reopen(group)
            group.grad_full[offset : offset + param.numel()].add_(grad.reshape(-1))
        group.seen += 1
        if group.seen < len(group.params):
            return
        group.seen = 0
        if self.gatherer is not None:
            self.gatherer.release(group.unit)
        self._sync_open = True  # also under no_sync: the next finish_gradient_sync reduces it
        if self.sync_enabled:
            group.pending = True
            self._launch_ready()

    def _reopen(self, group: FlatGroup) -> None:
        """Stages 0-1 accumulating after a sync: make the next reduction add, not recount.

        Stage 0 holds the sum on every rank, so each keeps 1/N of it; stage 1 zeroes the
        local gradients outside its slice (already sent), keeping the sums it owns.
        """
        if self.stage == 0:
            group.grad_full.div_(self.comm.size)
        else:
            group.grad_full[: group.lo].zero_()
            group.grad_full[group.hi :].zero_()
        group.reduced = False

    def _launch_ready(self) -> None:
        while self._next < len(self.groups) and self.groups[self._next].pending:
            self._launch(self.groups[self._next])

    def _launch(self, group: FlatGroup) -> None:
        group.pending, group.reduced = False, self.stage <= 1  # stages 2-3 drop the full buffer
        if self.stage == 0:
            out = None
            handle = self.comm.all_reduce(group.grad_full, op="sum", async_op=True, tag="zero-grad")
        else:
            out = torch.empty(group.hi - group.lo, dtype=self.grad_dtype, device=self.device)
            handle = self.comm.reduce_scatter(out, group.grad_full, op="sum", async_op=True, tag="zero-grad")
        self._in_flight.append((group, handle, out))
        self._next += 1
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._complete(*self._in_flight.popleft())

    def _complete(self, group: FlatGroup, handle: Handle, out: torch.Tensor | None) -> None:
        handle.wait()
        if self.stage == 1:
            group.grad_shard.copy_(out)  # the owned slice of the input held the earlier sums
        elif self.stage >= 2:
            group.grad_shard.add_(out)
            group.grad_full = None

    def finish_gradient_sync(self) -> None:
        """Launch what is left (groups that got no gradient too) and complete every collective."""
        if self._sync_open:
            for group in self.groups[self._next :]:
                if group.grad_full is None:
                    group.grad_full = torch.zeros(group.padded, dtype=self.grad_dtype, device=self.device)
                self._launch(group)
            while self._in_flight:
                self._complete(*self._in_flight.popleft())
            self._next, self._sync_open = 0, False
        self._end_backward()

    def _end_backward(self) -> None:
        for group in self.groups:
            group.seen = 0
        if self.gatherer is not None:
            self.gatherer.release_all()

    def local_grad(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s local gradient, full size, accumulated under :meth:`no_sync` and not yet
        reduced (a view into its group's buffer: changing it changes what is reduced)."""
        group, offset = self._slot[id(param)]
        if group.grad_full is None:
            group.grad_full = torch.zeros(group.padded, dtype=self.grad_dtype, device=self.device)
        return group.grad_full[offset : offset + param.numel()].view(param.shape)

    def grad_shard_views(self, select: Callable[[nn.Parameter], bool]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """After the sync: ``(param, view)`` for the part of each selected parameter's reduced
        gradient this rank owns, in layout order (ranks with equal layouts list equal ranges)."""
        return [(p, g.grad_shard[start:stop]) for g in self.groups for p, start, stop in g.owned_ranges() if select(p)]

    def zero_grad(self) -> None:
        for group in self.groups:
            if self.stage <= 1:
                group.grad_full.zero_()
            else:
                group.grad_shard.zero_()
                group.grad_full = None
            group.reduced = False
        self._clip_coef = 1.0

    def _unscale(self) -> float:
        """Reduced sums -> mean gradient: 1 / (N * loss scale)."""
        return 1.0 / (self.comm.size * (self.scaler.scale if self.scaler is not None else 1.0))

    def clip_grad_norm(
        self, max_norm: float, counts: Callable[[nn.Parameter], bool] | None = None, comms: Sequence[Comm] = ()
    ) -> float:
        """Global L2 norm of the mean gradient (shards' squares summed over dp); the next
        :meth:`step` scales by min(1, max_norm / (norm + 1e-6)). ``inf``: measure only.

        A model split further (tensor, pipeline parallel): ``counts(param)`` says whether
        this rank's copy of a parameter counts (a replica counts once), and the squares
        are summed over ``comms`` (the tp and pp groups) as well.
        """
        self.finish_gradient_sync()
        pieces = [
            group.grad_shard[start:stop]
            for group in self.groups
            for param, start, stop in group.owned_ranges()
            if counts is None or counts(param)
        ]
        groups = ([self.comm] if self.stage >= 1 else []) + list(comms)
        norm = global_norm(tensor_norms(pieces), groups, self.device) * self._unscale()
        if math.isfinite(max_norm):
            self._clip_coef = clip_coefficient(norm, max_norm).item()
        return norm.item()

    # -- the update ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float | None = None) -> bool:
        """Update this rank's slice and publish it; False when fp16 overflow skipped the step."""
        self.finish_gradient_sync()
        if self.scaler is not None:
            overflow = self.scaler.found_overflow(g.grad_shard for g in self.groups)
            self.scaler.update(overflow)
            if overflow:
                self._clip_coef = 1.0
                return False
        factor, self._clip_coef = self._clip_coef * self._unscale(), 1.0
        for group in self.groups:
            grad = group.grad_shard.to(self.optim_device, torch.float32, copy=True)
            if factor != 1.0:
                grad.mul_(factor)
            group.optim.step(grad, lr)
        self._publish_all()
        return True

    def _publish(self, group: FlatGroup) -> Handle | None:
        """Master slice -> compute parameters (all-gathered at stages 1-2; stage 3 keeps its slice)."""
        master = group.optim.master
        if self.stage == 0:
            _copy_unless_same(group.flat, master)
            return None
        if self.stage == 3:
            _copy_unless_same(group.unit.shard, master)
            return None
        owned = group.flat[group.lo : group.hi]
        _copy_unless_same(owned, master)
        return self.comm.all_gather(group.flat, owned, async_op=True, tag="zero-param")

    # -- reports and state ---------------------------------------------------------------

    def memory(self) -> dict:
        """Bytes of model states this rank holds now (live tensors), and the padding's share.

        ``padding_bytes`` is what the padded elements add: whole at full-size buffers, 1/N
        at slices, so ``params + grads + optim == formula(Ψ) + padding_bytes`` exactly, with
        the formula's K = ``optim_bytes_per_element`` (12, or 8 for fp32 parameters as master).
        """
        params = grads = optim = 0
        padding = Fraction(0)
        k = self.groups[0].optim.bytes_per_element
        per_elem = (self.param_dtype.itemsize, self.grad_dtype.itemsize, k)
        for g in self.groups:
            params += g.flat.untyped_storage().nbytes()
            if g.unit is not None:
                params += g.unit.shard.numel() * g.unit.shard.element_size()
            if g.grad_full is not None:
                grads += g.grad_full.numel() * g.grad_full.element_size()
            if self.stage >= 2:
                grads += g.grad_shard.numel() * g.grad_shard.element_size()
            optim += g.optim.nbytes
            pad = g.padded - g.numel
            for first_sharded, size in zip((3, 2, 1), per_elem):
                padding += Fraction(pad * size, self.shards if self.stage >= first_sharded else 1)
        return {
            "mem_params_bytes": params,
            "mem_grads_bytes": grads,
            "mem_optim_bytes": optim,
            "padding_bytes": int(padding) if padding.denominator == 1 else float(padding),
            "padding_elements": sum(g.padded - g.numel for g in self.groups),
            "params_dtype": DTYPE_NAMES[self.param_dtype],
            "grads_dtype": DTYPE_NAMES[self.grad_dtype],
            "optim_bytes_per_element": k,
            "optim_device": str(self.optim_device),
        }

    def _gather_full(self, group: FlatGroup, shard: torch.Tensor) -> torch.Tensor:
        """This group's full fp32 vector from every rank's slice ``shard`` (CPU)."""
        if self.shards == 1:
            return shard.detach().to("cpu", copy=True)
        full = torch.empty(group.padded, dtype=shard.dtype, device=self.device)
        self.comm.all_gather(full, shard.to(self.device), tag="zero-full")
        return full.cpu()

    def _by_name(self, group: FlatGroup, full: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: full[o : o + p.numel()].view(p.shape).clone()
            for n, p, o in zip(group.names, group.params, group.offsets)
        }

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter at full size in fp32 (the master weights), on every rank."""
        out = {}
        for group in self.groups:
            out.update(self._by_name(group, self._gather_full(group, group.optim.master)))
        return out

    def full_state(self) -> dict:
        """Name-keyed full fp32 parameters and AdamW state (torch's layout), on every rank."""
        state = {}
        for group in self.groups:
            moments = [
                self._by_name(group, self._gather_full(group, t)) for t in (group.optim.exp_avg, group.optim.exp_avg_sq)
            ]
            step = torch.tensor(float(group.optim.step_count))
            for name in group.names:
                state[name] = {"step": step.clone(), "exp_avg": moments[0][name], "exp_avg_sq": moments[1][name]}
        return {
            "model": self.full_parameters(),
            "optimizer": {"state": state},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    @torch.no_grad()
    def load_full_state(self, full: dict) -> None:
        """Cut this rank's slices from :meth:`full_state`'s layout (any dp size or stage)."""
        for group in self.groups:
            pieces = {"master": [full["model"][n] for n in group.names]}
            entries = [full["optimizer"]["state"].get(n) for n in group.names]
            if all(e is not None for e in entries):
                pieces["exp_avg"] = [e["exp_avg"] for e in entries]
                pieces["exp_avg_sq"] = [e["exp_avg_sq"] for e in entries]
                group.optim.step_count = int(entries[0]["step"])
            for key, tensors in pieces.items():
                flat = torch.zeros(group.padded, dtype=torch.float32)
                flat[: group.numel] = torch.cat([t.reshape(-1).float().cpu() for t in tensors])
                getattr(group.optim, key).copy_(flat[group.lo : group.hi])
        if self.scaler is not None and full.get("scaler"):
            self.scaler.load_state_dict(full["scaler"])
        self._publish_all()

    def _layout(self) -> dict:
        return {"stage": self.stage, "world": self.comm.size, "layout": [(g.names, g.padded) for g in self.groups]}

    def state_dict(self) -> dict:
        """This rank's slices (loads back only into the same layout: stage, N, buckets)."""
        return {
            **self._layout(),
            "groups": [g.optim.state_dict() for g in self.groups],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        mine = self._layout()
        for key in mine:
            if state[key] != mine[key]:
                raise ValueError(
                    f"ZeRO state {key} differs: saved {state[key]!r}, this run {mine[key]!r}; "
                    "use full_state()/load_full_state() to change the layout"
                )
        for group, saved in zip(self.groups, state["groups"]):
            group.optim.load_state_dict(saved)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._publish_all()

    def _publish_all(self) -> None:
        """Every group's master slice to its compute parameters (stages 1-2: all-gathered)."""
        if self.stage in (1, 2) and self.shards > 1:
            for batch in self._gather_batches():
                self._gather_batch(batch)
            return
        for group in self.groups:
            self._publish(group)

    def _gather_batches(self) -> list[list[FlatGroup]]:
        """Consecutive groups, each batch about GATHER_BATCH_BYTES of parameters (at least one group)."""
        batches: list[list[FlatGroup]] = [[]]
        size = 0
        for group in self.groups:
            nbytes = group.padded * group.flat.element_size()
            if batches[-1] and size + nbytes > GATHER_BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(group)
            size += nbytes
        return batches

    @torch.no_grad()
    def _gather_batch(self, groups: list[FlatGroup]) -> None:
        """One all-gather for several groups: this rank's slices side by side, gathered, copied out.

        The bytes are those of one all-gather per group ((n-1)/n of the padded sizes), in one
        message instead of many: on gloo, and on shared cores, far fewer waits for peers.
        """
        n = self.comm.size
        owned = [g.flat[g.lo : g.hi] for g in groups]
        for group, slice_ in zip(groups, owned):
            _copy_unless_same(slice_, group.optim.master)
        send = torch.cat(owned)
        rows = torch.empty(n * send.numel(), dtype=send.dtype, device=send.device)
        self.comm.all_gather(rows, send, tag="zero-param")
        rows = rows.view(n, send.numel())
        offset = 0
        for group, slice_ in zip(groups, owned):
            group.flat.view(n, slice_.numel()).copy_(rows[:, offset : offset + slice_.numel()])
            offset += slice_.numel()


def _copy_unless_same(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, skipped when they are one tensor (fp32 parameters as master)."""
    if target.data_ptr() != source.data_ptr():
        target.copy_(source)
