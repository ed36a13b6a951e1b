"""timm `vit_*_patch*_*` state dicts <-> our ViT's flat names (see __init__.py).

The layouts, timm (PyTorch) on the left, ours (`mrl_jax.models.vit`) on the right:

  patch_embed.proj.weight [D, C, p, p] (OIHW)  backbone/patch_embed/kernel [p, p, C, D] (HWIO)
  cls_token [1, 1, D], pos_embed [1, N, D]     the same arrays (tokens in row-major patch
                                               order on both sides: NCHW conv then
                                               flatten(2) == NHWC conv then reshape)
  blocks.i.attn.qkv.weight [3D, D]             blocks/i/attn/{query,key,value}/kernel [D, D]:
                                               rows [0:D] are q, [D:2D] k, [2D:3D] v, each
                                               head-major (head h = rows h*hd:(h+1)*hd), the
                                               order our reshape(..., heads, hd) reads
  any other Linear weight [out, in]            kernel [in, out]
  LayerNorm weight / bias                      scale / bias (eps 1e-6 on both sides)
  attn_pool.{latent,q,kv,proj,norm,mlp}        backbone/map_pool/{probe,attn/query,
    (global_pool='map', SigLIP style)            attn/key+value,attn/out,norm,mlp}

The numerics agree: pre-norm blocks, exact (erf) GELU, LayerNorm eps 1e-6, softmax
attention scaled by head_dim**-0.5. Pools: "cls" is timm's global_pool='token'; "gap"
is timm's class_token=False, global_pool='avg', fc_norm=False (LN, then the mean);
"map" is timm's class_token=False, global_pool='map'. Refused, with the reason: timm's
`fc_norm` (mean, then LN: the default of global_pool='avg'), register tokens,
`no_embed_class`, DeiT's distillation token, `norm_pre`, layer scale (`ls1`/`ls2`),
qk-norm, and widths/depths that are not one of vit.py's sizes.

Heads. timm's classifier `head.{weight,bias}` [L, k] is our mode "none" (k = D; or,
when the caller says so, "ff" FF-D or a tied "mrl_e" head) or "ff" (k < D, FF-k: the
classifier reads z[:, :k], as the reference FixedFeatureLayer).
The Matryoshka heads use the names of the reference `MRL_Linear_Layer` set as
`model.head` (as the ResNet importer's `fc.nesting_classifier_{i}`):
`head.nesting_classifier_{i}.{weight,bias}` [L, m_i] is mode "mrl" with nesting
(m_0, m_1, ...), and a lone `head.nesting_classifier_0` [L, D] is mode "mrl_e" (the
tied head; its nesting list is not in the weights). A state dict without `head.*`
keys (timm's num_classes=0) is a backbone: `to_flat` then returns no `params/head/*`
names, and the caller fills the head (e.g. from a freshly built model) and supplies
num_classes and the head mode.
"""

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from mrl_jax import mrl
from mrl_jax.errors import ConfigError
from mrl_jax.interop import flat
from mrl_jax.models import vit

SOURCE = "The timm ViT state dict"

# Our module path (regex, below "params/") -> (timm module name, layout).
# Layouts: "conv" OIHW <-> HWIO; "linear" [out, in] <-> [in, out]; "norm" weight <-> scale;
# "qkv" / "kv": one fused timm Linear split into our query, key, value (/ key, value).
_MODULES = (
    (r"backbone/patch_embed", r"patch_embed.proj", "conv"),
    (r"backbone/blocks/(\d+)/(norm[12])", r"blocks.\1.\2", "norm"),
    (r"backbone/blocks/(\d+)/attn/(query|key|value)", r"blocks.\1.attn.qkv", "qkv"),
    (r"backbone/blocks/(\d+)/attn/out", r"blocks.\1.attn.proj", "linear"),
    (r"backbone/blocks/(\d+)/mlp/(fc[12])", r"blocks.\1.mlp.\2", "linear"),
    (r"backbone/norm", r"norm", "norm"),
    (r"backbone/map_pool/attn/query", r"attn_pool.q", "linear"),
    (r"backbone/map_pool/attn/(key|value)", r"attn_pool.kv", "kv"),
    (r"backbone/map_pool/attn/out", r"attn_pool.proj", "linear"),
    (r"backbone/map_pool/norm", r"attn_pool.norm", "norm"),
    (r"backbone/map_pool/mlp/(fc[12])", r"attn_pool.mlp.\1", "linear"),
    (r"head/heads/(\d+)", r"head.nesting_classifier_\1", "linear"),
)
# Our parameters that are plain arrays on both sides.
_ARRAYS = {"backbone/cls_token": "cls_token", "backbone/pos_embed": "pos_embed",
           "backbone/map_pool/probe": "attn_pool.latent"}
