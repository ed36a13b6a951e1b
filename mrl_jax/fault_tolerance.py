"""What stops a run early but cleanly: preemption signals and steps that went non-finite.

Preemption. In a single process, SIGTERM (what schedulers and `docker stop`
send) and SIGINT (Ctrl-C) only set a flag; the loop sees it after the current
step, saves that step, waits for the write and exits 0. A second signal acts at
once (the default action). With `jax.distributed` up, SIGTERM is JAX's
preemption service's (it also receives TPU maintenance notices): it agrees on
one step across hosts and `Checkpointer.reached_preemption` turns true there on
every host, so all of them save the same step. SIGINT is not intercepted in
that case (one host cannot stop the others safely). A process that dies without
saving is not this module's: the others stop within a bound (mrl_jax/cli.py).

Non-finite steps. The train step does not apply an update whose loss or gradient
is NaN/inf (steps.py) and reports `nonfinite`; `NonFiniteGuard` counts them and
stops the run after `max_in_a_row` consecutive ones.
"""

import os
import signal
from typing import Callable, Optional

import jax
from absl import logging

from mrl_jax.errors import UserError


class Preempted(Exception):
  """Raised after the checkpoint of the preempted step is on disk; exit status 0."""


class TrainingDiverged(UserError, FloatingPointError):
  """Too many non-finite steps in a row; the message names the fix."""


class PreemptionWatcher:
  """Turns SIGTERM / SIGINT into a flag the loop polls once per step."""

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self._reached_preemption = reached_preemption
    self.signal_name: Optional[str] = None
    self._previous = {}
    if jax.process_count() == 1:  # Else JAX's preemption service owns SIGTERM.
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None:  # Asked twice: stop now.
      signal.signal(signum, self._previous[signum])
      os.kill(os.getpid(), signum)
      return
    self.signal_name = signal.Signals(signum).name
    logging.warning("Received %s: saving a checkpoint after the current step, then exiting "
                    "(send it again to stop immediately).", self.signal_name)

  def should_stop(self, step: int) -> bool:
    """True when this step must be saved and the run ended (same step on every host)."""
    if self._reached_preemption(step):
      self.signal_name = self.signal_name or "a preemption notice"
      return True
    return self.signal_name is not None

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


class NonFiniteGuard:
  """Counts skipped (non-finite) steps; raises after `max_in_a_row` consecutive ones.

  Each step's flag is read one step late (after the next step is dispatched),
  so the loop never waits for the device just to check it.
  """

  def __init__(self, max_in_a_row: int, where_checkpoints: Callable[[], str]):
    self.max_in_a_row = max_in_a_row
    self.total = 0
    self._in_a_row = 0
    self._pending = None
    self._where = where_checkpoints

  def update(self, step: int, nonfinite: jax.Array) -> None:
    """Records step `step`'s flag and checks the previous one."""
    previous, self._pending = self._pending, (step, nonfinite)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step: int, nonfinite: jax.Array) -> None:
    if not bool(nonfinite):
      self._in_a_row = 0
      return
    self.total += 1
    self._in_a_row += 1
    logging.warning("Step %d: non-finite loss or gradient; the update was skipped "
                    "(%d in a row, %d in total).", step, self._in_a_row, self.total)
    if self.max_in_a_row and self._in_a_row >= self.max_in_a_row:
      raise TrainingDiverged(
          f"Steps {step - self._in_a_row + 1}..{step}: {self._in_a_row} steps in a row had a "
          f"non-finite loss or gradient (their updates were skipped), so training stopped. "
          f"{self._where()} Lower --config.optim.lr, set --config.optim.clip_norm, or raise "
          "--config.checkpoint.max_nonfinite_in_a_row.")
