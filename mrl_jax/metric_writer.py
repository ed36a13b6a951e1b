"""The one way metrics leave the process: JSON lines + TensorBoard, process 0 only.

`metrics.jsonl` in the workdir has one object per write ({"step": …, name: value});
TensorBoard event files (tensorboardX, no TensorFlow) sit beside it.
"""

import json
import os
import re
from typing import Dict

import jax
import numpy as np


class MetricWriter:
  """Writes scalars; a no-op on every process but 0."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      # TensorBoard tags allow [\w./-] only; e.g. "mAP@10" → "mAP_at_10".
      tag = re.sub(r"[^\w./-]", "_", name.replace("@", "_at_"))
      self._tb.add_scalar(tag, value, int(step))

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def per_dim_scalars(prefix: str, name: str, dims, values) -> Dict[str, float]:
  """{'train/top1_d8': …, 'train/top1_d16': …} from one value per nesting dim."""
  values = np.asarray(values)
  return {f"{prefix}/{name}_d{m}": float(v) for m, v in zip(dims, values)}
