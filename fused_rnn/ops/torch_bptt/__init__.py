"""The ``torch`` backend: the recurrence in PyTorch ops with a hand-written BPTT backward.

It is the algorithmic template every kernel follows; README.md beside this file derives it.
"""
from .recurrence import recurrence, unavailable_reason

__all__ = ["recurrence", "unavailable_reason"]
