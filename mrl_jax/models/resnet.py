"""ResNet backbones (18/34/50/101/152) with torchvision's "v1.5" topology.

The layout, padding and initialisation follow torchvision exactly so that
parameter counts and feature-map shapes match the published MRL ResNet50 setup:
the bottleneck downsamples on its 3x3 conv, shortcuts are 1x1 conv + BN
projections, convs have no bias and are He-normal (fan_out) initialised.
The classifier is not part of the backbone; `__call__` returns the pooled
representation [B, embed_dim] that the Matryoshka heads slice.

Options for small images and for where the representation is taken (README
"Where z is taken"; measured in `mrl_jax.tools.compare_mrl`):

  stem="imagenet"  7x7/2 conv + 3x3/2 max-pool (the paper's ResNet50). At 32 px
                   the last feature map is 1x1, so "average pooling" pools one
                   ReLU output and many coordinates of z are exactly 0.
  stem="cifar"     one 3x3/1 conv, no max-pool (He et al.'s CIFAR ResNets): a
                   4x4 last map at 32 px, 16x the compute of the ImageNet stem.
  width=64         channels of the first stage (stages: w, 2w, 4w, 8w); narrower
                   ResNets for CPU-sized experiments, d = 8w·expansion.
  representation="relu"    z = mean over space of the last block's ReLU output
                           (the paper; z ≥ 0).
  representation="preact"  z = the same mean before the last ReLU: signed, so a
                           short prefix is never all zero and always has a direction.
  blurpool=True    anti-aliased downsampling as the published MRL ResNet50s were trained
                   (FFCV's `BlurPoolConv2d`, the same op as composer's `BlurConv2d` with
                   blur_first): every strided conv with at least 16 input channels
                   first blurs its input with the fixed depthwise 3x3 filter
                   [[1,2,1],[2,4,2],[1,2,1]]/16 (stride 1, zero padding 1), then runs
                   as before. In a ResNet50 (width 64) these are the six convs
                   layer{2,3,4}.0.conv2 and layer{2,3,4}.0.downsample.0 (ResNet18/34:
                   .conv1, where a BasicBlock strides); the 3-channel stem conv is not
                   blurred, nor is the max-pool; a narrow width leaves the convs of
                   fewer than 16 input channels unblurred, as the reference would. The
                   filter is a constant, not a variable: parameter names and shapes
                   do not change.
"""

from typing import Any, Callable, Sequence, Tuple, Type

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mrl_jax.errors import ConfigError
from mrl_jax.models import MODELS

Dtype = Any

# torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: jax's
# "normal" distribution is untruncated, like torch's (unlike "truncated_normal").
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# BlurPool (Zhang, ICML 2019) as the MRL reference applies it (`apply_blurpool` in its
# eval code): the binomial 3x3 low-pass, on every strided conv of >= 16 input channels.
BLUR_FILTER = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16.0
BLUR_MIN_CHANNELS = 16


def blurs(conv: nnx.Conv, blurpool: bool) -> bool:
  """Whether a `blurpool` ResNet blurs this conv's input (the one rule the model and the
  weight importers share)."""
  return blurpool and max(conv.strides) > 1 and conv.in_features >= BLUR_MIN_CHANNELS


def blur(x: jax.Array) -> jax.Array:
  """x [B, H, W, C] filtered channel by channel with BLUR_FILTER, stride 1, zero padding 1
  (torch: conv2d(x, filter[C,1,3,3], padding=1, groups=C))."""
  channels = x.shape[-1]
  kernel = jnp.tile(jnp.asarray(BLUR_FILTER, x.dtype)[:, :, None, None], (1, 1, 1, channels))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


