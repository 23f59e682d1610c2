"""One block-sparse layout per model, compiled once for each sequence length it meets.

Every layer of a model attends under the same layout (:func:`loom.sparsity.make_layout` of the
model's config: the same blocks for every layer, BigBird's random ones seeded), so the model
builds one :class:`SparseLayout` for this rank's heads and hands it to each layer's attention.
The layout is built once, not once a layer, and so is what the kernels read (the C++ kernel's
:class:`loom.model.block_sparse_cpp.KeptBlocks`, the torch-ops kernel's
:class:`loom.model.block_sparse.Slots`, FlexAttention's ``BlockMask``): a 12-layer model at 16k
tokens with DeepSpeed's block 16 compiled its fixed layout twelve times, 0.64 s and 18 MiB of
slot indices each.

Off CUDA the layout's ``kernel`` picks the kernel (:data:`loom.sparsity.KERNELS`): ``cpp``
loom's compiled one (it must build here), ``torch`` the torch-ops one, ``auto`` the compiled one
where it builds, else the torch-ops one with a warning saying why (it is slower, and keeps the
probabilities of narrow rows for backward: more memory than the planner assumed).
"""

from __future__ import annotations

import warnings

import torch

from loom import native
from loom.config import ModelConfig
from loom.model.block_sparse import Slots, block_sparse_attention, dense_mask, flex_block_mask
from loom.model.block_sparse_cpp import KERNEL, KeptBlocks, cpp_block_sparse_attention
from loom.sparsity import make_layout


class SparseLayout:
    """This rank's heads' layout ``(heads, blocks, blocks)`` over ``model.layout_len`` tokens, and
    its compiled forms per (blocks, device). A sequence of ``s`` tokens takes the top-left
    ``ceil(s / block)`` blocks, so a prefix attends as it does inside a longer sequence."""

    def __init__(self, cfg: ModelConfig, heads: slice) -> None:
        with torch.device("cpu"):  # data, not a parameter: never on the meta device
            whole = make_layout(cfg.sparse_attention, cfg.n_heads, cfg.layout_len)
        self.layout = whole[heads].clone()
        self.block = cfg.sparse_attention.block
        self.kernel = cfg.sparse_attention.kernel
        # (kind, blocks, device) -> Slots, KeptBlocks or BlockMask
        self._compiled: dict[tuple[str, int, str], object] = {}
        if self.kernel == "cpp":
            native.library(KERNEL)  # builds it now, or says why it cannot, before any step

    def corner(self, seq: int) -> torch.Tensor:
        """The layout of the first ``seq`` tokens' blocks (the last one partial where the block
        does not divide ``seq``)."""
        blocks = -(-seq // self.block)
        return self.layout[:, :blocks, :blocks]

    def slots(self, seq: int, device: torch.device) -> Slots:
        """The kernel's compiled layout for ``seq`` tokens (a multiple of the block)."""
        key = ("slots", seq // self.block, str(device))
        if key not in self._compiled:
            self._compiled[key] = Slots.of(self.corner(seq), self.block, device)
        return self._compiled[key]

    def kept(self, seq: int) -> KeptBlocks:
        """The C++ kernel's compiled layout for ``seq`` tokens (a multiple of the block)."""
        key = ("kept", seq // self.block, "cpu")
        if key not in self._compiled:
            self._compiled[key] = KeptBlocks.of(self.corner(seq), self.block)
        return self._compiled[key]

    def uses_cpp(self, q: torch.Tensor) -> bool:
        """Whether :meth:`attend` runs the C++ kernel for ``q``: on CPU, in fp32 or 16-bit, where
        ``kernel`` allows it and the kernel builds (``auto``: else a warning; ``cpp``: else
        :class:`loom.native.NativeUnavailable`)."""
        if self.kernel == "torch" or q.device.type != "cpu" or q.dtype == torch.float64:
            return False
        try:
            native.library(KERNEL)  # built once a process; a failure too is remembered
        except native.NativeUnavailable as why:
            if self.kernel == "cpp":
                raise
            warnings.warn(  # the same text from the same line: Python shows it once
                f"{why.problem} Sparse attention runs loom's torch-ops kernel instead: slower, and it "
                "keeps more for backward than the planner assumed. Set model.sparse_attention.kernel = "
                "'torch' to choose it and silence this.",
                stacklevel=2,
            )
            return False
        return True

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention under the layout off CUDA, ``(batch, heads, seq, head_dim)``, seq a multiple
        of the block: the C++ kernel or the torch-ops one (:meth:`uses_cpp`)."""
        seq = q.shape[-2]
        if self.uses_cpp(q):
            return cpp_block_sparse_attention(q, k, v, self.kept(seq))
        return block_sparse_attention(q, k, v, self.slots(seq, q.device))

    def block_mask(self, seq: int, device: torch.device):  # noqa: ANN201
        """FlexAttention's ``BlockMask`` for ``seq`` tokens (CUDA)."""
        key = ("flex", seq // self.block, str(device))
        if key not in self._compiled:
            self._compiled[key] = flex_block_mask(self.corner(seq), self.block, seq, device)
        return self._compiled[key]

    def element_mask(self, seq: int, device: torch.device) -> torch.Tensor:
        """``(heads, seq, seq)`` True where a query attends a key: for a length that is not a
        multiple of the block (generation), through dense attention."""
        return dense_mask(self.corner(seq), self.block)[:, :seq, :seq].to(device)
