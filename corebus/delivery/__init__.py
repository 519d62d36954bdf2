"""Delivery off the training thread: log sinks and spools, background writers, run snapshots and alerts."""