class _ConvBNFactory:
  """Builds convs and BNs sharing the network-wide dtype and BN settings."""

  def __init__(self, *, dtype: Dtype, param_dtype: Dtype, bn_momentum: float,
               bn_epsilon: float, blurpool: bool, rngs: nnx.Rngs):
    self.dtype = dtype
    self.blurpool = blurpool
    self.param_dtype = param_dtype
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon
    self.rngs = rngs

  def conv(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nnx.Conv:
    pad = kernel // 2  # torchvision: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0.
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_CONV_INIT,
        dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

  def bn(self, features: int, zero_scale: bool = False) -> nnx.BatchNorm:
    # BN normalises in float32 for stability; callers cast back to `dtype`.
    scale_init = (nnx.initializers.zeros_init() if zero_scale
                  else nnx.initializers.ones_init())
    return nnx.BatchNorm(
        features, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        dtype=jnp.float32, param_dtype=self.param_dtype, scale_init=scale_init,
        rngs=self.rngs)


class _Block(nnx.Module):
  """Shared residual plumbing: optional projection shortcut, add, ReLU."""

  expansion: int = 1

  def __init__(self, f: _ConvBNFactory, in_ch: int, out_ch: int, stride: int):
    self.dtype = f.dtype
    self.blurpool = f.blurpool
    self.relu_out = True  # False for the last block of a "preact" representation.
    if stride != 1 or in_ch != out_ch:
      self.proj_conv = f.conv(in_ch, out_ch, 1, stride)
      self.proj_bn = f.bn(out_ch)
    else:
      self.proj_conv = None
      self.proj_bn = None

  def _conv_bn(self, conv: nnx.Conv, bn: nnx.BatchNorm, x: jax.Array,
               train: bool) -> jax.Array:
    if blurs(conv, self.blurpool):
      x = blur(x)
    return bn(conv(x), use_running_average=not train).astype(self.dtype)

  def _residual(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    if self.proj_conv is not None:
      x = self._conv_bn(self.proj_conv, self.proj_bn, x, train)
    return nnx.relu(x + y) if self.relu_out else x + y


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet18/34)."""

  expansion = 1

  def __init__(self, f: _ConvBNFactory, in_ch: int, planes: int, stride: int,
               zero_init_last_bn: bool):
    out_ch = planes * self.expansion
    super().__init__(f, in_ch, out_ch, stride)
    self.conv1 = f.conv(in_ch, planes, 3, stride)
    self.bn1 = f.bn(planes)
    self.conv2 = f.conv(planes, out_ch, 3)
    self.bn2 = f.bn(out_ch, zero_scale=zero_init_last_bn)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nnx.relu(self._conv_bn(self.conv1, self.bn1, x, train))
    y = self._conv_bn(self.conv2, self.bn2, y, train)
    return self._residual(x, y, train)


class Bottleneck(_Block):
  """1x1 -> 3x3 (strided, "v1.5") -> 1x1 x4 (ResNet50/101/152)."""

  expansion = 4

  def __init__(self, f: _ConvBNFactory, in_ch: int, planes: int, stride: int,
               zero_init_last_bn: bool):
    out_ch = planes * self.expansion
    super().__init__(f, in_ch, out_ch, stride)
    self.conv1 = f.conv(in_ch, planes, 1)
    self.bn1 = f.bn(planes)
    self.conv2 = f.conv(planes, planes, 3, stride)
    self.bn2 = f.bn(planes)
    self.conv3 = f.conv(planes, out_ch, 1)
    self.bn3 = f.bn(out_ch, zero_scale=zero_init_last_bn)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nnx.relu(self._conv_bn(self.conv1, self.bn1, x, train))
    y = nnx.relu(self._conv_bn(self.conv2, self.bn2, y, train))
    y = self._conv_bn(self.conv3, self.bn3, y, train)
    return self._residual(x, y, train)


class Stage(nnx.Module):
  """A run of residual blocks; only the first one changes resolution/width."""

  def __init__(self, block_cls: Type[_Block], f: _ConvBNFactory, in_ch: int,
               planes: int, num_blocks: int, stride: int, zero_init_last_bn: bool,
               remat: bool):
    out_ch = planes * block_cls.expansion
    self.blocks = nnx.List([
        block_cls(f, in_ch if i == 0 else out_ch, planes, stride if i == 0 else 1,
                  zero_init_last_bn)
        for i in range(num_blocks)
    ])
    self.remat = remat

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    # `train` is closed over so it stays a Python bool inside the checkpoint.
    apply: Callable[[_Block, jax.Array], jax.Array] = (
        lambda block, h: block(h, train=train))
    if self.remat:
      apply = nnx.remat(apply)
    for block in self.blocks:
      x = apply(block, x)
    return x


# variant -> (block type, blocks per stage)
VARIANTS: dict[str, Tuple[Type[_Block], Sequence[int]]] = {
    "18": (BasicBlock, (2, 2, 2, 2)),
    "34": (BasicBlock, (3, 4, 6, 3)),
    "50": (Bottleneck, (3, 4, 6, 3)),
    "101": (Bottleneck, (3, 4, 23, 3)),
    "152": (Bottleneck, (3, 8, 36, 3)),
}
_STAGE_MULTIPLIERS = (1, 2, 4, 8)
STEMS = ("imagenet", "cifar")
REPRESENTATIONS = ("relu", "preact")


@MODELS.register("resnet")
class ResNet(nnx.Module):
  """ResNet backbone mapping images [B, H, W, C] to representations [B, embed_dim].

  `train` is an explicit call argument (not a module mode flag) because the
  training step is a functional jit over `nnx.split` state. `image_size` is
  accepted like every backbone's and ignored: a ResNet is resolution-agnostic.
  """

  def __init__(self, variant: str, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: bool = False,
               bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
               zero_init_last_bn: bool = True, in_channels: int = 3,
               stem: str = "imagenet", width: int = 64, representation: str = "relu",
               blurpool: bool = False, image_size: int = 0):
    del image_size
    if variant not in VARIANTS:
      raise ConfigError(f"Unknown ResNet variant {variant!r}. "
                       f"Known variants: {', '.join(VARIANTS)}.")
    if stem not in STEMS:
      raise ConfigError(f"Unknown ResNet stem {stem!r}; set --config.model.options.stem "
                        f"to one of {STEMS}.")
    if representation not in REPRESENTATIONS:
      raise ConfigError(f"Unknown ResNet representation {representation!r}; set "
                        f"--config.model.options.representation to one of {REPRESENTATIONS}.")
    if width < 1:
      raise ConfigError(f"ResNet width {width} must be a positive channel count "
                        "(--config.model.options.width; 64 is the standard ResNet).")
    block_cls, depths = VARIANTS[variant]
    f = _ConvBNFactory(dtype=dtype, param_dtype=param_dtype, bn_momentum=bn_momentum,
                       bn_epsilon=bn_epsilon, blurpool=bool(blurpool), rngs=rngs)
    self.variant = variant
    self.dtype = dtype
    self.blurpool = bool(blurpool)
    self.stem = stem
    if stem == "imagenet":
      self.stem_conv = f.conv(in_channels, width, 7, stride=2)
    else:
      self.stem_conv = f.conv(in_channels, width, 3, stride=1)
    self.stem_bn = f.bn(width)
    stages = []
    in_ch = width
    for i, (mult, depth) in enumerate(zip(_STAGE_MULTIPLIERS, depths)):
      stages.append(Stage(block_cls, f, in_ch, width * mult, depth,
                          stride=1 if i == 0 else 2,
                          zero_init_last_bn=zero_init_last_bn, remat=remat))
      in_ch = width * mult * block_cls.expansion
    self.stages = nnx.List(stages)
    self.stages[-1].blocks[-1].relu_out = representation == "relu"
    self.embed_dim = in_ch

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    if blurs(self.stem_conv, self.blurpool):  # only with >= 16 input channels
      x = blur(x)
    x = self.stem_conv(x)
    x = nnx.relu(self.stem_bn(x, use_running_average=not train).astype(self.dtype))
    if self.stem == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in self.stages:
      x = stage(x, train=train)
    # Pool in float32: the representation feeds the (f32) Matryoshka heads.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
