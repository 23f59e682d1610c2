"""One rank's memory predicted from a config: model states plus activations in flight.

model states: ``loom.plan.memory.model_state_bytes`` over this rank's parameters (exactly as
loom shards them: ``loom.plan.model.count_rank_parameters``), with loom's dtypes: without ZeRO fp32 parameters and gradients
and AdamW's two fp32 moments (K = 8); with ZeRO the compute dtype's parameters and
gradients (``zero.grad_dtype`` may keep them in fp32) and fp32 master weights and moments
(K = 12; 8 in fp32, where the parameters are their own master); ZeRO-Offload moves the
optimizer term (master weights and moments) to host memory.

activations: per (micro-batch, chunk) the chunk's layers (``layer_activation_bytes``: N of
them under the recompute policy, the rest keeping everything) plus the model's ends on the
chunks that embed or apply the head, times the most (micro-batch, chunk) pairs the schedule
keeps in flight on this rank (the pipeline simulator's ``peak_inflight``: 1 without a
pipeline, p - r on stage r of 1F1B, Megatron's warm-up count + 1 for the interleaved one).
Under autocast with fp32 parameters each micro-batch in flight also keeps 16-bit copies of
the weights it used (2 bytes per parameter of its chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.attention_walk import saved_probability_columns, slot_width
from loom.config import Config
from loom.parallel.pipeline.partition import rank_stages
from loom.parallel.pipeline.schedules import build_schedule
from loom.parallel.pipeline.simulate import simulate
from loom.plan.activations import Dtypes, LayerShape, attention_kernel, layer_activation_bytes
from loom.plan.memory import compression_state_bytes, model_state_bytes
from loom.plan.model import count_rank_parameters

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class RankMemory:
    """Predicted bytes of one rank, by category."""

    params: float
    grads: float
    optim: float  # on the device, or in host memory with zero.offload = "optimizer" (then 0 here)
    activations: float
    weight_copies: float
    host_optim: float = 0.0  # offloaded master weights and moments, in host memory

    @property
    def total(self) -> float:
        """On the device (offloaded optimizer state not included)."""
        return self.params + self.grads + self.optim + self.activations + self.weight_copies


def layer_shape(config: Config) -> LayerShape:
    m = config.model
    lsh = (m.lsh_hashes, m.lsh_chunk, m.lsh_shared_qk)
    columns = 0
    if m.attention == "sparse" and m.sparse_attention.kernel == "torch":  # the C++ kernel and FlexAttention keep none
        width = slot_width(m.sparse_attention, m.n_heads, config.train.seq_len)
        columns = saved_probability_columns(width, m.sparse_attention.block)
    shape = (m.family, m.d_model, m.n_heads, m.kv_heads, m.ffn_dim, m.use_bias, m.dropout, m.top_k, lsh)
    return LayerShape(*shape, sparse_columns=columns)


def dtypes_of(config: Config) -> Dtypes:
    """loom's dtypes: ZeRO keeps 16-bit parameters in mixed precision; otherwise fp32 ones under autocast."""
    compute = BYTES[config.train.precision]
    params = compute if config.zero.stage else 4
    return Dtypes(params=params, compute=compute)


def predict_rank_memory(
    config: Config,
    dp: int,
    pp_rank: int = 0,
    recompute_layers: int | None = None,
    device: str = "cpu",
    peak_inflight: int | None = None,
) -> RankMemory:
    """This rank's predicted memory (module docstring); ``recompute_layers``: blocks per chunk
    under ``train.recompute`` (None: ``train.recompute_layers`` if a number, else all);
    ``peak_inflight``: (micro-batch, chunk) pairs held at once, if known (else simulated)."""
    model, train, parallel = config.model, config.train, config.parallel
    tp, pp, vp = parallel.tp, parallel.pp, parallel.vp
    psi = count_rank_parameters(model, tp, pp, vp, pp_rank)
    stage, precision = config.zero.stage, train.precision
    if stage:
        param_bytes = BYTES[precision]
        grad_bytes = 4 if config.zero.grad_dtype == "fp32" else param_bytes
        k = 8 if precision == "fp32" and config.zero.offload == "none" else 12  # offload: a master of its own
    else:
        param_bytes = grad_bytes = 4
        k = 8
    states = model_state_bytes(stage, round(psi), dp, param_bytes, grad_bytes, k)
    batch = config.batch(dp=dp)
    if recompute_layers is None and isinstance(train.recompute_layers, int):
        recompute_layers = train.recompute_layers
    plans = rank_stages(model.n_layers, pp, vp, pp_rank)
    shape, dtypes = layer_shape(config), dtypes_of(config)
    kernel = attention_kernel(device, model.dropout, model.attention, model.sparse_attention.kernel)
    s, b, sp = train.seq_len, batch.micro_batch, parallel.sequence_parallel and tp > 1

    def layer(policy: str) -> float:
        return layer_activation_bytes(shape, s, b, tp, sp, policy, dtypes, kernel)

    chunk_bytes = []
    for plan in plans:
        n = len(plan.layers)
        chosen = _recomputed_of(n, train.recompute, recompute_layers)
        total = chosen * layer(train.recompute) + (n - chosen) * layer("none")
        if model.reversible:  # only the last block's two streams are kept (loom.model.reversible)
            total = 2 * dtypes.params * s * b * model.d_model / (tp if sp else 1)
        total += _ends_bytes(config, plan.embed, plan.head, s, b, tp, sp, dtypes)
        chunk_bytes.append(total)
    if peak_inflight is not None:
        peak = peak_inflight
    elif pp * vp > 1:
        peak = simulate(build_schedule(parallel.schedule, pp, batch.grad_accum, vp)).peak_inflight[pp_rank]
    else:
        peak = 1
    activations = peak * max(chunk_bytes)
    copies = 0.0
    if precision != "fp32" and not stage:  # autocast's 16-bit copies of the weights matmuls use, per micro-batch
        uncast = model.max_seq_len * model.d_model if model.family == "gpt2" else 0  # learned positions
        uncast += (2 * model.n_layers + 1) * model.d_model * (2 if model.family == "gpt2" and model.use_bias else 1)
        copies = peak * 2 * (psi - uncast / (tp * pp)) / max(1, vp)
    optim = config.optim
    if optim.name in ("onebit_adam", "zero_one_adam"):  # 1/D and the error feedback once compressing
        local = optim.name == "zero_one_adam" and optim.zero_one_schedule(train.steps).has_local_steps(train.steps)
        states["optim"] += compression_state_bytes(psi, dp, anchor=local)
    if config.zero.stage and config.zero.offload == "optimizer":  # ZeRO-Offload: the optimizer term moves to the host
        return RankMemory(states["params"], states["grads"], 0.0, activations, copies, host_optim=states["optim"])
    return RankMemory(states["params"], states["grads"], states["optim"], activations, copies)


