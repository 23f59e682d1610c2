"""Parallelisms applied around the plain model, each over the groups ``loom.distributed`` cuts.

- ``placement``: where each parameter lives (its tp part, replicas, tied copies): one record each;
- ``tensor``, ``vocab``, ``weight_grad``: tensor and sequence parallelism (Megatron-LM), the
  vocabulary-parallel embedding and loss, the linear whose weight gradient can be deferred;
- ``grads``: partial gradients summed over replicas, the global gradient norm;
- ``ddp``: bucketed data parallelism overlapped with backward;
- ``zero``: ZeRO stages 1-3 and offload;
- ``pieces``: each rank's boxes of the global tensors (sharded checkpoints); ``full_state``: a tp
  model's full tensors in memory;
- ``random``: seeds and dropout streams;
- ``pipeline``: partition, schedules as data, simulator, runtime.
"""
