"""Analytic models of a run (parameters, FLOPs, memory, communication). No processes touched."""
