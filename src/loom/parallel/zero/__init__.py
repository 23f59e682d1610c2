"""ZeRO stages 1-3 with mixed-precision AdamW and ZeRO-Offload over the dp group.

- ``layout.py``: parameters flattened into padded groups, each rank owning an equal slice;
- ``sync.py``: gradients reduce-scattered during backward (hooks, ``no_sync``);
- ``update.py``: AdamW on this rank's slice (fp32 master, offload), clipping, publishing;
- ``gather.py``: stage 3's units, gathered before use and freed after;
- ``state.py``: memory by category, checkpoints in any layout;
- ``optimizer.py``: :class:`~loom.parallel.zero.optimizer.ZeroOptimizer`, the parts put together.

The trainer's side (tp and pp chores on the shards) is ``loom.train.zero_step``.
"""
