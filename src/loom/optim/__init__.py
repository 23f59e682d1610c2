"""Optimizers over flat or per-parameter tensors (AdamW, fp32 master weights), the fp16 loss scale
and the learning-rate schedule."""