_FUSED = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def detect(state_dict: Mapping[str, Any], mode: Optional[str] = None) -> Dict[str, Any]:
  """Config overrides ({"model.variant": "B/16", "input.image_size": 224, ...}, for
  `ConfigDict.update_from_flattened_dict`) that the keys and shapes of a timm ViT state
  dict determine. Only shapes are read, so the values may be any objects with `.shape`.

  Always: model.name, model.variant, model.neck_dim (0), input.image_size,
  model.options.pool (and model.options.in_channels when not 3), mrl.nesting (the heads'
  widths for "mrl"; else the paper's list for the width, which the file does not hold).
  With a head: num_classes, mrl.mode, mrl.ff_dim. Without one (timm's num_classes=0)
  the caller supplies num_classes and the mode (`mode`, if given, is returned).

  `mode` (one of mrl.HEAD_MODES) reads timm's `head.weight` [L, D] as "ff" (FF-D) or
  "mrl_e" (a tied head saved as a plain classifier) instead of timm's plain "none"; it
  must agree with the file otherwise.

  The number of attention heads is not in the shapes: it is the one vit.py's size of
  that width has (Ti 3, S 6, B 12, L 16, H 16); a timm model with another head count
  imports without error but computes differently. Likewise timm's global_pool='avg'
  with a class token and fc_norm=False looks like global_pool='token' and reads as "cls".
  """
  if mode is not None and mode not in mrl.HEAD_MODES:
    raise ConfigError(f"Unknown head mode {mode!r}; choose one of {mrl.HEAD_MODES}.")
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  conv = shapes.get("patch_embed.proj.weight")
  if conv is None or len(conv) != 4 or conv[2] != conv[3]:
    raise ConfigError(
        f"{SOURCE} is not a timm ViT: it has no square 'patch_embed.proj.weight' "
        f"[D, C, p, p] (keys: {flat.few(sorted(shapes))}).")
  width, in_channels, patch, _ = conv
  _refuse_unsupported(shapes)
  depth = _depth(shapes)
  mlp_dim = shapes.get("blocks.0.mlp.fc1.weight", (0,))[0]
  size = _size_name(width, depth, mlp_dim)

  has_cls = "cls_token" in shapes
  if "pos_embed" not in shapes:
    raise ConfigError(f"{SOURCE} has no learned 'pos_embed'; only those ViTs import.")
  tokens = shapes["pos_embed"][1]
  grid = math.isqrt(tokens - has_cls)
  if grid * grid != tokens - has_cls:
    hint = (" It looks like timm's no_embed_class=True (the position embedding skips the "
            "class token), which our ViT does not have." if has_cls and
            math.isqrt(tokens) ** 2 == tokens else "")
    raise ConfigError(f"{SOURCE}: pos_embed has {tokens} tokens, not a square patch grid"
                      f"{' plus a class token' if has_cls else ''}.{hint}")
  has_map = any(k.startswith("attn_pool.") for k in shapes)
  if has_map and has_cls:
    raise ConfigError(f"{SOURCE} has both a class token and attention pooling "
                      "(attn_pool); our 'map' pool has no class token.")
  pool = "map" if has_map else "cls" if has_cls else "gap"

  overrides: Dict[str, Any] = {
      "model.name": "vit", "model.variant": f"{size}/{patch}", "model.neck_dim": 0,
      "input.image_size": grid * patch, "model.options.pool": pool}
  if in_channels != 3:
    overrides["model.options.in_channels"] = in_channels
  overrides.update(_detect_head(shapes, width, mode))
  return overrides


def to_flat(state_dict: Mapping[str, Any], config: Any) -> Dict[str, np.ndarray]:
  """Our flat names ("params/backbone/...", "params/head/...") for a timm ViT state dict
  and the ViT that `config` builds. Every key must be used and every weight of the model
  given, at its shape: else one ConfigError lists the missing, unexpected and
  wrong-shaped timm keys, with what `detect` reads the file as. A state dict without
  `head.*` keys gives the backbone only; an "mrl_e" head is read from
  `head.nesting_classifier_0` or, where the file has that instead, `head.weight`."""
  plan = _plan(config, with_head=any(k.startswith("head.") for k in state_dict),
               plain_mrl_e="head.weight" in state_dict)
  try:
    flat.check_names(state_dict, {key: (_timm_shape(layout, [s for _, s in ours]), None)
                                  for key, (layout, ours) in plan.items()}, source=SOURCE)
  except ConfigError as e:
    raise ConfigError(f"{e}{_reading(state_dict, config)}") from None
  out = {}
  for key, (layout, ours) in plan.items():
    for (name, _), array in zip(ours, _split(layout, np.asarray(state_dict[key]), len(ours))):
      out[name] = array
  # The conversion's own check (a failure here is a bug in this module, not the input).
  flat.check_names(out, {name: (shape, None) for _, ours in plan.values()
                         for name, shape in ours}, source="The converted timm ViT")
  return out


