"""Matryoshka heads and the nested loss (Kusupati et al., 2022; ../shared/MRL.md).

Every head maps the representation z [B, d] to logits for each nesting dim,
stacked as [M, B, L] (M = number of dims it serves, L = classes) so that the
loss and the metrics are one vectorised computation whatever the mode:

  mrl    separate linear W_m, b_m on z[:, :m] for every m in the nesting list.
  mrl_e  one tied W [d, L] and one shared bias; logits_m = z[:, :m] W[:m] + b.
         Computed as one d-wide matmul split into blocks plus a cumulative sum.
  ff     the fixed-feature baseline: one linear on z[:, :k] (k = last nesting dim).
  none   a plain classifier on all d dims.
"""

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mrl_jax.errors import ConfigError

HEAD_MODES = ("mrl", "mrl_e", "ff", "none")
LOSS_TYPES = ("softmax", "sigmoid")


def default_nesting(embed_dim: int, smallest: int = 8) -> Tuple[int, ...]:
  """The paper's lists: powers of two from 8 for ResNets (8..2048), and the
  halvings of d for widths that are not powers of two (ViT-B/16: 12..768)."""
  if embed_dim & (embed_dim - 1) == 0:
    dims, m = [], smallest
    while m <= embed_dim:
      dims.append(m)
      m *= 2
    return tuple(dims) if dims else (embed_dim,)
  dims, m = [], embed_dim
  while m >= smallest:
    dims.append(m)
    if m % 2:
      break
    m //= 2
  return tuple(sorted(dims)) if dims else (embed_dim,)


def validate_nesting(nesting: Sequence[int], embed_dim: int) -> Tuple[int, ...]:
  """Checks the nesting list, with an error message that says how to fix it."""
  dims = tuple(int(m) for m in nesting)
  fix = (f"Set --config.mrl.nesting to strictly increasing positive ints ending at "
         f"most at the embedding width {embed_dim}, e.g. {default_nesting(embed_dim)}.")
  if not dims:
    raise ConfigError(f"The nesting list is empty. {fix}")
  if any(m <= 0 for m in dims):
    raise ConfigError(f"Nesting dims must be positive, got {list(dims)}. {fix}")
  if any(b <= a for a, b in zip(dims, dims[1:])):
    raise ConfigError(f"Nesting dims must be strictly increasing, got {list(dims)}. {fix}")
  if dims[-1] > embed_dim:
    raise ConfigError(f"Largest nesting dim {dims[-1]} exceeds the embedding width "
                     f"{embed_dim}. {fix}")
  return dims


def head_dims(mode: str, nesting: Sequence[int], embed_dim: int,
              ff_dim: Optional[int] = None) -> Tuple[int, ...]:
  """The dims a head produces logits for (one row of the [M, B, L] stack each)."""
  if mode in ("mrl", "mrl_e"):
    return tuple(nesting)
  if mode == "ff":
    if not ff_dim or not 0 < ff_dim <= embed_dim:
      raise ConfigError(f"Head mode 'ff' needs --config.mrl.ff_dim in [1, {embed_dim}] "
                       f"(the k of FF-k), got {ff_dim}.")
    return (int(ff_dim),)
  if mode == "none":
    return (embed_dim,)
  raise ConfigError(f"Unknown head mode {mode!r}; choose one of {HEAD_MODES}.")


class MatryoshkaHead(nnx.Module):
  """Logits for every nesting dim, stacked [M, B, L]; see the module docstring."""

  def __init__(self, mode: str, nesting: Sequence[int], embed_dim: int, num_classes: int,
               *, rngs: nnx.Rngs, ff_dim: Optional[int] = None, bias_init: float = 0.0,
               dtype=jnp.float32, param_dtype=jnp.float32):
    # Zero kernels (big_vision's head init) make every dim start at chance; the
    # sigmoid recipe starts the bias at a negative prior (-10 for JFT).
    self.mode = mode
    self.dims = head_dims(mode, nesting, embed_dim, ff_dim)
    self.dtype = dtype
    make = lambda d_in: nnx.Linear(
        d_in, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.constant(bias_init))
    if mode == "mrl":
      self.heads = nnx.List([make(m) for m in self.dims])
    else:  # mrl_e ties one classifier; ff and none have a single one.
      self.linear = make(self.dims[-1])

  def __call__(self, z: jax.Array) -> jax.Array:
    if self.mode == "mrl":
      return jnp.stack([h(z[:, :m]) for h, m in zip(self.heads, self.dims)])
    if self.mode == "mrl_e":
      return tied_nested_logits(z, self.linear.kernel[...], self.linear.bias[...],
                                self.dims, self.dtype)
    return self.linear(z[:, :self.dims[-1]])[None]


