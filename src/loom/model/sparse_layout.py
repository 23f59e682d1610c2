"""One block-sparse layout per model, compiled once for each sequence length it meets.

Every layer of a model attends under the same layout (:func:`loom.sparsity.make_layout` of the
model's config: the same blocks for every layer, BigBird's random ones seeded), so the model
builds one :class:`SparseLayout` for this rank's heads and hands it to each layer's attention.
The layout is built once, not once a layer, and so is what the kernels read (the kernel's
:class:`loom.model.block_sparse.Slots`, FlexAttention's ``BlockMask``): a 12-layer model at 16k
tokens with DeepSpeed's block 16 compiled its fixed layout twelve times, 0.64 s and 18 MiB of
slot indices each.
"""

from __future__ import annotations

import torch

from loom.config import ModelConfig
from loom.model.block_sparse import Slots, dense_mask, flex_block_mask
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
        self._compiled: dict[tuple[str, int, str], object] = {}  # (kind, blocks, device) -> Slots or BlockMask

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
