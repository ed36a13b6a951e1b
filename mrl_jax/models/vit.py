"""Vision Transformer (ViT) backbones, big_vision-style variants ("B/16", "L/14").

Pre-norm encoder; with pool "cls" the parameter layout (and count) matches
timm's `vit_*_patch*_224` minus the classifier head, so converted checkpoints
map one-to-one. Initialisation follows big_vision/timm:
  * patch embedding: LeCun normal kernel (flax Conv default), zero bias;
  * dense layers (attention, MLP, MAP head): Xavier uniform, zero biases;
  * position embedding: normal(0.02); cls token: zeros; MAP probe: Xavier.

Dropout randomness lives in per-layer `RngStream`s forked from the caller's
"dropout" stream, so it is part of the model state: a functional training step
(`nnx.split` -> `jax.jit` -> `nnx.merge`) that carries the state forward gets
fresh masks every step, and `train` is always an explicit call argument.

Speed options (`config.model.options`; each default is the plain path, and
tests/test_vit_levers.py checks each against it):
  patch_embed="matmul"   the patch embedding as reshape + one matmul with the
                         conv's own kernel (same parameters, so checkpoints and
                         weight import are unchanged), in place of a strided conv.
  attention="xla"|"cudnn"|"auto"  `jax.nn.dot_product_attention` in the encoder
                         blocks in place of the einsum-softmax ("einsum"); "auto"
                         is cudnn on GPU, xla elsewhere. cudnn pads the sequence to
                         a multiple of `attention_pad` (8; 0: off) and masks the
                         padding keys, since it may refuse odd lengths such as 197.
  drop_path_draw="per_step"  one bernoulli draw [depth, 2, B] for the stochastic
                         depth of every block, applied as a per-sample multiply,
                         in place of one draw per branch ("per_block").
  matmul="fp8"           the encoder blocks' dense layers (q, k, v, out, MLP) as FP8
                         matmuls with per-step amax scaling (models/fp8.py): one
                         cuBLASLt FP8 GEMM each on Hopper; elsewhere the same
                         numbers in the wide dtype. Not the patch embedding or heads.
  gelu="tanh"            the MLPs' GELU as its tanh approximation (one tanh, no
                         erf polynomial); it differs from the exact "erf" by at
                         most 4.7e-4, so it is a different model: train with it.
"""

import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import MODELS, fp8

