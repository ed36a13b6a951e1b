"""Top-1 / top-5 of the trained heads at every nesting dim, on val or any extra split.

The robustness evaluations are this evaluator on another split: ImageNet-V2 /
-Sketch (all 1000 classes) and ImageNet-A / -R (200 classes each), prepared like
ImageNet and defined in `config.embed.splits`. For a 200-class split the
logits of the other classes are masked out before the top-k (`class_subset`):
a list of class ids, or "present" — the classes that occur in the split's
labels, which for ImageNet-A / -R prepared with their own class folders are
exactly their 200. Only the examples of those classes are scored. (No
installed package ships the 200 wnids of A / R: TFDS's builders label them
with the full 1000-class list, so there is no named preset.)

Options: split ("val"), class_subset (() → all classes), dims (() → all
trained dims, otherwise a subset of them).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax import mrl
from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import EVALUATORS, EvalResult, Evaluator

_CHUNK = 4096  # examples per device call: bounds the [M, chunk, L] logits on the device


def resolve_class_subset(class_subset, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Bool [num_classes] of the classes the prediction may choose from."""
  if isinstance(class_subset, str):
    if class_subset != "present":
      raise ConfigError(f"class_subset={class_subset!r} is not known: give a list of class "
                        "ids or 'present' (the classes in the split's labels, which for "
                        "ImageNet-A / -R in their own class folders are their 200).")
    if labels.ndim != 1:
      raise ConfigError("class_subset='present' needs one class per example; the labels "
                        "are multi-hot. Give the class ids explicitly.")
    ids = np.unique(labels)
  else:
    ids = np.asarray(list(class_subset), np.int64)
  mask = np.zeros((num_classes,), bool)
  if ids.size == 0:
    mask[:] = True
    return mask
  bad = ids[(ids < 0) | (ids >= num_classes)]
  if bad.size:
    raise ConfigError(f"class_subset has ids {bad.tolist()[:5]} outside [0, {num_classes}).")
  mask[ids] = True
  return mask


@jax.jit
def masked_topk_hits(logits: jax.Array, labels: jax.Array, class_mask: jax.Array):
  """(top-1 hits [M], top-5 hits [M]) summed over examples, with classes outside
  `class_mask` never predicted. Labels are [N] ids or [N, L] multi-hot."""
  top1, top5 = mrl.topk_hits(jnp.where(class_mask, logits, -jnp.inf), labels, k=5)
  return top1.sum(-1), top5.sum(-1)


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
  """Accuracy of the model's own heads (no training); see the module docstring.

  Options: split, class_subset (a named subset or class ids; () → all), dims
  (() → every trained head).
  """

  DEFAULTS = dict(split="val", class_subset=(), dims=())

  def __init__(self, eval_config: ml_collections.ConfigDict, *, dims: Sequence[int],
               num_classes: int):
    super().__init__(eval_config, dims=dims, num_classes=num_classes)
    self.split = self.options["split"]
    subset = self.options["class_subset"]
    self.class_subset = subset if isinstance(subset, str) else tuple(subset)
    self.dims = tuple(int(m) for m in (self.options["dims"] or dims))
    self.check_trained(self.dims)

  def run(self, ctx) -> EvalResult:
    logits, labels = ctx.logits(self.split)
    heads = np.asarray([self.trained_dims.index(m) for m in self.dims])
    class_mask = resolve_class_subset(self.class_subset, labels, self.num_classes)
    if labels.ndim == 1 and not class_mask.all():
      scored = class_mask[labels]  # Examples of the subset's classes only.
      logits, labels = logits[:, scored], labels[scored]
    top1 = np.zeros((len(heads),), np.int64)
    top5 = np.zeros((len(heads),), np.int64)
    for start in range(0, labels.shape[0], _CHUNK):
      hits1, hits5 = masked_topk_hits(logits[heads, start:start + _CHUNK],
                                      labels[start:start + _CHUNK], class_mask)
      top1 += np.asarray(hits1)
      top5 += np.asarray(hits5)
    count = max(labels.shape[0], 1)
    return EvalResult(
        name=self.name, dims=list(self.dims),
        metrics={"top1": (top1 / count).tolist(), "top5": (top5 / count).tolist()},
        extra={"split": self.split, "num_examples": int(labels.shape[0]),
               "num_classes_scored": int(class_mask.sum())})
