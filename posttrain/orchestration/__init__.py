"""Orchestration: Ray cluster start/attach, named actors, placement groups, metrics."""