def recomputed_blocks(config: Config, pp_rank: int = 0, recompute_layers: int | None = None) -> int:
    """Blocks pipeline rank ``pp_rank`` recomputes per micro-batch: over its chunks, the first
    N of each (N = ``recompute_layers``, else ``train.recompute_layers`` if a number, else every
    block; 0 under ``train.recompute = "none"``), as ``loom.model.recompute`` wraps them."""
    train, parallel = config.train, config.parallel
    if recompute_layers is None and isinstance(train.recompute_layers, int):
        recompute_layers = train.recompute_layers
    plans = rank_stages(config.model.n_layers, parallel.pp, parallel.vp, pp_rank)
    return sum(_recomputed_of(len(p.layers), train.recompute, recompute_layers) for p in plans)


def _recomputed_of(blocks: int, recompute: str, recompute_layers: int | None) -> int:
    """Of a chunk's ``blocks``, those that recompute: the first ``recompute_layers`` (None: all)."""
    if recompute == "none":
        return 0
    return blocks if recompute_layers is None else min(blocks, recompute_layers)


def recomputed_layer_bytes(config: Config, device: str = "cpu") -> float:
    """Activation bytes one layer's recomputation writes again per micro-batch on one tp rank:
    what ``train.recompute`` drops for backward (its kept bytes less those without it)."""
    train, parallel = config.train, config.parallel
    if train.recompute == "none" or config.model.reversible:
        return 0.0
    shape, dtypes = layer_shape(config), dtypes_of(config)
    kernel = attention_kernel(
        device, config.model.dropout, config.model.attention, config.model.sparse_attention.kernel
    )
    b, tp = config.batch(dp=parallel.dp).micro_batch, parallel.tp
    sp = parallel.sequence_parallel and tp > 1

    def layer(policy: str) -> float:
        return layer_activation_bytes(shape, train.seq_len, b, tp, sp, policy, dtypes, kernel)

    return layer("none") - layer(train.recompute)


def _ends_bytes(config: Config, embed: bool, head: bool, s: int, b: int, t: int, sp: bool, dtypes: Dtypes) -> float:
    """Embedding (token ids, the dropout mask), final norm, head input and the fp32 log-softmax."""
    model = config.model
    e = s * b * model.d_model
    d = t if sp else 1
    out = 0.0
    if embed:
        out += 8 * s * b + (e / d if model.dropout else 0)  # ids (int64), the one-byte mask
    if head:
        norm = (2 * dtypes.params * e + 4 * s * b) if model.family == "llama" else (dtypes.params * e + 8 * s * b)
        vocab = model.vocab_size or 50257
        out += norm / d + dtypes.compute * e / d + 4 * s * b * vocab / t
    return out


def choose_recompute_layers(config: Config, dp: int, pp_rank: int, budget_bytes: float, device: str = "cpu"):
    """The fewest blocks per chunk to recompute so this rank's prediction fits ``budget_bytes``:
    (count, its prediction, whether it fits). When even every block does not fit, every block."""
    per_chunk = max(
        len(plan.layers) for plan in rank_stages(config.model.n_layers, config.parallel.pp, config.parallel.vp, pp_rank)
    )
    for n in range(per_chunk + 1):
        predicted = predict_rank_memory(config, dp, pp_rank, n, device)
        if predicted.total <= budget_bytes:
            return n, predicted, True
    return per_chunk, predict_rank_memory(config, dp, pp_rank, per_chunk, device), False


def inflight(schedule: str, p: int, m: int, vp: int, rank: int) -> int:
    """(micro-batch, chunk) pairs rank ``rank`` holds at once, in closed form: GPipe m; 1F1B and
    zero-bubble p - r; interleaved Megatron's warm-up count (p - r - 1) * 2 + (vp - 1) * p, plus one."""
    if p == 1:
        return 1
    if schedule == "gpipe":
        return m
    if schedule == "interleaved_1f1b":
        return min(m * vp, (p - rank - 1) * 2 + (vp - 1) * p + 1)
    return min(m, p - rank)
