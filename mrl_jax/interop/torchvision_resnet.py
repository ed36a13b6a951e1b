"""torchvision / MRL-reference ResNet state dicts <-> our ResNet's flat names (see __init__.py).

The published MRL ResNet50s (RAIVNLab/MRL) are torchvision's `resnet50` trained with
FFCV, with BlurPool and the Matryoshka classifier as `model.fc`. The layouts, torch on
the left, ours (`mrl_jax.models.resnet`, `mrl_jax.mrl`) on the right:

  conv1, bn1                                 backbone/stem_conv, backbone/stem_bn
  layer{i+1}.{j}.conv{k}, .bn{k}             backbone/stages/{i}/blocks/{j}/conv{k}, bn{k}
  layer{i+1}.{j}.downsample.0, .1            .../proj_conv, .../proj_bn
  conv weight [O, I, kh, kw] (OIHW)          kernel [kh, kw, I, O] (HWIO)
  BN weight, bias                            params .../scale, .../bias
  BN running_mean, running_var               model_state .../mean, .../var
  BN num_batches_tracked                     nothing: a step counter, not a weight (unused
                                             in eval); dropped on import, 0 on export
  <conv>.conv.weight + <conv>.blur_filter    a conv of the `blurpool` ResNet that blurs
    [I, 1, 3, 3] (the reference's            its input (`resnet.blurs`); the filter is the
    BlurPoolConv2d)                          constant resnet.BLUR_FILTER, checked, not kept
  Linear weight [L, m]                       kernel [m, L]

Heads (`fc.*`, the reference MRL.py / eval_ckpts/NestingLayer.py):

  fc.nesting_classifier_{i}  [L, m_i]       mode "mrl", nesting (m_0, m_1, ...)
    (MRL_Linear_Layer, MultiHeadNestedLinear)
  fc.nesting_classifier_0 alone, [L, d]      mode "mrl_e" (MRL_Linear_Layer(efficient=True))
  fc [L, k], k < d                           mode "ff", ff_dim k (FixedFeatureLayer)
  fc [L, d]                                  ambiguous: "mrl_e" (the old checkpoints'
                                             SingleHeadNestedLinear, `--old_ckpt`), "ff"
                                             (FF-d) or "none" (a plain torchvision
                                             classifier): the caller must name the mode

The tied MRL-E head (and FF/none's classifier) is our `head/linear`, kernel [d, L]: the
same array as the torch weight, transposed. The MRL-E nesting list is not in the
weights: `detect` gives the reference's (8, 16, ..., d).

Numerics agree with torchvision: BN epsilon 1e-5 and running statistics in eval;
symmetric zero padding (7x7/2 stem pad 3, 3x3 pad 1, 1x1 pad 0, written out
explicitly in resnet.py, not 'SAME', which pads stride-2 convs asymmetrically); the
3x3/2 max-pool pads 1 with -inf; the bottleneck strides on its 3x3 conv2 ("v1.5"); the
shortcut is a 1x1 conv of the block's stride + BN; z is the global mean of the last
block's ReLU output. BlurPool blurs every strided conv of >= 16 input channels with
stride 1 and zero padding 1 before it, the max-pool is left alone (the reference's
`apply_blurpool` replaces Conv2d layers only; it has no max-pool key).
"""

import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np
from flax import nnx

from mrl_jax import experiment, mrl
from mrl_jax.errors import ConfigError
from mrl_jax.interop import flat
from mrl_jax.models import resnet

SOURCE = "The torchvision ResNet state dict"