# name -> (width, depth, heads, mlp_dim), as in big_vision; "mu" is for tests.
SIZES = {
    "mu": (32, 2, 2, 64),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
_POOLS = ("cls", "gap", "map")
_PATCH_EMBEDS = ("conv", "matmul")
_ATTENTIONS = ("einsum", "xla", "cudnn", "auto")
_DROP_PATH_DRAWS = ("per_block", "per_step")
_GELUS = ("erf", "tanh")
_MATMULS = ("default", "fp8")
_LN_EPS = 1e-6
_dense_init = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def parse_variant(variant: str) -> tuple[int, int, int, int, int]:
  """Returns (width, depth, heads, mlp_dim, patch) for a "<size>/<patch>" string."""
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if match is None or match.group(1) not in SIZES or int(match.group(2)) < 1:
    raise ConfigError(
        f"Bad ViT variant {variant!r}: expected '<size>/<patch>' with size in "
        f"{list(SIZES)} and a positive integer patch, e.g. 'B/16' or 'L/14'.")
  return (*SIZES[match.group(1)], int(match.group(2)))


def _dense(din: int, dout: int, dtype, param_dtype, rngs: nnx.Rngs,
           matmul: str = "default") -> nnx.Linear:
  dot_general = fp8.fp8_dot_general if matmul == "fp8" else jax.lax.dot_general
  return nnx.Linear(din, dout, kernel_init=_dense_init, bias_init=_zeros,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    dot_general=dot_general)


def _layer_norm(width: int, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # nnx.LayerNorm computes its statistics in at least float32 whatever `dtype`.
  return nnx.LayerNorm(width, epsilon=_LN_EPS, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class DropPath(nnx.Module):
  """Stochastic depth: drops a whole residual branch per sample."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.rate = rate
    # Forked even when rate == 0 so that the parameter init does not depend on
    # the regularisation settings when "dropout" falls back to "default".
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


def drop_path_scales(key: jax.Array, rates: jax.Array, batch: int) -> jax.Array:
  """[depth, 2, batch] per-sample multipliers, 0 or 1/keep, for the attention and MLP
  branch of every block, from one draw: one random op per step instead of 2·depth
  (each a separate kernel, rng bits and a select over the branch)."""
  keep = 1.0 - jnp.asarray(rates, jnp.float32)[:, None, None]
  mask = jax.random.bernoulli(key, keep, (keep.shape[0], 2, batch))
  return mask / keep


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                    pad_multiple: int = 0) -> jax.Array:
  """`jax.nn.dot_product_attention` on [B, T, H, D] q/k/v (scale D^-0.5).

  With `pad_multiple` > 1 a sequence of another length is zero-padded to a multiple
  of it, the padding keys masked through `key_value_seq_lengths` and the padding
  queries sliced off: cuDNN's fused kernels may refuse lengths such as 197."""
  t = k.shape[1]
  if pad_multiple > 1 and (t % pad_multiple or q.shape[1] % pad_multiple):
    padded = -(-max(t, q.shape[1]) // pad_multiple) * pad_multiple
    pad = lambda a: jnp.pad(a, ((0, 0), (0, padded - a.shape[1]), (0, 0), (0, 0)))
    lengths = jnp.full((k.shape[0],), t, jnp.int32)
    y = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), key_value_seq_lengths=lengths,
                                     implementation=implementation)
    return y[:, :q.shape[1]]
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(nnx.Module):
  """Multi-head dot-product attention with separate q/k/v projections.

  Separate [d, d] kernels (rather than a fused qkv) keep tensor-parallel
  sharding rules to one regex per role; the parameter count is the same.
  """

  def __init__(self, width: int, heads: int, *, attention_dropout: float,
               dropout: float, dtype, param_dtype, rngs: nnx.Rngs,
               attention: str = "einsum", attention_pad: int = 8,
               matmul: str = "default"):
    if attention != "einsum" and attention_dropout:
      raise ConfigError(f"attention={attention!r} has no attention dropout; use "
                        "attention='einsum' or attention_dropout=0.")
    self.heads = heads
    self.dtype = dtype
    self.attention = attention
    self.attention_pad = attention_pad
    self.query, self.key, self.value, self.out = (
        _dense(width, width, dtype, param_dtype, rngs, matmul) for _ in range(4))
    self.attn_drop = nnx.Dropout(attention_dropout, rngs=rngs)
    self.proj_drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, kv: Optional[jax.Array] = None, *,
               train: bool) -> jax.Array:
    """Attends from `x` to `kv` (self-attention when `kv` is None)."""
    kv = x if kv is None else kv
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, -1))
    q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
    if self.attention != "einsum":
      implementation = self.attention
      if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
      pad = self.attention_pad if implementation == "cudnn" else 0
      y = fused_attention(q, k, v, implementation, pad).astype(self.dtype)
      y = self.out(y.reshape(y.shape[:-2] + (-1,)))
      return self.proj_drop(y, deterministic=not train)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    # Softmax in float32: bf16 logits lose too much precision for long rows.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = self.attn_drop(probs, deterministic=not train).astype(self.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    y = self.out(y.reshape(y.shape[:-2] + (-1,)))
    return self.proj_drop(y, deterministic=not train)


