"""Processes, groups and counted communication: mesh, context, comm, ring, launch, watchdog."""
