"""The one way metrics leave the process: JSON lines + TensorBoard, process 0 only.

`metrics.jsonl` in the workdir has one object per write ({"step": …, name: value});
TensorBoard event files (tensorboardX, no TensorFlow) sit beside it in tensorboard/.

On a local disk each line is appended and flushed as it is written. An object
store (`--workdir=gs://…`) has no append, so there the file is kept whole rather
than split into parts: read once when the writer opens (a resumed run or a later
`mrl_jax.evaluate` continues it), then the whole object rewritten at most every
REMOTE_FLUSH_SECONDS and on close. One file in one format on every file system,
so every reader (tests, a user's `pandas.read_json(..., lines=True)`) is
unchanged. If the object's size changed since this writer last saw it (another
writer, e.g. an evaluation beside the training), it is read again before the
rewrite, so those lines are kept (best effort: not a lock). A killed process
loses at most its last REMOTE_FLUSH_SECONDS of lines there. TensorBoard events go
the same way: tensorboardX writes through a factory registered for the URL
scheme that keeps the event file in memory and rewrites it on each flush (what
tensorboardX's own gs:// writer does, but through epath: no google-cloud-storage).
"""

import io
import json
import re
import time
from typing import Callable, Dict

import jax
import numpy as np

from mrl_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REMOTE_FLUSH_SECONDS = 30.0


class MetricWriter:
  """Writes scalars; a no-op on every process but 0."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.active:
      self._jsonl = JsonLines(paths.join(workdir, METRICS_FILE))
      self._tb = _summary_writer(paths.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for name, value in scalars.items():
      # TensorBoard tags allow [\w./-] only; e.g. "mAP@10" → "mAP_at_10".
      tag = re.sub(r"[^\w./-]", "_", name.replace("@", "_at_"))
      self._tb.add_scalar(tag, value, int(step))

  def flush(self) -> None:
    if self.active:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    """Writes what is buffered; safe to call twice (the loop closes it in a finally)."""
    if self.active:
      self.active = False
      self._jsonl.close()
      self._tb.close()


class JsonLines:
  """One JSON-lines file: appended locally, kept whole and rewritten on a store."""

  def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
    self._path, self._clock = paths.as_path(path), clock
    self._local = paths.is_local(path)
    self._pending = []
    if self._local:
      paths.makedirs(self._path.parent)
      self._file = self._path.open("ab")
    else:
      self._base = paths.read_text(self._path) if self._path.exists() else ""
      self._last_flush = clock()

  def write(self, line: str) -> None:
    if self._local:
      self._file.write(line.encode("utf-8"))
      self._file.flush()
      return
    self._pending.append(line)
    if self._clock() - self._last_flush >= REMOTE_FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self._local:
      self._file.flush()
      return
    if not self._pending:
      return
    if self._path.exists() and self._path.stat().length != len(self._base.encode("utf-8")):
      self._base = paths.read_text(self._path)  # Another writer's lines: keep them.
    text = self._base + "".join(self._pending)
    paths.write_text(self._path, text)
    self._base, self._pending, self._last_flush = text, [], self._clock()

  def close(self) -> None:
    self.flush()
    if self._local:
      self._file.close()


def _summary_writer(logdir: str):
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=import-outside-toplevel
  if paths.is_local(logdir):
    return SummaryWriter(logdir)
  record_writer.register_writer_factory(paths.scheme(logdir), _EventFiles())
  return SummaryWriter(logdir, flush_secs=REMOTE_FLUSH_SECONDS)


class _EventFiles:
  """tensorboardX's writer factory interface (record_writer.register_writer_factory)."""

  def open(self, path: str) -> "_EventFile":
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    paths.makedirs(path)


class _EventFile:
  """An event file on a store: all of it in memory, the object rewritten on flush."""

  def __init__(self, path: str):
    self._path, self._data, self._dirty = path, io.BytesIO(), False

  def write(self, data: bytes) -> None:
    self._data.write(data)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      paths.write_bytes(self._path, self._data.getvalue())
      self._dirty = False

  def close(self) -> None:
    self.flush()


def per_dim_scalars(prefix: str, name: str, dims, values) -> Dict[str, float]:
  """{'train/top1_d8': …, 'train/top1_d16': …} from one value per nesting dim."""
  values = np.asarray(values)
  return {f"{prefix}/{name}_d{m}": float(v) for m, v in zip(dims, values)}
