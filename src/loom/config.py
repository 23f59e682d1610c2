"""Run configuration: dataclasses, TOML files, ``--set a.b=value`` overrides, validation.

A config is built in three layers, later ones winning: the dataclass defaults (with the
model preset's values filled in), a TOML file, then command-line overrides. Every field is
validated before anything runs; each error names the field, the value and the fix.

Batch arithmetic is derived, never repeated:
``global_batch = micro_batch * grad_accum * dp``. The config may name any two and loom
derives the third, or all three, which must then agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.errors import LoomError
from loom.optim.zero_one import ZeroOneSchedule
from loom.parallel.pipeline.partition import split_layers
from loom.parallel.pipeline.schedules import SCHEDULES
from loom.presets import PRESETS, preset_fields
from loom.sparsity import SparsityConfig

FAMILIES = ("gpt2", "llama")
PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE_POLICIES = ("none", "full", "selective")
ROPE_SCALINGS = ("none", "linear", "llama3")
ATTENTIONS = ("dense", "sparse", "topk", "lsh")
DEFAULT_MICRO_BATCH = 16


@dataclass
class ModelConfig:
    """Architecture. ``preset`` fills every field the user does not set explicitly."""

    preset: str = "tiny"
    family: str = "gpt2"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no grouping)
    d_ff: int | None = None  # None: 4*d_model (gpt2) or the SwiGLU 8/3 rule (llama)
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    max_seq_len: int = 256
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE frequency scaling for long contexts (Llama 3.1's "llama3", or "linear" position interpolation)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # how much longer than rope_original_max_seq_len the context is
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / high are kept
    rope_original_max_seq_len: int = 8192  # llama3: the context the frequencies were trained for
    tie_embeddings: bool | None = None  # None: True for gpt2, False for llama
    bias: bool | None = None  # None: True for gpt2, False for llama
    init_std: float = 0.02
    # "dense": causal scaled_dot_product_attention; "sparse": block-sparse (loom.sparsity, loom.model.block_sparse_cpp);
    # "topk": each query's top_k largest scores (loom.model.topk_attention); "lsh": Reformer's
    # hashed buckets (loom.model.lsh_attention)
    attention: str = "dense"
    top_k: int = 32
    lsh_buckets: int = 8  # 1 or even: buckets per hash round
    lsh_hashes: int = 2  # rounds, each with fresh rotations
    lsh_chunk: int = 64  # sorted positions per chunk; a chunk attends to itself and the one before
    lsh_shared_qk: bool = True  # keys are the unit-length queries (no key projection)
    # reversible blocks (RevNet/Reformer): the residual stream carried twice, each block's input
    # recomputed from its output in backward, so activations do not grow with depth
    reversible: bool = False
    sparse_attention: SparsityConfig = field(default_factory=SparsityConfig)  # [model.sparse_attention]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        hidden = int(2 * (4 * self.d_model) / 3)
        return 256 * ((hidden + 255) // 256) if self.d_model >= 256 else 8 * ((hidden + 7) // 8)

    @property
    def tied(self) -> bool:
        return self.family == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def use_bias(self) -> bool:
        return self.family == "gpt2" if self.bias is None else self.bias

    def validate(self) -> None:
        _check_choice("model.family", self.family, FAMILIES)
        for name in ("n_layers", "d_model", "n_heads", "max_seq_len"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.d_model % self.n_heads:
            raise LoomError(
                f"model.d_model = {self.d_model} is not divisible by model.n_heads = {self.n_heads}.",
                "choose n_heads that divides d_model (each head gets d_model / n_heads features).",
            )
        if self.family == "llama" and self.head_dim % 2:
            raise LoomError(
                f"model.d_model / model.n_heads = {self.head_dim} is odd; RoPE rotates feature pairs.",
                "choose d_model and n_heads so the head dimension is even.",
            )
        if self.n_kv_heads is not None:
            _check_positive("model.n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise LoomError(
                    f"model.n_kv_heads = {self.n_kv_heads} does not divide model.n_heads = {self.n_heads}.",
                    "grouped-query attention needs n_heads to be a multiple of n_kv_heads.",
                )
            if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
                raise LoomError(
                    f"model.n_kv_heads = {self.n_kv_heads} with model.family = 'gpt2'.",
                    "grouped-query attention is a llama-family feature; remove n_kv_heads or set family = 'llama'.",
                )
        if self.d_ff is not None:
            _check_positive("model.d_ff", self.d_ff)
        if self.vocab_size is not None:
            _check_positive("model.vocab_size", self.vocab_size)
        if not 0.0 <= self.dropout < 1.0:
            raise LoomError(
                f"model.dropout = {self.dropout} is outside [0, 1).", "use a probability such as 0.1, or 0 for none."
            )
        _check_positive("model.norm_eps", self.norm_eps)
        _check_positive("model.rope_theta", self.rope_theta)
        _check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none":
            if self.family != "llama":
                raise LoomError(
                    f"model.rope_scaling = {self.rope_scaling!r} with model.family = {self.family!r}.",
                    "RoPE scaling applies to the llama family (gpt2 has learned positions); remove it.",
                )
            if self.rope_factor < 1.0:
                raise LoomError(
                    f"model.rope_factor = {self.rope_factor} is below 1.", "use the context extension factor, e.g. 8."
                )
            _check_positive("model.rope_original_max_seq_len", self.rope_original_max_seq_len)
            if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise LoomError(
                    f"model.rope_low_freq_factor = {self.rope_low_freq_factor} and model.rope_high_freq_factor = "
                    f"{self.rope_high_freq_factor}: llama3 scaling needs 0 < low < high.",
                    "use Llama 3.1's values: low 1, high 4.",
                )
        _check_positive("model.init_std", self.init_std)
        _check_choice("model.attention", self.attention, ATTENTIONS)
        _check_positive("model.top_k", self.top_k)
        for name in ("lsh_buckets", "lsh_hashes", "lsh_chunk"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.lsh_buckets > 1 and self.lsh_buckets % 2:
            raise LoomError(
                f"model.lsh_buckets = {self.lsh_buckets} is odd; angular LSH splits rotations into +/- halves.",
                f"use 1 or an even count, e.g. {self.lsh_buckets + 1}.",
            )
        if self.attention == "sparse":
            self.sparse_attention.validate()
            if self.sparse_attention.attention != "unidirectional":
                raise LoomError(
                    "model.sparse_attention.attention = 'bidirectional' in a decoder: a token would attend to the "
                    "tokens it is trained to predict.",
                    "use attention = 'unidirectional' (the default) for training.",
                )

    @property
    def layout_len(self) -> int:
        """The sequence a sparse model's one layout covers: max_seq_len rounded up to the block;
        every shorter sequence takes its top-left corner (a prefix sees what the whole sees)."""
        block = self.sparse_attention.block
        return -(-self.max_seq_len // block) * block


@dataclass
class TrainConfig:
    """Optimisation and the training loop."""

    steps: int = 1000
    seq_len: int = 128
    micro_batch: int | None = None
    global_batch: int | None = None
    grad_accum: int | None = None
    microbatches: int | None = None  # pipeline name for grad_accum: micro-batches per step and dp rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 turns clipping off
    # a step whose loss or gradient norm is inf or NaN is skipped on every rank; this many in a row stop
    # the run, naming the step and the first parameter whose gradient was not finite (fp16: the loss scaler's)
    max_bad_steps: int = 3
    memory_check: bool = True  # refuse a run whose predicted memory per rank exceeds the device's or host's
    precision: str = "fp32"
    seed: int = 1337
    ckpt_every: int = 250  # 0: save only at the end
    keep_ckpts: int = 3
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 8
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    sample_tokens: int = 256  # tokens generated at the end of a run (0: none)
    sample_prompt: str = "def "
    # activation recomputation (loom.model.recompute): none, full (a block keeps its input), selective
    # (the core attention); on the first recompute_layers blocks of each pipeline chunk (None: all;
    # "auto": the fewest that fit train.memory_budget_gb per rank, by the planner's model)
    recompute: str = "none"
    recompute_layers: int | str | None = None
    memory_budget_gb: float = 0.0  # 0: no budget; else the memory a rank may use (for recompute_layers = "auto")
    # torch.profiler over steps profile_start .. + profile_steps - 1 (1-based; 0: off), on rank 0 or every
    # rank: a Chrome trace and an operator table per rank in RUN_DIR/profile/ (loom.train.profiling)
    profile_start: int = 0
    profile_steps: int = 2
    profile_all_ranks: bool = False

    def validate(self) -> None:
        for name in ("steps", "seq_len", "keep_ckpts", "eval_batches", "max_bad_steps", "profile_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("micro_batch", "global_batch", "grad_accum", "microbatches"):
            if getattr(self, name) is not None:
                _check_positive(f"train.{name}", getattr(self, name))
        if self.lr <= 0:
            raise LoomError(f"train.lr = {self.lr} must be positive.", "set a learning rate such as train.lr=3e-4.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise LoomError(
                f"train.min_lr_ratio = {self.min_lr_ratio} is outside [0, 1].",
                "use e.g. 0.1 (decay to a tenth of train.lr).",
            )
        for name in ("warmup_steps", "ckpt_every", "eval_every", "sample_tokens", "seed", "profile_start"):
            _check_non_negative(f"train.{name}", getattr(self, name))
        for name in ("weight_decay", "grad_clip"):
            _check_non_negative(f"train.{name}", getattr(self, name))
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LoomError(
                    f"train.{name} = {getattr(self, name)} is outside [0, 1).", "use e.g. beta1=0.9, beta2=0.95."
                )
        _check_positive("train.eps", self.eps)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.recompute", self.recompute, RECOMPUTE_POLICIES)
        _check_non_negative("train.memory_budget_gb", self.memory_budget_gb)
        layers = self.recompute_layers
        if layers is not None:
            if isinstance(layers, str) and layers != "auto":
                raise LoomError(
                    f'train.recompute_layers = {layers!r} is neither a number of blocks nor "auto".',
                    'give a number of blocks per pipeline chunk (e.g. 2), "auto", or remove it (all blocks).',
                )
            if isinstance(layers, int):
                _check_non_negative("train.recompute_layers", layers)
            if self.recompute == "none":
                raise LoomError(
                    f'train.recompute_layers = {layers!r} with train.recompute = "none".',
                    'say what those blocks recompute: train.recompute = "full" or "selective".',
                )
            if layers == "auto" and not self.memory_budget_gb:
                raise LoomError(
                    'train.recompute_layers = "auto" needs the memory a rank may use.',
                    "set train.memory_budget_gb (e.g. 70 for an 80 GB GPU, leaving room for the allocator).",
                )
        if self.profile_start > self.steps:
            raise LoomError(
                f"train.profile_start = {self.profile_start} is past the run's last step (train.steps = {self.steps}).",
                f"profile a step from 1 to {self.steps} (e.g. train.profile_start = {min(self.steps, 10)}), or 0 for none.",
            )
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise LoomError(
                f"train.device = {self.device!r} is not a device loom knows.", "use auto, cpu, cuda or cuda:N."
            )


@dataclass
class DataConfig:
    """Where tokens come from."""

    corpus: str = "stdlib"  # stdlib, a folder of .txt/.jsonl files, or a prepared token file (.bin)
    tokenizer: str = "byte"  # byte, or a path to a tokenizer.json
    val_fraction: float = 0.05
    cache_dir: str = ""  # empty: $LOOM_CACHE or ~/.cache/loom
    max_bytes: int = 0  # 0: the whole corpus; otherwise read at most this many bytes of text

    def validate(self) -> None:
        if not self.corpus:
            raise LoomError(
                "data.corpus is empty.", "set data.corpus=stdlib, a folder of .txt/.jsonl files, or a token file."
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise LoomError(
                f"data.val_fraction = {self.val_fraction} is outside (0, 0.5).",
                "use e.g. 0.05 (5% of documents held out).",
            )
        _check_non_negative("data.max_bytes", self.max_bytes)


@dataclass
class ParallelConfig:
    """Process layout: ``dp * tp * pp == world size``; dp is derived when left out."""

    dp: int | None = None
    tp: int = 1
    pp: int = 1
    vp: int = 1  # virtual pipeline chunks per rank (interleaved_1f1b)
    schedule: str = "1f1b"  # gpipe, 1f1b, interleaved_1f1b, zero_bubble
    sequence_parallel: bool = False  # split activations along the sequence between tp regions
    timeout_s: float = 300.0  # a collective waiting longer than this ends the run with a report
    backend: str = "auto"  # auto (nccl with CUDA, else gloo), gloo, nccl
    # CPU ranks of one host: "auto" pins each rank's compute threads to its own slice of the cores when they fit
    # (the backend's message threads stay free), "none" leaves the OS to place them; either way each computes
    # with cores / local ranks threads unless OMP_NUM_THREADS is set
    cpu_affinity: str = "auto"
    # how a CPU rank waits for a collective over gloo: "auto" polls its completion for a few ms before
    # sleeping when each local rank has a core of its own (a sleep and wake-up cost ~1 ms a call here),
    # "poll" always does, "block" sleeps at once (DDP's gradient buckets sleep at once under every choice)
    comm_wait: str = "auto"

    def validate(self) -> None:
        for name in ("tp", "pp", "vp"):
            _check_positive(f"parallel.{name}", getattr(self, name))
        _check_choice("parallel.schedule", self.schedule, tuple(SCHEDULES))
        if self.vp > 1 and self.schedule != "interleaved_1f1b":
            raise LoomError(
                f"parallel.vp = {self.vp} with parallel.schedule = {self.schedule!r}.",
                'virtual stages need parallel.schedule = "interleaved_1f1b", or set parallel.vp = 1.',
            )
        if self.dp is not None:
            _check_positive("parallel.dp", self.dp)
        _check_positive("parallel.timeout_s", self.timeout_s)
        _check_choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        _check_choice("parallel.cpu_affinity", self.cpu_affinity, ("auto", "none"))
        _check_choice("parallel.comm_wait", self.comm_wait, ("auto", "poll", "block"))


@dataclass
class DDPConfig:
    """Bucketed gradient all-reduce overlapped with backward."""

    bucket_mb: float = 25.0  # gradient bytes per all-reduce message
    # what carries the buckets: auto = shared memory where the dp ranks share a host and the
    # gradients are on the CPU, else the process group's backend; shm insists; backend never uses shm
    transport: str = "auto"
    # a layer's own linear weights: the dW GEMM writes the gradient into its bucket slot (no copy)
    fuse_weight_grads: bool = True

    def validate(self) -> None:
        _check_positive("ddp.bucket_mb", self.bucket_mb)
        _check_choice("ddp.transport", self.transport, ("auto", "shm", "backend"))


ZERO_OFFLOADS = ("none", "optimizer")


OPTIMIZERS = ("adamw", "onebit_adam", "zero_one_adam")
ZERO_ONE_FIELDS = ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper")


@dataclass
class OptimConfig:
    """The optimizer: AdamW (``train.lr``, ``beta1``, ...); 1-bit Adam (loom.optim.onebit): AdamW
    for ``freeze_step`` steps, then the variance frozen and the momentum averaged over dp through
    the 1-bit compressed all-reduce; or 0/1 Adam (loom.optim.zero_one): the variance updated on
    exponentially thinning steps up to ``var_freeze_step``, 1-bit momentum between them, then
    local steps synchronised every 1, 2, ... ``local_step_clipper`` steps (DeepSpeed's names)."""

    name: str = "adamw"
    freeze_step: int | None = None  # onebit_adam; None: 15% of train.steps
    var_freeze_step: int | None = None  # zero_one_adam; None: 15% of train.steps
    var_update_scaler: int | None = None  # zero_one_adam; None: 16
    local_step_scaler: int | None = None  # zero_one_adam; None: 32678
    local_step_clipper: int | None = None  # zero_one_adam; None: 16

    def validate(self, train: TrainConfig) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        if self.freeze_step is not None:
            _check_positive("optim.freeze_step", self.freeze_step)
            if self.name != "onebit_adam":
                raise LoomError(
                    f"optim.freeze_step = {self.freeze_step} with optim.name = {self.name!r}.",
                    "freeze_step is 1-bit Adam's: set optim.name = 'onebit_adam', or remove optim.freeze_step"
                    + (" (0/1 Adam's is var_freeze_step)." if self.name == "zero_one_adam" else "."),
                )
        for name in ZERO_ONE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            _check_positive(f"optim.{name}", value)
            if self.name != "zero_one_adam":
                raise LoomError(
                    f"optim.{name} = {value} with optim.name = {self.name!r}.",
                    f"{name} is 0/1 Adam's: set optim.name = 'zero_one_adam', or remove optim.{name}.",
                )

    def freeze(self, steps: int) -> int:
        """1-bit Adam's warm-up steps, or 0/1 Adam's last variance step."""
        chosen = self.var_freeze_step if self.name == "zero_one_adam" else self.freeze_step
        return chosen if chosen is not None else max(1, round(0.15 * steps))

    def zero_one_schedule(self, steps: int) -> ZeroOneSchedule:
        """0/1 Adam's step kinds for a run of ``steps`` steps."""
        given = {f: getattr(self, f) for f in ZERO_ONE_FIELDS[1:] if getattr(self, f) is not None}
        return ZeroOneSchedule(self.freeze(steps), **given)


@dataclass
class ZeroConfig:
    """ZeRO over the dp group (``loom.parallel.zero``); stage 0 is plain DDP + AdamW.

    Stages 1-3 shard the optimizer states, then the gradients, then the parameters over
    dp. They keep fp32 master weights and AdamW moments; ``train.precision`` is then the
    dtype the model computes in (its parameters and, unless ``grad_dtype`` says fp32,
    gradients). With one dp rank nothing is sharded, but the master weights and offload
    still apply.
    """

    stage: int = 0
    offload: str = "none"  # "optimizer": fp32 master weights and moments in host memory, updated there
    grad_dtype: str | None = None  # None: train.precision's dtype; "fp32" keeps 16-bit runs' gradients in fp32

    def validate(self, train: TrainConfig, parallel: ParallelConfig) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise LoomError(
                f"zero.stage = {self.stage} is not a ZeRO stage.",
                "set zero.stage to 0 (DDP), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters).",
            )
        _check_choice("zero.offload", self.offload, ZERO_OFFLOADS)
        if self.grad_dtype is not None:
            _check_choice("zero.grad_dtype", self.grad_dtype, PRECISIONS)
            if self.grad_dtype not in ("fp32", train.precision):
                allowed = " or ".join(f'"{d}"' for d in dict.fromkeys((train.precision, "fp32")))
                raise LoomError(
                    f"zero.grad_dtype = {self.grad_dtype!r} with train.precision = {train.precision!r}.",
                    f"gradients are kept in the compute dtype or in fp32: set zero.grad_dtype to {allowed}, "
                    "or remove it.",
                )
        if self.stage == 0:
            for name, value, default in (("offload", self.offload, "none"), ("grad_dtype", self.grad_dtype, None)):
                if value != default:
                    raise LoomError(
                        f"zero.{name} = {value!r} with zero.stage = 0.",
                        f"zero.{name} needs ZeRO's optimizer: set zero.stage to 1, 2 or 3, or remove zero.{name}.",
                    )
        if self.stage == 3 and parallel.schedule == "zero_bubble":
            raise LoomError(
                'zero.stage = 3 with parallel.schedule = "zero_bubble": ZeRO-3 frees a layer\'s parameters '
                "after its backward, which zero-bubble splits in two parts run apart.",
                'use parallel.schedule = "1f1b" with ZeRO-3, or zero.stage = 2 with zero_bubble.',
            )
        if self.stage == 3 and parallel.pp == 1 and parallel.vp > 1:
            raise LoomError(
                f"zero.stage = 3 with parallel.vp = {parallel.vp} and parallel.pp = 1: the one rank would hold "
                "both the embedding's chunk and the head's, and ZeRO-3 gathers them as one unit.",
                "use parallel.pp of 2 or more with virtual stages, or parallel.vp = 1, or zero.stage = 2.",
            )


@dataclass
class BatchShape:
    """The derived batch arithmetic: ``global_batch = micro_batch * grad_accum * dp``."""

    micro_batch: int
    grad_accum: int
    dp: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.parallel.validate()
        self.ddp.validate()
        self.zero.validate(self.train, self.parallel)
        self.optim.validate(self.train)
        if self.optim.name == "zero_one_adam" and self.zero.stage > 0:
            raise LoomError(
                f"optim.name = 'zero_one_adam' with zero.stage = {self.zero.stage}: 0/1 Adam's local steps move "
                "each dp rank's whole model apart between synchronisations, and its variance steps interleave "
                "with compressed ones; ZeRO keeps one sharded copy of the optimizer states and masters.",
                "use zero.stage = 0 with zero_one_adam, or optim.name = 'onebit_adam' with zero.stage = 1 or 2.",
            )
        if self.optim.name == "onebit_adam" and self.zero.stage == 3:
            raise LoomError(
                "optim.name = 'onebit_adam' with zero.stage = 3: 1-bit Adam compresses each rank's whole local "
                "gradient and applies the decoded mean momentum to the whole model, while ZeRO-3 reduces and "
                "frees each block's gradient inside backward and no rank holds the parameters in full.",
                "use zero.stage = 1 or 2 with onebit_adam (the optimizer states stay sharded), "
                "or optim.name = 'adamw' with ZeRO-3.",
            )
        if self.train.seq_len > self.model.max_seq_len:
            raise LoomError(
                f"train.seq_len = {self.train.seq_len} is longer than model.max_seq_len = {self.model.max_seq_len}.",
                f"lower train.seq_len, or raise model.max_seq_len to at least {self.train.seq_len}.",
            )
        if self.model.attention == "sparse":
            sparse = self.model.sparse_attention
            sparse.validate(self.model.layout_len)
            if self.train.seq_len % sparse.block:
                raise LoomError(
                    f"train.seq_len = {self.train.seq_len} is not a multiple of model.sparse_attention.block = "
                    f"{sparse.block}; the block-sparse kernel trains on whole blocks.",
                    f"use a train.seq_len that is a multiple of {sparse.block}.",
                )
        if self.model.attention == "lsh" and self.train.seq_len % self.model.lsh_chunk:
            raise LoomError(
                f"train.seq_len = {self.train.seq_len} is not a multiple of model.lsh_chunk = {self.model.lsh_chunk}.",
                f"use a chunk that divides it (e.g. {_divisor_below(self.train.seq_len, self.model.lsh_chunk)}).",
            )
        if self.model.reversible:
            clash = [
                (
                    self.parallel.pp > 1,
                    f"parallel.pp = {self.parallel.pp}",
                    "a pipeline stage passes one stream, not two",
                ),
                (
                    self.zero.stage == 3,
                    "zero.stage = 3",
                    "ZeRO-3's unit gathering follows ordinary backward, not a reversible stack's recomputation",
                ),
                (
                    self.train.recompute != "none",
                    f"train.recompute = {self.train.recompute!r}",
                    "reversible blocks already recompute everything but their outputs",
                ),
            ]
            for bad, what, why in clash:
                if bad:
                    raise LoomError(
                        f"model.reversible = true with {what}: {why}.",
                        f"drop {what.split(' = ')[0]} (use the default) or set model.reversible = false.",
                    )
        self._validate_tensor_parallel()
        shape = self.batch(dp=self.parallel.dp or self._implied_dp())
        self._validate_pipeline(shape)

    def _validate_pipeline(self, shape: BatchShape) -> None:
        parallel = self.parallel
        per_chunk = self.model.n_layers
        if parallel.pp * parallel.vp > 1:
            per_chunk = max(len(r) for r in split_layers(self.model.n_layers, parallel.pp * parallel.vp))
        layers = self.train.recompute_layers
        if isinstance(layers, int) and layers > per_chunk:
            raise LoomError(
                f"train.recompute_layers = {layers} but a pipeline chunk holds at most {per_chunk} blocks "
                f"(model.n_layers = {self.model.n_layers} over parallel.pp x parallel.vp = {parallel.pp * parallel.vp}).",
                f"use at most {per_chunk}, or remove train.recompute_layers to recompute every block.",
            )
        if parallel.schedule == "interleaved_1f1b" and shape.grad_accum % parallel.pp:
            raise LoomError(
                f"the interleaved schedule needs the micro-batch count (train.microbatches = {shape.grad_accum}) "
                f"to be a multiple of parallel.pp = {parallel.pp}.",
                f"use train.microbatches = {parallel.pp * max(1, shape.grad_accum // parallel.pp)} "
                "(or another multiple of pp).",
            )

    def _validate_tensor_parallel(self) -> None:
        """What the model's shapes must satisfy to be split tp ways."""
        tp, model = self.parallel.tp, self.model
        if tp == 1:
            if self.parallel.sequence_parallel:
                raise LoomError(
                    "parallel.sequence_parallel = true with parallel.tp = 1.",
                    "sequence parallelism splits activations across the tp group: set parallel.tp above 1, "
                    "or turn sequence_parallel off.",
                )
            return
        divisors = [d for d in range(2, model.n_heads + 1) if model.n_heads % d == 0]
        if model.n_heads % tp:
            raise LoomError(
                f"model.n_heads = {model.n_heads} is not divisible by parallel.tp = {tp}.",
                f"choose parallel.tp among {divisors}, or change model.n_heads.",
            )
        kv = model.kv_heads
        if kv % tp and tp % kv:
            raise LoomError(
                f"model.n_kv_heads = {kv} and parallel.tp = {tp}: neither divides the other.",
                "tp must divide the KV heads (each rank gets kv/tp of them) or be a multiple of them "
                "(each KV head replicated on tp/kv ranks).",
            )
        if model.ffn_dim % tp:
            raise LoomError(
                f"the MLP width {model.ffn_dim} (model.d_ff) is not divisible by parallel.tp = {tp}.",
                f"set model.d_ff to a multiple of {tp}.",
            )
        if self.parallel.sequence_parallel and self.train.seq_len % tp:
            raise LoomError(
                f"train.seq_len = {self.train.seq_len} is not divisible by parallel.tp = {tp}, "
                "and sequence parallelism splits the sequence tp ways.",
                f"choose train.seq_len as a multiple of {tp}, or turn parallel.sequence_parallel off.",
            )

    def _implied_dp(self) -> int:
        """dp before the world size is known: what global = micro x accum x dp implies when all three
        are named (checked against the real dp once processes exist), else 1."""
        train = self.train
        accum = train.grad_accum or train.microbatches
        if train.global_batch and train.micro_batch and accum and train.global_batch % (train.micro_batch * accum) == 0:
            return train.global_batch // (train.micro_batch * accum)
        return 1

    def batch(self, dp: int = 1) -> BatchShape:
        accum, micro = self.train.grad_accum, self.train.microbatches
        if accum is not None and micro is not None and accum != micro:
            raise LoomError(
                f"train.grad_accum = {accum} and train.microbatches = {micro} name the same number differently.",
                "set only one of them (microbatches is the pipeline name for grad_accum).",
            )
        return derive_batch(self.train.micro_batch, self.train.global_batch, accum or micro, dp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def derive_batch(micro: int | None, global_: int | None, accum: int | None, dp: int) -> BatchShape:
    """Fill in the one unnamed batch number, or check that all three named agree."""
    if micro is not None and global_ is not None and accum is not None:
        if micro * accum * dp != global_:
            raise LoomError(
                f"train.global_batch = {global_} but train.micro_batch = {micro} x train.grad_accum = {accum}"
                f" x dp = {dp} = {micro * accum * dp}.",
                "name only two of micro_batch, grad_accum and global_batch and let loom derive the third.",
            )
        return BatchShape(micro, accum, dp)
    if global_ is None:
        return BatchShape(micro or DEFAULT_MICRO_BATCH, accum or 1, dp)
    if micro is None and accum is None:
        accum = 1
    if micro is None:
        if global_ % (accum * dp):
            raise LoomError(
                f"train.global_batch = {global_} is not divisible by train.grad_accum = {accum} x dp = {dp}.",
                f"choose a global_batch that is a multiple of {accum * dp}.",
            )
        return BatchShape(global_ // (accum * dp), accum, dp)
    if global_ % (micro * dp):
        raise LoomError(
            f"train.global_batch = {global_} is not divisible by train.micro_batch = {micro} x dp = {dp}.",
            f"choose a global_batch that is a multiple of {micro * dp}, or another micro_batch.",
        )
    return BatchShape(micro, global_ // (micro * dp), dp)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated config from an optional TOML file and ``a.b=value`` overrides."""
    raw = _read_toml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the nested dict ``raw`` with each ``section.key=value`` applied."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for item in overrides:
        section, key, value = parse_override(item)
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise LoomError(
                f"[{section}] is not a table, so {item!r} cannot set a key in it.", f"write [{section}] as a table."
            )
        table, _, inner = key.rpartition(".")
        if table:  # section.table.key: a key of a nested table
            nested = target.get(table, {})
            if not isinstance(nested, dict):
                raise LoomError(
                    f"{section}.{table} is not a table, so {item!r} cannot set a key in it.",
                    f"write [{section}.{table}] as a table.",
                )
            target[table] = {**nested, inner: value}
        else:
            target[key] = value
    return merged


def resume_config(
    saved: dict[str, Any], batch: dict[str, int] | None, overrides: list[str] | tuple[str, ...]
) -> Config:
    """The config of a run resumed from a checkpoint, under the layout ``overrides`` give.

    The checkpoint's config is what the user named; what loom derived from the layout is
    derived again: ``parallel.dp`` (from the world size) and the micro-batch count
    (``train.grad_accum``/``microbatches``), keeping the step's global batch and micro-batch
    (``batch``, as the checkpoint recorded them), so the data order, the lr schedule and each
    step's gradient stay those of the uninterrupted run. A field the overrides name wins.
    """
    named = {parse_override(item)[:2] for item in overrides}
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in saved.items()}
    if batch is not None:
        train = raw.setdefault("train", {})
        for key in ("global_batch", "micro_batch"):
            if ("train", key) not in named:
                train[key] = batch[key]
        for key in ("grad_accum", "microbatches"):
            if ("train", key) not in named:
                train.pop(key, None)
        if ("parallel", "dp") not in named:
            raw.get("parallel", {}).pop("dp", None)
    return config_from_dict(apply_overrides(raw, overrides))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Typed, validated config from a nested dict (as TOML or a checkpoint stores it)."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            raise _unknown("section", section, list(sections))
        if not isinstance(values, dict):
            raise LoomError(
                f"[{section}] must be a table of keys, got {values!r}.",
                f"write it as [{section}] followed by key = value lines.",
            )
    model_raw = dict(raw.get("model", {}))
    preset = _coerce("model.preset", model_raw.get("preset", ModelConfig.preset), str)
    if preset not in PRESETS:
        raise _unknown("model preset", preset, list(PRESETS), field_name="model.preset")
    model_values = {**preset_fields(preset), **model_raw}
    config = Config(
        model=_build(ModelConfig, "model", model_values),
        train=_build(TrainConfig, "train", raw.get("train", {})),
        data=_build(DataConfig, "data", raw.get("data", {})),
        parallel=_build(ParallelConfig, "parallel", raw.get("parallel", {})),
        ddp=_build(DDPConfig, "ddp", raw.get("ddp", {})),
        zero=_build(ZeroConfig, "zero", raw.get("zero", {})),
        optim=_build(OptimConfig, "optim", raw.get("optim", {})),
    )
    config.validate()
    return config


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown("key", f"{section}.{key}", [f"{section}.{k}" for k in known])
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted for floats; a table fills a
    nested config (``[model.sparse_attention]``)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if dataclasses.is_dataclass(kind):
            if isinstance(value, kind):
                return value
            if isinstance(value, dict):
                return _build(kind, name, value)
            raise LoomError(f"{name} = {value!r} is not a table.", f"write it as [{name}] with key = value lines.")
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return list(value)
            continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, str) and len(value) > MAX_TEXT:
            raise LoomError(
                f"{name} = {_show(value)} is {len(value):,} characters long, more than any setting takes ({MAX_TEXT:,}).",
                f"give {name} a short value (a path, a name, a prompt).",
            )
        if kind in (bool, str) and isinstance(value, kind):
            return value
    wanted = " or ".join(_type_name(k) for k in allowed if k is not type(None))
    raise LoomError(f"{name} = {_show(value)} is not a {wanted}.", f"give {name} a {wanted} value.")


MAX_TEXT = 4096  # characters of one string setting


def _show(value: Any) -> str:
    """``repr(value)``, cut to 60 characters: a message names a long value, it does not echo it."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}...{text[-6:]} ({len(text):,} characters)"


def _divisor_below(n: int, want: int) -> int:
    return max(d for d in range(1, min(n, want) + 1) if n % d == 0)


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LoomError(
            f"config file {path} does not exist.", "pass the path of a TOML file, e.g. --config configs/demo.toml."
        )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LoomError(
            f"config file {path} is not valid TOML: {exc}.", "fix the syntax at the position named."
        ) from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """``train.lr=3e-4`` -> ("train", "lr", 3e-4). Values are TOML literals; bare words are strings.
    A nested table's key is ``section.table.key`` (``model.sparse_attention.mode=bigbird``): its
    key comes back as "table.key"."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) not in (2, 3) or not all(parts):
        raise LoomError(f"override {item!r} is not of the form section.key=value.", "write e.g. --set train.lr=3e-4.")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return parts[0], ".".join(parts[1:]), value


def _unknown(what: str, name: str, known: list[str], field_name: str | None = None) -> LoomError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    label = f"{field_name} = {_show(name)}" if field_name else _show(name)
    return LoomError(f"unknown {what} {label}.", f"{hint}known: {', '.join(known)}.")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise LoomError(f"{name} = {value} must be positive.", f"set {name} to a value above zero.")


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise LoomError(f"{name} = {value} must not be negative.", f"set {name} to zero or more.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LoomError(
            f"{name} = {_show(value)} is not one of {', '.join(choices)}.",
            f"set {name} to one of {', '.join(choices)}.",
        )


def check_launch(config: Config, world: int):  # noqa: ANN201 (a ParallelDims: distributed is imported lazily)
    """Everything ``loom train`` checks before it starts ``world`` ranks: the config's own validation
    (done when it was built), the layout for that world (``ParallelDims.resolve``: dp x tp x pp,
    heads and layers over tp and the pipeline) and the batch arithmetic for its dp."""
    from loom.distributed.mesh import ParallelDims

    dims = ParallelDims.resolve(config.parallel, world)
    config._validate_pipeline(config.batch(dp=dims.dp))  # the micro-batch count under the real dp
    return dims
