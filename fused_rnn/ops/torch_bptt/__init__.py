"""The ``torch`` backend: the recurrence in PyTorch ops with a hand-written BPTT backward.

It is the algorithmic template every kernel follows; README.md beside this file derives it.
"""
from .recurrence import OPTIONS, recurrence, unavailable_reason

__all__ = ["OPTIONS", "recurrence", "unavailable_reason"]