def from_flat(flat_weights: Mapping[str, np.ndarray], config: Any) -> Dict[str, np.ndarray]:
  """The inverse of `to_flat`: a timm-layout state dict (contiguous arrays, ready for
  safetensors or `load_state_dict`) of our flat weights for `config`'s ViT. Without
  `params/head/*` names it is a backbone (timm's num_classes=0). An "mrl_e" head is
  written as `head.nesting_classifier_0` (MRL_Linear_Layer(efficient=True))."""
  plan = _plan(config, with_head=any(k.startswith("params/head/") for k in flat_weights),
               plain_mrl_e=False)
  flat.check_names(flat_weights, {name: (shape, None) for layout, ours in plan.values()
                                  for name, shape in ours}, source="The flat weights")
  return {key: np.ascontiguousarray(_join(layout, [np.asarray(flat_weights[n])
                                                   for n, _ in ours]))
          for key, (layout, ours) in plan.items()}


def _plan(config: Any, *, with_head: bool, plain_mrl_e: bool
          ) -> Dict[str, Tuple[str, List[Tuple[str, Tuple[int, ...]]]]]:
  """{timm key: (layout, [(our flat name, our shape), ...] in the fused order)}."""
  if config.model.name != "vit":
    raise ConfigError(f"The timm ViT importer needs model.name='vit', not {config.model.name!r}.")
  plan: Dict[str, Tuple[str, List[Tuple[str, Tuple[int, ...]]]]] = {}
  unmapped = []
  for name, (shape, _) in flat.expected_shapes(config).items():
    if not with_head and name.startswith("params/head/"):
      continue
    found = _timm_name(name, config.mrl.mode, plain_mrl_e)
    if found is None:
      unmapped.append(name)
      continue
    key, layout, part = found
    plan.setdefault(key, (layout, []))[1].append((part, name, shape))
  if unmapped:
    raise ConfigError(
        f"The configured model has weights with no timm ViT counterpart "
        f"({flat.few(sorted(unmapped))}); a neck (model.neck_dim) is not a timm "
        "layer: set model.neck_dim=0.")
  return {key: (layout, [(n, s) for _, n, s in sorted(parts)])
          for key, (layout, parts) in plan.items()}


def _timm_name(name: str, head_mode: str, plain_mrl_e: bool):
  """(timm key, layout, part index in a fused weight) of one of our flat names."""
  group, _, path = name.partition("/")
  if group != "params":
    return None
  if path in _ARRAYS:
    return _ARRAYS[path], "array", 0
  module, _, leaf = path.rpartition("/")
  if leaf not in _LEAF:
    return None
  if module == "head/linear":  # ff / none: timm's classifier; mrl_e: MRL_Linear_Layer's.
    key = ("head" if head_mode in ("none", "ff") or plain_mrl_e
           else "head.nesting_classifier_0")
    return f"{key}.{_LEAF[leaf]}", "linear" if leaf == "kernel" else "array", 0
  for pattern, template, layout in _MODULES:
    match = re.fullmatch(pattern, module)
    if match is None:
      continue
    part = _FUSED[layout].index(match.group(match.lastindex)) if layout in _FUSED else 0
    if leaf != "kernel" and layout in ("conv", "linear"):
      layout = "array"
    elif leaf != "kernel":  # norm scale/bias; fused biases are split, not transposed.
      layout = "array" if layout == "norm" else layout + "_bias"
    return f"{match.expand(template)}.{_LEAF[leaf]}", layout, part
  return None


def _timm_shape(layout: str, ours: List[Tuple[int, ...]]) -> Tuple[int, ...]:
  first = ours[0]
  if layout == "conv":
    return (first[3], first[2], first[0], first[1])
  if layout == "linear":
    return tuple(reversed(first))
  if layout in _FUSED:
    return (first[1] * len(ours), first[0])
  if layout.endswith("_bias"):
    return (first[0] * len(ours),)
  return first


def _split(layout: str, array: np.ndarray, parts: int) -> List[np.ndarray]:
  if layout == "conv":
    return [array.transpose(2, 3, 1, 0)]
  if layout == "linear":
    return [array.T]
  if layout in _FUSED:
    return [a.T for a in np.split(array, parts, axis=0)]
  if layout.endswith("_bias"):
    return np.split(array, parts, axis=0)
  return [array]


