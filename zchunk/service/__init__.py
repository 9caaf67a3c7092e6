"""Unattended replication: jobs from a config file (``config``); the scheduler, history, status and
metrics will live beside it (docs/architecture.md, "Rooms for what comes next")."""
