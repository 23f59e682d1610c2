"""Pipeline parallelism: layers split into stages, micro-batches streamed through them.

- :mod:`~loom.parallel.pipeline.schedules`: each schedule as data, one ordered action list
  per rank (pure Python, no processes), plus the consistency check.
- :mod:`~loom.parallel.pipeline.simulate`: times those lists (bubble, peak in-flight).
- :mod:`~loom.parallel.pipeline.partition`: which layers each rank builds.
- :mod:`~loom.parallel.pipeline.runtime`: executes a rank's list with point-to-point transfers.

Nothing is imported here, so importing the schedules never pulls in torch.distributed.
"""