class Mlp(nnx.Module):
  """Two-layer GELU MLP: exact erf GELU by default, as timm and big_vision."""

  def __init__(self, width: int, mlp_dim: int, *, dropout: float, dtype,
               param_dtype, rngs: nnx.Rngs, gelu: str = "erf", matmul: str = "default"):
    self.fc1 = _dense(width, mlp_dim, dtype, param_dtype, rngs, matmul)
    self.fc2 = _dense(mlp_dim, width, dtype, param_dtype, rngs, matmul)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.approximate = gelu == "tanh"

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.drop(jax.nn.gelu(self.fc1(x), approximate=self.approximate),
                  deterministic=not train)
    return self.drop(self.fc2(x), deterministic=not train)


class Block(nnx.Module):
  """Pre-norm encoder block: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, dropout: float,
               attention_dropout: float, drop_path: float, dtype, param_dtype,
               rngs: nnx.Rngs, attention: str = "einsum", attention_pad: int = 8,
               gelu: str = "erf", matmul: str = "default"):
    self.norm1 = _layer_norm(width, dtype, param_dtype, rngs)
    self.attn = Attention(width, heads, attention_dropout=attention_dropout,
                          dropout=dropout, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs, attention=attention, attention_pad=attention_pad,
                          matmul=matmul)
    self.norm2 = _layer_norm(width, dtype, param_dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dropout=dropout, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, gelu=gelu, matmul=matmul)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, scales: Optional[jax.Array] = None, *,
               train: bool) -> jax.Array:
    """`scales` [2, B]: stochastic-depth multipliers drawn by the caller for the two
    branches (ViT's drop_path_draw="per_step"), in place of this block's own draws."""
    if scales is None:
      x = x + self.drop_path(self.attn(self.norm1(x), train=train), train=train)
      return x + self.drop_path(self.mlp(self.norm2(x), train=train), train=train)
    # The multiply in float32 (fused into the add), so 1/keep is not rounded to bf16.
    s = scales[:, :, None, None]
    x = x + (self.attn(self.norm1(x), train=train) * s[0]).astype(x.dtype)
    return x + (self.mlp(self.norm2(x), train=train) * s[1]).astype(x.dtype)


class MAPPool(nnx.Module):
  """Multihead attention pooling (big_vision's MAPHead): a learned probe
  attends over the tokens, followed by a residual LN -> MLP."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, dtype,
               param_dtype, rngs: nnx.Rngs, gelu: str = "erf"):
    self.probe = nnx.Param(_dense_init(rngs.params(), (1, 1, width), param_dtype))
    self.attn = Attention(width, heads, attention_dropout=0.0, dropout=0.0,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = _layer_norm(width, dtype, param_dtype, rngs)
    self.mlp = Mlp(width, mlp_dim, dropout=0.0, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, gelu=gelu)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype),
                             (x.shape[0], 1, x.shape[-1]))
    y = self.attn(probe, x, train=train)
    y = y + self.mlp(self.norm(y), train=train)
    return y[:, 0]


