"""ZeRO stages 1-3 (Rajbhandari et al., 2020) over the dp group: the parts, put together.

=====  ==================================  ======================================  ========
stage  gradients (synced during backward)  parameters                              per step
=====  ==================================  ======================================  ========
1      reduce-scattered, full buffer kept  full; own slice updated, all-gathered   2Ψ
2      reduce-scattered, full buffer freed full; own slice updated, all-gathered   2Ψ
3      reduce-scattered, full buffer freed own slice; a unit is gathered for its   3Ψ
                                           forward and its backward only
=====  ==================================  ======================================  ========

Stage 0 (nothing sharded) is plain DDP and AdamW (``loom.parallel.ddp``), not a mode of this.
:class:`ZeroOptimizer` flattens the model's parameters (``layout.py``) and holds the three
parts that act on them: the gradient sync (``sync.py``, hooks and reduce-scatters), the
update (``update.py``, mixed-precision AdamW and clipping on this rank's slice, then the
publish), and at stage 3 the unit gathering (``gather.py``); ``state.py`` reports memory
and converts checkpoints. Collectives go through the counted comm, tagged "zero-grad" and
"zero-param"; :mod:`loom.plan.memory` holds the byte and memory formulas they meet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from loom.distributed.comm import Comm
from loom.optim.scaler import DynamicLossScaler
from loom.parallel.zero import state
from loom.parallel.zero.gather import Unit, UnitGather
from loom.parallel.zero.layout import FlatGroup, bucket_layout, flatten, swap_parameters, unit_layout
from loom.parallel.zero.sync import ZeroGradients
from loom.parallel.zero.update import ZeroAdamW

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ZeroOptimizer:
    """Shards ``model``'s states over ``comm`` (the dp group) and steps AdamW on them.

    Weight decay applies to parameters with dim >= 2, as in :mod:`loom.optim.adamw`. Use::

        loss = model.loss(x, y)
        zero.backward(loss)        # scales (fp16), runs backward, finishes the gradient sync
        zero.clip_grad_norm(1.0)   # optional
        zero.step(lr)              # False: skipped (fp16 overflow on some rank)
        zero.zero_grad()

    or call ``loss.backward()`` yourself (scaled by :meth:`scale_loss` under fp16); the
    hooks do the same and :meth:`step` finishes the sync. ``sync``, ``update`` and
    ``gatherer`` are the parts (see the module docstring).
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
        device: torch.device | None = None,
        initial: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"zero stage must be 1, 2 or 3 (stage 0 is DDP: loom.parallel.ddp), got {stage}")
        if offload not in (None, "optimizer"):
            raise ValueError(f"offload must be None or 'optimizer', got {offload!r}")
        for name, value in (("param_dtype", param_dtype), ("grad_dtype", grad_dtype or param_dtype)):
            if value not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
        self.model, self.comm, self.stage = model, comm, stage
        self.param_dtype, self.grad_dtype = DTYPES[param_dtype], DTYPES[grad_dtype or param_dtype]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to shard")
        self.device = device or named[0][1].device
        self.optim_device = torch.device("cpu") if offload else self.device
        if stage == 3:
            units = list(model.blocks.values()) if units is None and hasattr(model, "blocks") else list(units or [])
            layout = unit_layout(named, units)
        else:
            layout = bucket_layout(named, int(bucket_mb * 2**20), self.param_dtype.itemsize)
        self.groups: list[FlatGroup] = []
        owned32 = []  # each group's owned slice in fp32, the master weights' source
        materialised: dict[int, nn.Parameter] = {}
        for members in layout:
            group, values = flatten(members, comm.size, comm.rank, self.param_dtype, self.device, initial)
            materialised |= {id(old): new for (_, old), new in zip(members, group.params) if new is not old}
            # fp32 parameters where the optimizer lives are their own master weights (update.py); offload
            # keeps a separate host copy even where host and device are one (a CPU run), so its path runs
            alias = self.param_dtype == torch.float32 and self.optim_device == self.device and not offload
            owned32.append(None if alias else values[group.lo : group.hi].clone())
            del values
            if stage == 3:  # keep the owned slice; the full buffer is freed at once, so a rank
                # never holds more than one unit's parameters in full, not even while it starts
                group.unit = Unit(group.flat, group.flat[group.lo : group.hi].clone())
                group.flat.untyped_storage().resize_(0)
                group.unit.state = "free"
            self.groups.append(group)
        if materialised:
            swap_parameters(model, materialised)
            places = getattr(model, "placements", None)
            for old, new in ((p, materialised[id(p)]) for _, p in named if id(p) in materialised):
                if places is not None:
                    places.rebind(old, new)
        self.scaler = scaler if scaler is not None or param_dtype != "fp16" else DynamicLossScaler([comm])
        self.update = ZeroAdamW(
            self.groups,
            owned32,
            comm,
            stage,
            lr,
            betas,
            eps,
            weight_decay,
            self.optim_device,
            self.scaler,
            offload=offload is not None,
        )
        self.gatherer = self._unit_gather(units, root_hooks) if stage == 3 else None
        self.sync = ZeroGradients(self.groups, comm, stage, self.grad_dtype, self.device, self.gatherer)

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

    # -- the training loop ----------------------------------------------------------------

    def no_sync(self):
        """Accumulate gradients locally (earlier micro-batches): nothing is sent."""
        return self.sync.no_sync()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.update.scale_loss(loss)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (fp16-scaled) loss; outside :meth:`no_sync`, finish the sync."""
        self.scale_loss(loss).backward()
        if self.sync.sync_enabled:
            self.sync.finish_gradient_sync()
        else:
            self.sync.end_backward()

    def finish_gradient_sync(self) -> None:
        self.sync.finish_gradient_sync()

    def clip_grad_norm(
        self,
        max_norm: float,
        counts: Callable[[nn.Parameter], bool] | None = None,
        comms: Sequence[Comm] = (),
        carry: torch.Tensor | None = None,
    ) -> float:
        """Finish the sync, then :meth:`ZeroAdamW.clip_grad_norm`: the global norm of the mean gradient."""
        self.sync.finish_gradient_sync()
        return self.update.clip_grad_norm(max_norm, counts, comms, carry)

    def step(self, lr: float | None = None) -> bool:
        """Finish the sync, update this rank's slice and publish it; False when fp16 overflow skipped it."""
        self.sync.finish_gradient_sync()
        return self.update.step(lr)

    def zero_grad(self) -> None:
        self.sync.zero_grad()
        self.update.clip_coef = 1.0

    # -- reports and checkpoints ------------------------------------------------------------

    def memory(self) -> dict:
        """Model-state bytes this rank holds now (:func:`loom.parallel.zero.state.memory`)."""
        return state.memory(self.groups, self.stage, self.comm.size, self.optim_device)

    def full_parameters(self) -> dict[str, torch.Tensor]:
        return state.full_parameters(self.groups, self.comm)

    def full_state(self) -> dict:
        return state.full_state(self.groups, self.comm, self.scaler)

    def load_full_state(self, full: dict) -> None:
        """Cut this rank's slices from :meth:`full_state`'s layout (any dp size or stage)."""
        state.load_full_state(self.groups, full)
        if self.scaler is not None and full.get("scaler"):
            self.scaler.load_state_dict(full["scaler"])
        self.update.publish()

    def state_dict(self) -> dict:
        return state.state_dict(self.groups, self.stage, self.comm, self.scaler)

    def load_state_dict(self, saved: dict) -> None:
        state.load_state_dict(self.groups, self.stage, self.comm, self.scaler, saved)
        self.update.publish()
