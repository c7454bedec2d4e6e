"""Locally generated evaluation tasks (no downloads): haystacks are real prose from ``pydoc_data.topics``."""
from kvpipe.tasks.needle import NeedleCase, make_needle_cases

__all__ = ["NeedleCase", "make_needle_cases"]