# Our module path (below "params/" / "model_state/") -> torch module name.
_MODULES = (
    (r"backbone/stem_conv", lambda m: "conv1"),
    (r"backbone/stem_bn", lambda m: "bn1"),
    (r"backbone/stages/(\d+)/blocks/(\d+)/((?:conv|bn)\d)",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[3]}"),
    (r"backbone/stages/(\d+)/blocks/(\d+)/proj_conv",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0"),
    (r"backbone/stages/(\d+)/blocks/(\d+)/proj_bn",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1"),
    (r"head/heads/(\d+)", lambda m: f"fc.nesting_classifier_{m[1]}"),
)
# (group, leaf) -> (torch leaf, layout) for convs, BNs and Linears.
_LEAVES = {
    ("params", "kernel"): ("weight", None),  # layout "conv" or "linear" by rank
    ("params", "scale"): ("weight", "array"),
    ("params", "bias"): ("bias", "array"),
    ("model_state", "mean"): ("running_mean", "array"),
    ("model_state", "var"): ("running_var", "array"),
}


class _Key(NamedTuple):
  layout: str                   # conv | linear | array | counter | blur
  ours: Optional[str]           # our flat name (None: a torch-only key)
  shape: Tuple[int, ...]        # the torch array's shape


def detect(state_dict: Mapping[str, Any], mode: Optional[str] = None) -> Dict[str, Any]:
  """Config overrides (for `ConfigDict.update_from_flattened_dict`) that the keys and
  shapes of a torchvision-layout ResNet state dict determine; only `.shape` is read.

  Always: model.name, model.variant, model.options.{width, stem, blurpool,
  representation}, model.neck_dim (0), num_classes, mrl.mode, mrl.nesting, mrl.ff_dim.
  For mrl the nesting is the heads' input widths; for mrl_e, ff and none (where the file
  does not say) it is the paper's list for d, the dims the evaluators use.

  `mode` (one of mrl.HEAD_MODES) settles the one ambiguous case, a single `fc` [L, d]
  (old-style MRL-E, FF-d or plain torchvision), and must agree with the file otherwise.
  """
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  if mode is not None and mode not in mrl.HEAD_MODES:
    raise ConfigError(f"Unknown head mode {mode!r}; choose one of {mrl.HEAD_MODES}.")
  stem = shapes.get("conv1.weight")
  if stem is None or len(stem) != 4 or not any(k.startswith("layer1.") for k in shapes):
    raise ConfigError(f"{SOURCE} is not a torchvision-layout ResNet: it has no conv1.weight "
                      f"and layer1.* keys (its keys: {flat.few(sorted(shapes))}).")
  pool_keys = sorted(k for k in shapes if k.startswith("maxpool."))
  if pool_keys:
    raise ConfigError(
        f"{SOURCE} has a max-pool with buffers ({flat.few(pool_keys)}): composer's "
        "BlurMaxPool2d, which mrl_jax's ResNet does not have (its blurpool option blurs "
        "strided convs only, as the MRL reference does).")
  width, stem_kernel = stem[0], stem[2]
  stems = {7: "imagenet", 3: "cifar"}
  if stem_kernel not in stems:
    raise ConfigError(f"{SOURCE}: the stem conv is {stem_kernel}x{stem_kernel}; our ResNet "
                      "has torchvision's 7x7/2 (stem 'imagenet') or a 3x3/1 ('cifar').")
  bottleneck = any(k.startswith("layer1.0.conv3.") for k in shapes)
  depths = tuple(_blocks(shapes, stage) for stage in range(1, 5))
  block_cls = resnet.Bottleneck if bottleneck else resnet.BasicBlock
  variant = next((v for v, (cls, ds) in resnet.VARIANTS.items()
                  if cls is block_cls and tuple(ds) == depths), None)
  if variant is None:
    raise ConfigError(f"{SOURCE} has {'bottleneck' if bottleneck else 'basic'} blocks "
                      f"{list(depths)} per stage: not a ResNet{'/'.join(resnet.VARIANTS)}.")
  last_bn = f"layer4.{depths[3] - 1}.bn{3 if bottleneck else 2}.weight"
  if last_bn not in shapes:
    raise ConfigError(f"{SOURCE} has no {last_bn}, the last block's BN of a torchvision "
                      "ResNet (the width of its representation).")
  embed_dim = shapes[last_bn][0]
  overrides: Dict[str, Any] = {
      "model.name": "resnet", "model.variant": variant, "model.neck_dim": 0,
      "model.options.width": int(width), "model.options.stem": stems[stem_kernel],
      "model.options.blurpool": any(k.endswith(".blur_filter") for k in shapes),
      "model.options.representation": "relu"}
  overrides.update(_detect_head(shapes, embed_dim, mode))
  return overrides


def to_flat(state_dict: Mapping[str, Any], config: Any) -> Dict[str, np.ndarray]:
  """Our flat names ("params/backbone/...", "model_state/backbone/...", "params/head/...")
  for a torchvision-layout ResNet state dict and the ResNet that `config` builds.
  Every torch key must be used (num_batches_tracked is optional and dropped; a
  blur_filter must be the constant filter) and every weight of the model given at its
  shape: else one ConfigError lists the missing, unexpected and wrong-shaped torch keys,
  with what `detect` reads the file as."""
  expected = _expected_shapes(config)
  plan = _plan(config, expected, old_mrl_e="fc.weight" in state_dict)
  wanted = {k: (key.shape, None) for k, key in plan.items()
            if key.layout != "counter" or k in state_dict}
  try:
    flat.check_names(state_dict, wanted, source=SOURCE)
  except ConfigError as e:
    raise ConfigError(f"{e}{_reading(state_dict, config)}") from None
  out = {}
  for k, key in plan.items():
    if key.layout == "blur":
      _check_blur(k, np.asarray(state_dict[k]))
    elif key.ours is not None:
      out[key.ours] = np.asarray(_to_ours(key.layout, np.asarray(state_dict[k])), order="C")
  flat.check_names(out, expected, source=SOURCE)
  return out


def from_flat(flat_weights: Mapping[str, np.ndarray], config: Any) -> Dict[str, np.ndarray]:
  """The inverse of `to_flat`: a torchvision/MRL-layout state dict (contiguous arrays,
  for safetensors or `load_state_dict(strict=True)` on a torchvision resnet with the
  reference's BlurPool and MRL_Linear_Layer head), with num_batches_tracked = 0 and the
  constant blur filters. An MRL-E head is written as `fc.nesting_classifier_0`."""
  expected = _expected_shapes(config)
  flat.check_names(flat_weights, expected, source="The flat weights")
  out = {}
  for k, key in _plan(config, expected, old_mrl_e=False).items():
    if key.layout == "counter":
      out[k] = np.zeros((), np.int64)
    elif key.layout == "blur":
      out[k] = _blur_filter(key.shape[0])
    else:
      out[k] = np.asarray(_to_torch(key.layout, np.asarray(flat_weights[key.ours])), order="C")
  return out


def _plan(config: Any, expected: Mapping[str, Tuple], *, old_mrl_e: bool) -> Dict[str, _Key]:
  """{torch key: _Key} of every torch array the ResNet of `config` corresponds to."""
  if config.model.name != "resnet":
    raise ConfigError(f"The torchvision ResNet importer needs model.name='resnet', not "
                      f"{config.model.name!r}.")
  blurred = _blurred_convs(config)
  mode = config.mrl.mode
  plan: Dict[str, _Key] = {}
  unmapped = []
  for name, (shape, _) in expected.items():
    group, _, path = name.partition("/")
    module, _, leaf = path.rpartition("/")
    base = _torch_module(module, mode, old_mrl_e)
    if base is None or (group, leaf) not in _LEAVES:
      unmapped.append(name)
      continue
    torch_leaf, layout = _LEAVES[(group, leaf)]
    if layout is None:
      layout = "conv" if len(shape) == 4 else "linear"
    if layout == "conv":
      shape = (shape[3], shape[2], shape[0], shape[1])
      if module in blurred:
        plan[f"{base}.blur_filter"] = _Key("blur", None, (shape[1], 1, 3, 3))
        base = f"{base}.conv"
    elif layout == "linear":
      shape = tuple(reversed(shape))
    plan[f"{base}.{torch_leaf}"] = _Key(layout, name, tuple(shape))
    if leaf == "var":
      plan[f"{base}.num_batches_tracked"] = _Key("counter", None, ())
  if unmapped:
    raise ConfigError(f"The configured model has weights with no torchvision ResNet "
                      f"counterpart ({flat.few(sorted(unmapped))}); a neck (model.neck_dim) is "
                      "not a torchvision layer: set model.neck_dim=0.")
  return plan


def _torch_module(module: str, mode: str, old_mrl_e: bool) -> Optional[str]:
  if module == "head/linear":  # ff / none: a plain fc; mrl_e: MRL_Linear_Layer's (or old fc).
    return "fc" if mode in ("ff", "none") or old_mrl_e else "fc.nesting_classifier_0"
  for pattern, template in _MODULES:
    match = re.fullmatch(pattern, module)
    if match is not None:
      return template(match)
  return None


def _expected_shapes(config: Any) -> Dict[str, Tuple]:
  return _memo("shapes", config.to_json_best_effort(sort_keys=True),
               lambda: flat.expected_shapes(config))


def _blurred_convs(config: Any) -> frozenset:
  """Module paths ("backbone/stages/1/blocks/0/conv2") of the convs whose input the
  configured ResNet blurs, asked of the (abstract) model itself."""

  def find():
    model = nnx.eval_shape(experiment.model_factory(config))
    blurpool = getattr(model.backbone, "blurpool", False)
    return frozenset("/".join(str(p) for p in path) for path, node in nnx.iter_graph(model)
                     if isinstance(node, nnx.Conv) and resnet.blurs(node, blurpool))
  # The backbone alone decides; the head may differ.
  return _memo("blurred", config.model.to_json_best_effort(sort_keys=True)
               + str(config.input.image_size), find)


def _memo(kind: str, key: str, compute):
  """Memoised per config (a few): building even an abstract ResNet50 takes a second, and
  an import, its checks and an export of the same model would each build it again."""
  if (kind, key) not in _MEMO:
    if len(_MEMO) >= 16:
      _MEMO.clear()
    _MEMO[(kind, key)] = compute()
  return _MEMO[(kind, key)]


_MEMO: Dict[Tuple[str, str], Any] = {}


def _to_ours(layout: str, a: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return a.transpose(2, 3, 1, 0)
  if layout == "linear":
    return a.T
  return a


def _to_torch(layout: str, a: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return a.transpose(3, 2, 0, 1)
  if layout == "linear":
    return a.T
  return a


def _blur_filter(channels: int) -> np.ndarray:
  return np.tile(resnet.BLUR_FILTER[None, None], (channels, 1, 1, 1))


def _check_blur(key: str, filt: np.ndarray) -> None:
  if not np.array_equal(filt.astype(np.float32), _blur_filter(filt.shape[0])):
    raise ConfigError(f"{SOURCE}: {key} is not the fixed BlurPool filter "
                      "[[1,2,1],[2,4,2],[1,2,1]]/16 per channel; mrl_jax's blurpool ResNet "
                      "has only that constant filter, so these weights cannot be imported.")


def _blocks(shapes: Mapping[str, Tuple[int, ...]], stage: int) -> int:
  found = {int(m[1]) for k in shapes if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
  if not found or found != set(range(len(found))):
    raise ConfigError(f"{SOURCE}: layer{stage} has blocks {sorted(found)}; a torchvision "
                      "ResNet has four stages of blocks numbered 0, 1, ...")
  return len(found)


def _detect_head(shapes: Mapping[str, Tuple[int, ...]], embed_dim: int,
                 mode: Optional[str]) -> Dict[str, Any]:
  head = sorted(k for k in shapes if k.startswith("fc."))
  nested = {int(m[1]): shapes[k] for k in head
            if (m := re.fullmatch(r"fc\.nesting_classifier_(\d+)\.weight", k))}
  default = tuple(mrl.default_nesting(embed_dim))
  if nested:
    if set(nested) != set(range(len(nested))):
      raise ConfigError(f"{SOURCE}: the MRL heads are fc.nesting_classifier_"
                        f"{sorted(nested)}, not numbered 0, 1, ...")
    classes = nested[0][0]
    dims = tuple(nested[i][1] for i in range(len(nested)))
    if dims == (embed_dim,) and mode in (None, "mrl_e"):
      return flat.head_overrides(classes, "mrl_e", default, 0)
    if mode not in (None, "mrl"):
      fix = "--mode=mrl_e (or mrl)" if dims == (embed_dim,) else "--mode=mrl"
      raise ConfigError(f"{SOURCE} has the MRL heads fc.nesting_classifier_0.."
                        f"{len(dims) - 1} (dims {list(dims)}), which mode {mode!r} does not "
                        f"describe; use {fix}.")
    return flat.head_overrides(classes, "mrl", mrl.validate_nesting(dims, embed_dim), 0)
  if "fc.weight" in shapes:
    classes, k = shapes["fc.weight"]
    if k > embed_dim:
      raise ConfigError(f"{SOURCE}: fc.weight reads {k} features from a d={embed_dim} ResNet.")
    if k < embed_dim:
      if mode not in (None, "ff"):
        raise ConfigError(f"{SOURCE}: fc.weight [{classes}, {k}] reads the first {k} of "
                          f"d={embed_dim} features: an FF-{k} model (--mode=ff), not {mode!r}.")
      return flat.head_overrides(classes, "ff", default, k)
    if mode is None:
      raise ConfigError(
          f"{SOURCE} has one classifier fc.weight [{classes}, {embed_dim}] over all d "
          f"features: an MRL-E model of the released checkpoints (SingleHeadNestedLinear), "
          f"an FF-{embed_dim} model, or a plain torchvision ResNet; the weights cannot tell "
          "which. Say it: --mode=mrl_e|ff (or --mode=none for a plain classifier).")
    if mode == "mrl":
      raise ConfigError(f"{SOURCE} has a single classifier fc.weight: not separate MRL heads "
                        "(fc.nesting_classifier_{i}); use --mode=mrl_e|ff|none.")
    return flat.head_overrides(classes, mode, default, embed_dim if mode == "ff" else 0)
  raise ConfigError(f"{SOURCE} has no classifier our head modes describe "
                    f"({flat.few(head) or 'no fc.* keys'}); expected fc.weight or "
                    "fc.nesting_classifier_{i}.weight.")


def _reading(state_dict: Mapping[str, Any], config: Any) -> str:
  """' The file reads as: ...' (detect's overrides that differ from `config`), or ''."""
  try:
    found = detect(state_dict, config.mrl.mode)
  except ConfigError as e:
    return f" ({e})"
  return flat.reads_as(found, config, resnet.ResNet)
