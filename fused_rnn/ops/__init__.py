"""Backends: one package per implementation of the recurrence contract (see fused_rnn/backends.py)."""
