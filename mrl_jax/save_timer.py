"""The wall-clock half of the checkpoint cadence (`checkpoint.every_minutes`).

A kill -9 (or a lost host) loses the work since the last save; the step interval
alone makes that unbounded in time for slow steps, so the Checkpointer also saves
when `every_minutes` have passed, whichever comes first.
"""

from typing import Callable, Optional, Tuple

import numpy as np
from jax.experimental import multihost_utils


class SaveTimer:
  """Says when `minutes` of wall time have passed since the last save (0: never).

  A save is collective, so every process must decide alike although their clocks
  differ: with several processes, process 0's clock decides and the answer is
  broadcast. The broadcast is a host sync, so it is not made every step: process 0
  also sends the step of the next check, placed at 9/10 of the time left at its
  measured steps per second; the checks close in on the deadline, a few per interval.
  In a single process the local clock is read each step, with no sync at all.
  """

  _SHORTEN = 0.9  # The next check at this fraction of the time left: never late by much.

  def __init__(self, minutes: float, clock: Callable[[], float], num_processes: int):
    self._interval_s = 60.0 * float(minutes)
    self._clock = clock
    self._shared = num_processes > 1
    self._last_save = clock()
    self._next_check = 0
    self._checked: Optional[Tuple[int, float]] = None  # (step, time) of the last check
    self.broadcasts = 0

  def saved(self) -> None:
    self._last_save = self._clock()

  def due(self, step: int) -> bool:
    if self._interval_s <= 0:
      return False
    if not self._shared:
      return self._clock() - self._last_save >= self._interval_s
    if step < self._next_check:
      return False
    now = self._clock()
    left = self._last_save + self._interval_s - now
    due = left <= 0
    gap = 1
    if self._checked is not None and step > self._checked[0] and now > self._checked[1]:
      steps_per_s = (step - self._checked[0]) / (now - self._checked[1])
      gap = int(self._SHORTEN * (self._interval_s if due else left) * steps_per_s)
    self._checked = (step, now)
    # Only process 0's values count.
    due, gap = (int(x) for x in multihost_utils.broadcast_one_to_all(
        np.array([due, min(max(gap, 1), 1 << 30)], np.int32)))
    self.broadcasts += 1
    self._next_check = step + gap
    return bool(due)