@MODELS.register("vit")
class ViT(nnx.Module):
  """ViT backbone: images [B, H, W, C] -> representation [B, width] (float32).

  Pools: "cls" takes the normalised cls token; "gap" averages the normalised
  patch tokens (big_vision's order, LN then mean, so the same `norm` serves
  every pool; timm's `fc_norm` does mean then LN instead); "map" applies
  attention pooling to the normalised tokens, as big_vision.
  """

  def __init__(self, variant: str, *, rngs: nnx.Rngs, image_size: int = 224,
               in_channels: int = 3, pool: str = "cls", dropout: float = 0.0,
               attention_dropout: float = 0.0, stochastic_depth: float = 0.0,
               dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
               patch_embed: str = "conv", attention: str = "einsum", attention_pad: int = 8,
               drop_path_draw: str = "per_block", gelu: str = "erf",
               matmul: str = "default"):
    width, depth, heads, mlp_dim, patch = parse_variant(variant)
    for name, value, valid in (("patch_embed", patch_embed, _PATCH_EMBEDS),
                               ("attention", attention, _ATTENTIONS),
                               ("drop_path_draw", drop_path_draw, _DROP_PATH_DRAWS),
                               ("gelu", gelu, _GELUS), ("matmul", matmul, _MATMULS)):
      if value not in valid:
        raise ConfigError(f"Unknown ViT {name} {value!r}; valid: {list(valid)}.")
    if image_size % patch:
      raise ConfigError(
          f"image_size {image_size} is not divisible by the patch size {patch} "
          f"of ViT {variant!r}; use a multiple of {patch}.")
    if pool not in _POOLS:
      raise ConfigError(f"Unknown ViT pool {pool!r}; valid pools: {list(_POOLS)}.")
    self.embed_dim = width
    self.pool = pool
    self.remat = remat
    self.dtype = dtype
    self.patch_mode = patch_embed
    self.patch = patch
    num_tokens = (image_size // patch) ** 2 + (pool == "cls")

    self.patch_embed = nnx.Conv(
        in_channels, width, kernel_size=(patch, patch), strides=(patch, patch),
        padding="VALID", bias_init=_zeros, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    if pool == "cls":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, width), param_dtype))
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (1, num_tokens, width), param_dtype))
    self.pos_drop = nnx.Dropout(dropout, rngs=rngs)
    # Drop-path rate grows linearly with depth (0 for the first block).
    rates = np.linspace(0.0, stochastic_depth, depth)
    self.blocks = nnx.List([
        Block(width, heads, mlp_dim, dropout=dropout,
              attention_dropout=attention_dropout, drop_path=float(rate),
              dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention,
              attention_pad=attention_pad, gelu=gelu, matmul=matmul)
        for rate in rates])
    self.norm = _layer_norm(width, dtype, param_dtype, rngs)
    if pool == "map":
      self.map_pool = MAPPool(width, heads, mlp_dim, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs, gelu=gelu)
    self.drop_path_rates = None
    if drop_path_draw == "per_step" and stochastic_depth > 0:
      # Forked last, and only here, so that the plain path's state is unchanged.
      self.drop_path_rates = tuple(float(r) for r in rates)
      self.drop_path_rngs = rngs["dropout"].fork()

  def _embed_patches(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, N, width]. "matmul": the conv's kernel [p, p, C, width] as a
    [p·p·C, width] matrix applied to the patches flattened in the same (p, p, C) order."""
    if self.patch_mode == "conv":
      x = self.patch_embed(x)
      return x.reshape(x.shape[0], -1, x.shape[-1])
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    kernel = self.patch_embed.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    return x @ kernel + self.patch_embed.bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self._embed_patches(x.astype(self.dtype))
    if self.pool == "cls":
      cls = self.cls_token[...].astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0],) + cls.shape[1:]),
                           x], axis=1)
    if x.shape[1] != self.pos_embed.shape[1]:
      raise ValueError(
          f"Input gives {x.shape[1]} tokens but the model was built for "
          f"{self.pos_embed.shape[1]}; pass the matching image_size.")
    x = x + self.pos_embed[...].astype(x.dtype)
    x = self.pos_drop(x, deterministic=not train)

    scales = [None] * len(self.blocks)
    if train and self.drop_path_rates is not None:
      scales = drop_path_scales(self.drop_path_rngs(), self.drop_path_rates, x.shape[0])
    for block, block_scales in zip(self.blocks, scales):
      if self.remat:
        # nnx.remat refuses bound methods; a closure keeps `train` static.
        apply = lambda b, h, s: b(h, s, train=train)
        x = nnx.remat(apply)(block, x, block_scales)
      else:
        x = block(x, block_scales, train=train)
    x = self.norm(x)

    if self.pool == "cls":
      x = x[:, 0]
    elif self.pool == "gap":
      x = jnp.mean(x.astype(jnp.float32), axis=1)
    else:
      x = self.map_pool(x, train=train)
    return x.astype(jnp.float32)
