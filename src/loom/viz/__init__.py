"""Plots: training loss curves (:mod:`loom.viz.plot`) and pipeline schedules.

Everything here draws on matplotlib ``Figure`` objects with the Agg canvas, never pyplot,
so no display is needed and no global figure state is kept.
"""
