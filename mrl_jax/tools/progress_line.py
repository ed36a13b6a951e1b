"""The status line of a long conversion (build_dataset, the benchmarks' generated data)."""

import sys
import time


class Progress:
  """One status line (rewritten in place on a terminal, every 5 s in a log)."""

  def __init__(self, total: int, stream=sys.stderr):
    self.total, self.done, self.skipped = total, 0, 0
    self.stream, self.tty = stream, stream.isatty()
    self.start = self.last = time.monotonic()

  def add(self, done: int, skipped: int):
    self.done += done
    self.skipped += skipped
    self.show()

  def show(self, final: bool = False):
    now = time.monotonic()
    if not final and now - self.last < (0.5 if self.tty else 5.0):
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate else float("inf")
    line = (f"{self.done}/{self.total} images ({self.skipped} skipped), {rate:.0f} img/s, "
            f"ETA {eta:.0f} s")
    if self.tty:
      self.stream.write(f"\r{line:<72}" + ("\n" if final else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
