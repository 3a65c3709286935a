"""Orchestration: Ray cluster start/attach, named actors, calls with deadlines (``cluster``)."""
