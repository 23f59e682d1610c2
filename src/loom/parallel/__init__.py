"""Parallelisms applied around the plain model: data (DDP), later tensor, pipeline, ZeRO."""