def _join(layout: str, arrays: List[np.ndarray]) -> np.ndarray:
  if layout == "conv":
    return arrays[0].transpose(3, 2, 0, 1)
  if layout == "linear":
    return arrays[0].T
  if layout in _FUSED:
    return np.concatenate([a.T for a in arrays], axis=0)
  if layout.endswith("_bias"):
    return np.concatenate(arrays, axis=0)
  return arrays[0]


def _refuse_unsupported(shapes: Mapping[str, Tuple[int, ...]]) -> None:
  reasons = {
      "fc_norm.": "timm's fc_norm (mean, then LayerNorm: global_pool='avg' by default); our "
                  "'gap' pool does LayerNorm, then the mean (timm's fc_norm=False)",
      "reg_token": "register tokens",
      "dist_token": "a distillation token (DeiT distilled)",
      "norm_pre.": "a pre-transformer norm (norm_pre, CLIP style)",
      ".ls1.": "layer scale (ls1/ls2, DeiT-III style)",
      ".q_norm.": "qk-norm",
  }
  found = [why for marker, why in reasons.items()
           if any(marker in f".{k}" for k in shapes)]
  if found:
    raise ConfigError(f"{SOURCE} uses what our ViT does not have: {'; '.join(found)}.")


def _depth(shapes: Mapping[str, Tuple[int, ...]]) -> int:
  indices = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
  if not indices or indices != set(range(len(indices))):
    raise ConfigError(f"{SOURCE} has blocks {sorted(indices)}; expected blocks 0..depth-1.")
  return len(indices)


def _size_name(width: int, depth: int, mlp_dim: int) -> str:
  sizes = vit.SIZES
  for name, (w, d, _, m) in sizes.items():
    if (w, d, m) == (width, depth, mlp_dim):
      return name
  known = ", ".join(f"{n} (width {w}, depth {d}, mlp {m})" for n, (w, d, _, m) in sizes.items())
  raise ConfigError(f"{SOURCE} has width {width}, depth {depth}, mlp {mlp_dim}: no ViT size "
                    f"in mrl_jax.models.vit has those; known sizes: {known}.")


def _detect_head(shapes: Mapping[str, Tuple[int, ...]], width: int,
                 mode: Optional[str]) -> Dict[str, Any]:
  default = tuple(mrl.default_nesting(width))
  head = sorted(k for k in shapes if k.startswith("head."))
  if not head:  # A backbone (timm's num_classes=0): classes and mode come from the user.
    return {"mrl.nesting": default, **({"mrl.mode": mode} if mode else {})}
  if "head.weight" in shapes:
    classes, k = shapes["head.weight"]
    if k > width:
      raise ConfigError(f"{SOURCE}: head.weight reads {k} features from a width-{width} ViT.")
    if k < width and mode not in (None, "ff"):
      raise ConfigError(f"{SOURCE}: head.weight [{classes}, {k}] reads the first {k} of "
                        f"{width} features: an FF-{k} model (--mode=ff), not {mode!r}.")
    if mode == "mrl":
      raise ConfigError(f"{SOURCE} has a single classifier head.weight: not separate MRL "
                        "heads (head.nesting_classifier_{i}); use --mode=none|ff|mrl_e.")
    found = "ff" if k < width else mode or "none"
    return flat.head_overrides(classes, found, default, k if found == "ff" else 0)
  nested = {int(m[1]): shapes[k] for k in head
            if (m := re.fullmatch(r"head\.nesting_classifier_(\d+)\.weight", k))}
  if not nested or set(nested) != set(range(len(nested))):
    raise ConfigError(f"{SOURCE} has a head our modes do not describe ({flat.few(head)}); "
                      "expected head.weight or head.nesting_classifier_{0, 1, ...}.weight.")
  classes = nested[0][0]
  dims = tuple(nested[i][1] for i in range(len(nested)))
  if dims == (width,) and mode in (None, "mrl_e"):
    return flat.head_overrides(classes, "mrl_e", default, 0)
  if mode not in (None, "mrl"):
    raise ConfigError(f"{SOURCE} has {len(dims)} MRL heads head.nesting_classifier_0.."
                      f"{len(dims) - 1} (dims {list(dims)}): mode 'mrl', not {mode!r}.")
  return flat.head_overrides(classes, "mrl", mrl.validate_nesting(dims, width), 0)


def _reading(state_dict: Mapping[str, Any], config: Any) -> str:
  """' The file reads as: ...' (detect's overrides that differ from `config`), or ''."""
  try:
    found = detect(state_dict, config.mrl.mode if config.mrl.mode in mrl.HEAD_MODES else None)
  except ConfigError as e:
    return f" ({e})"
  return flat.reads_as(found, config, vit.ViT)
