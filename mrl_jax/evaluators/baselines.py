"""Frozen features at a dim m: the MRL prefix, and the SVD and random-selection baselines.

The paper compares z[:m] of an MRL model with two training-free ways of getting
m numbers out of a full-dim representation: its projection on the top-m right
singular vectors of the train features (SVD) and m coordinates picked at
random. Every frozen-feature evaluator (linear probe, few-shot, k-NN,
retrieval) takes an option `features: "prefix" | "svd" | "random"` and gets its
features through `Features` (or the one-shot `features_at_dim`), so each table
can be filled for all three. The few helpers these evaluators share (row
subsets, the single-label check) live here too.

All three methods are *nested*: the features at m are the first m columns of
the features at any m' > m (the singular vectors are sorted by singular value,
and the random coordinates are a prefix of one random permutation). Evaluators
rely on this to transform once at the largest dim and slice per dim.

The SVD is not centred (the issue's "top-m right singular vectors" of the
train matrix) and is fitted from the d×d Gram matrix accumulated over row
blocks, so a 1.28M × 2048 float16 memmap is never copied whole.
"""

from typing import Optional, Tuple

import numpy as np

from mrl_jax.errors import ConfigError

METHODS = ("prefix", "svd", "random")
_BLOCK_ROWS = 65536


def _blocks(n: int):
  for start in range(0, n, _BLOCK_ROWS):
    yield slice(start, min(start + _BLOCK_ROWS, n))


def svd_basis(train_z: np.ndarray) -> np.ndarray:
  """[d, d] float32 right singular vectors of train_z as columns, largest first.

  Computed as the eigenvectors of Σ_blocks zᵀz (float64), with each vector's sign
  fixed so that its largest-magnitude entry is positive (SVD signs are arbitrary;
  a fixed convention makes the features reproducible).
  """
  d = train_z.shape[1]
  gram = np.zeros((d, d), np.float64)
  for rows in _blocks(train_z.shape[0]):
    block = np.asarray(train_z[rows], np.float32)
    gram += block.T @ block  # float32 products per block (2× faster), summed in float64.
  eigenvalues, vectors = np.linalg.eigh(gram)
  vectors = vectors[:, np.argsort(-eigenvalues, kind="stable")]
  peak = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(d)]
  return (vectors * np.where(peak < 0, -1.0, 1.0)).astype(np.float32)


class Features:
  """Train and val features at any dim m under one method; the SVD is fitted once.

  Args:
    train_z: [N, d] train embeddings (an np.memmap is read block by block).
    val_z: [Q, d] val embeddings.
    method: "prefix" (z[:, :m], the MRL representation), "svd" or "random".
    seed: which random permutation of the coordinates ("random" only).
  """

  def __init__(self, train_z: np.ndarray, val_z: np.ndarray, method: str = "prefix",
               seed: int = 0):
    if method not in METHODS:
      raise ConfigError(f"Unknown features method {method!r}; choose one of {METHODS} "
                        "(the evaluator option `features`).")
    if train_z.ndim != 2 or val_z.ndim != 2 or train_z.shape[1] != val_z.shape[1]:
      raise ValueError(f"train and val embeddings must be [N, d] with the same d; got "
                       f"{train_z.shape} and {val_z.shape}.")
    self.train_z, self.val_z, self.method = train_z, val_z, method
    self.dim = train_z.shape[1]
    self._basis: Optional[np.ndarray] = None
    self._columns = None
    if method == "random":
      self._columns = np.random.default_rng(seed).permutation(self.dim)

  def _check_dim(self, m: int) -> None:
    if not 1 <= m <= self.dim:
      raise ConfigError(f"Dim {m} is outside 1..{self.dim}, the embedding width; fix the "
                        "evaluator's `dims` option.")

  def take(self, split: str, rows, m: int) -> np.ndarray:
    """[len(rows), m] float32 features of some rows ("train" or "val"), read on demand.

    Lets a mini-batch loop gather its rows straight from a memmap instead of
    materialising the whole split at the largest dim.
    """
    self._check_dim(m)
    z = self.train_z if split == "train" else self.val_z
    if self.method == "prefix":
      return np.asarray(z[rows, :m], np.float32)
    if self.method == "random":
      # In permutation order, so that the features at m prefix those at any m' > m.
      return np.asarray(z[rows][:, self._columns[:m]], np.float32)
    if self._basis is None:
      self._basis = svd_basis(self.train_z)
    return np.asarray(z[rows], np.float32) @ self._basis[:, :m]

  def at_dim(self, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train [N, m], val [Q, m]) float32 features at dim m, built block by block."""
    self._check_dim(m)
    def whole(split, z):
      out = np.empty((z.shape[0], m), np.float32)
      for rows in _blocks(z.shape[0]):
        out[rows] = self.take(split, rows, m)
      return out
    return whole("train", self.train_z), whole("val", self.val_z)


def features_at_dim(train_z: np.ndarray, val_z: np.ndarray, m: int, method: str = "prefix",
                    seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """(train_m, val_m) for one dim; to evaluate several dims, reuse one `Features`."""
  return Features(train_z, val_z, method, seed).at_dim(m)


def subsample(num_rows: int, max_rows: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of a random subset of at most `max_rows` rows (0 → all rows).

  Random rather than the first rows, since embedding files are often sorted by
  class; sorted so that a memmap is read front to back.
  """
  if max_rows <= 0 or max_rows >= num_rows:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng(seed).choice(num_rows, max_rows, replace=False))


def check_single_label(labels: np.ndarray, evaluator: str) -> None:
  """Softmax classifiers need one class per example."""
  if labels.ndim != 1:
    raise ConfigError(f"The {evaluator} evaluator needs one class per example, but the "
                      f"labels are {labels.shape} (multi-hot). Drop it from config.evals "
                      "for multi-label data.")