def tied_nested_logits(z: jax.Array, kernel: jax.Array, bias: jax.Array,
                       dims: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """MRL-E logits for all prefixes at the cost of one d-wide matmul.

  logits_{m_i} = logits_{m_{i-1}} + z[:, m_{i-1}:m_i] W[m_{i-1}:m_i], so the
  blocks are multiplied once and accumulated with a cumulative sum.
  """
  z, kernel = z.astype(dtype), kernel.astype(dtype)
  bounds = (0,) + tuple(dims)
  blocks = jnp.stack([z[:, a:b] @ kernel[a:b] for a, b in zip(bounds, bounds[1:])])
  return jnp.cumsum(blocks.astype(jnp.float32), axis=0) + bias.astype(jnp.float32)


class MRLClassifier(nnx.Module):
  """Backbone (+ neck) + Matryoshka head: images → (representation z [B, d], logits [M, B, L]).

  The optional neck is a linear projection of the backbone's features to width
  d; z is its output, so z is signed whatever the backbone ends with (a pooled
  ReLU output is ≥ 0, and a short prefix of it can be all zero).
  """

  def __init__(self, backbone: nnx.Module, head: MatryoshkaHead,
               neck: Optional[nnx.Linear] = None):
    self.backbone = backbone
    self.neck = neck
    self.head = head

  def __call__(self, images: jax.Array, *, train: bool) -> Tuple[jax.Array, jax.Array]:
    z = self.backbone(images, train=train)
    if self.neck is not None:
      z = self.neck(z).astype(jnp.float32)
    return z, self.head(z)


def nested_loss(logits: jax.Array, labels: jax.Array, *, loss_type: str = "softmax",
                weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
                ) -> Tuple[jax.Array, dict]:
  """L = Σ_m c_m · loss(logits_m, y), each term a batch mean.

  Args:
    logits: [M, B, L].
    labels: [B] integer classes, or [B, L] multi-hot targets (multi-label data).
    loss_type: "softmax" (cross-entropy) or "sigmoid" (binary cross-entropy
      summed over classes, the JFT recipe).
    weights: c_m per row of `logits`; default 1 for every dim.
    label_smoothing: ε; targets become (1-ε)·y + ε/L.

  Returns:
    (total loss, {"loss_per_dim": [M], "top1_per_dim": [M]}). For multi-hot
    labels, top-1 counts a hit when the arg-max class is one of the labels.
  """
  logits = logits.astype(jnp.float32)
  num_dims = logits.shape[0]
  per_example = per_example_loss(logits, labels, loss_type, label_smoothing)
  loss_per_dim = per_example.mean(axis=1)
  c = jnp.ones((num_dims,)) if weights is None else jnp.asarray(weights, jnp.float32)
  if c.shape != (num_dims,):
    raise ConfigError(f"Got {c.shape[0]} loss weights for {num_dims} nesting dims; give "
                     "one weight per dim in --config.mrl.weights.")
  return jnp.sum(c * loss_per_dim), {"loss_per_dim": loss_per_dim,
                                     "top1_per_dim": top1_per_dim(logits, labels)}


def per_example_loss(logits: jax.Array, labels: jax.Array, loss_type: str = "softmax",
                     label_smoothing: float = 0.0) -> jax.Array:
  """Unweighted loss of every example for logits [..., B, L] → [..., B]."""
  if loss_type not in LOSS_TYPES:
    raise ConfigError(f"Unknown loss {loss_type!r}; choose one of {LOSS_TYPES}.")
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = (jax.nn.one_hot(labels, num_classes) if labels.ndim == 1
             else labels.astype(jnp.float32))
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  if loss_type == "softmax":
    return optax.softmax_cross_entropy(logits, targets)
  return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)


def topk_hits(logits: jax.Array, labels: jax.Array, k: int = 5
              ) -> Tuple[jax.Array, jax.Array]:
  """(top-1 hits, top-k hits) of logits [M, B, L], each bool [M, B]: the label (any label
  of a [B, L] multi-hot target) is the best class / among the k best (k ≤ L)."""
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]  # [M, B, k]
  if labels.ndim == 1:
    hits = top == labels[None, :, None]
  else:
    hits = jnp.take_along_axis(labels[None] > 0, top, axis=-1)
  return hits[..., 0], hits.any(-1)


def top1_per_dim(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose arg-max class is (one of) the label(s), per dim: [M].

  With [B, L] targets a hit is a class of the largest target weight: any label
  of a multi-hot target, the dominant class of a mixup/cutmix blend.
  """
  pred = jnp.argmax(logits, axis=-1)  # [M, B]
  if labels.ndim == 1:
    hit = pred == labels[None]
  else:
    targets = labels.astype(jnp.float32)
    picked = jnp.take_along_axis(targets[None], pred[..., None], axis=-1)[..., 0]
    hit = (picked > 0) & (picked >= targets.max(axis=-1)[None])
  return hit.astype(jnp.float32).mean(axis=1)
