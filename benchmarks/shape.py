"""The most busy a study's shape allows, whatever the schedule: the ceiling ``scaling.py`` holds its busy
fraction against, so that a study too small or too narrow for its cluster is not taken for a slow scheduler.

A study of ``losses`` losses, each ``search`` search trials (at most ``concurrent`` of a loss at once) and
then one final run (it starts once its loss's last search trial has ended), on ``slots`` slots, with every
trial as long as the others (``d``) and nothing between them. By a time ``t`` at most ``slots × ⌊t / d⌋``
trials have ended, so the study takes at least ``d`` times the largest of:

- ``⌈trials / slots⌉``: every trial in a slot;
- ``⌈search trials / slots⌉ + 1``: every search trial ends before the final run of the loss whose search
  ends last can start;
- ``⌈search / concurrent⌉ + 1``: one loss's search, ``concurrent`` at a time, then its final run.

Busy is then at most trials / (slots × that many trial lengths). ``tests/test_benchmarks.py`` checks, by
trying every schedule of each small study, that the best one takes exactly that many.
"""

from __future__ import annotations

from math import ceil


def rounds_needed(losses: int, search: int, concurrent: int, slots: int) -> int:
    """The fewest trial lengths any schedule of the study takes (the module's docstring says why)."""
    trials = losses * (search + 1)
    return max(ceil(trials / slots), ceil(losses * search / slots) + 1, ceil(search / concurrent) + 1)


def best_busy(losses: int, search: int, concurrent: int, slots: int) -> float:
    """Σ trial time / (slots × wall) of the study's best schedule: trials of equal length, no time lost."""
    return losses * (search + 1) / (slots * rounds_needed(losses, search, concurrent, slots))
