"""Preprocessing specs: one registry of ops, parsed from a readable string.

A spec is the big_vision style chain of ops joined by `|`, for example

  decode|inception_crop(224)|flip_lr|normalize(imagenet)|mixup(0.2)

Each op is `name` or `name(args)`; args are Python literals, keyword args are
allowed and a bare identifier is a string (`normalize(imagenet)`). The spec is
parsed with `ast` as one Python expression, so a `|` inside a quoted string
cannot split it, and no code is run (only +-*/ between numbers, for `3/4`).

The ops live in `image_ops` and `batch_ops`, which register them in
`op_registry.OPS` (a leaf module, so nothing imports back into this one).
Example ops map one example dict to a new one (`op(example, rng)`); batch ops
(registered with `batch=True`: mixup, cutmix) map a host batch and must come
after every example op. `normalize` is not run on the host: images travel to
the accelerator as uint8 (4× less traffic than float32) and the train/eval
step computes (x - mean) / std there, so `parse` hoists its numbers into
`Preprocessor.mean/std` (0..255 units). Without a normalize op the default is
`minus_one_one`, which maps [0, 255] to [-1, 1].
"""

import ast
import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# The op modules register into OPS (mrl_jax.data.op_registry) on import.
from mrl_jax.data import batch_ops, image_ops  # noqa: F401  pylint: disable=unused-import
from mrl_jax.data.op_registry import OPS, register_op
from mrl_jax.errors import ConfigError, CorruptImageError  # noqa: F401  (re-exported)

NORMALIZATIONS = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255),
                 (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "minus_one_one": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
}
DEFAULT_NORMALIZATION = "minus_one_one"


@dataclasses.dataclass(frozen=True)
class Normalization:
  """What `normalize(...)` stands for: per-channel mean and std in 0..255 units."""
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]


@register_op("normalize")
def normalize(name_or_mean: Union[str, float, Sequence[float]] = DEFAULT_NORMALIZATION,
              std: Union[None, float, Sequence[float]] = None) -> Normalization:
  """`normalize(imagenet)`, `normalize(minus_one_one)` or `normalize(mean, std)` (0..255)."""
  if isinstance(name_or_mean, str):
    if name_or_mean not in NORMALIZATIONS or std is not None:
      raise ConfigError(f"normalize({name_or_mean!r}): known presets are "
                        f"{', '.join(sorted(NORMALIZATIONS))}; or give normalize(mean, std) "
                        "in 0..255 units.")
    return Normalization(*NORMALIZATIONS[name_or_mean])
  if std is None:
    raise ConfigError("normalize(mean) needs std too: normalize(mean, std) in 0..255 units.")
  mean3, std3 = _three(name_or_mean, "mean"), _three(std, "std")
  if min(std3) <= 0:
    raise ConfigError(f"normalize: std {std3} must be positive.")
  if max(std3) <= 1:
    raise ConfigError(f"normalize: std {std3} looks like 0..1 units; images are 0..255 "
                      "here, so multiply mean and std by 255 (or use normalize(imagenet)).")
  return Normalization(mean3, std3)


def _three(value, what: str) -> Tuple[float, float, float]:
  values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
  if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
    raise ConfigError(f"normalize: {what} must be a number or 3 numbers, got {value!r}.")
  return tuple(float(v) for v in values)


def normalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]
                     ) -> np.ndarray:
  """(images - mean) / std in float32: the host twin of the device-side normalisation."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (np.asarray(images, np.float32) - mean) / std


ExampleOp = Callable[[Dict[str, Any], Optional[np.random.Generator]], Dict[str, Any]]
BatchOp = Callable[[Dict[str, Any], np.random.Generator], Dict[str, Any]]


@dataclasses.dataclass
class Preprocessor:
  """A parsed spec: host example ops, host batch ops, and the device normalisation."""
  example_ops: List[ExampleOp]
  batch_ops: List[BatchOp]
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  spec: str

  def __call__(self, example: Dict[str, Any], rng: Optional[np.random.Generator] = None
               ) -> Dict[str, Any]:
    """Runs the example ops; the image comes out C-contiguous uint8 [S, S, 3]."""
    for op in self.example_ops:
      example = op(example, rng)
    image = example["image"]
    if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3
        or image.shape[2] != 3 or image.shape[0] != image.shape[1]):
      shape = getattr(image, "shape", type(image).__name__)
      raise ConfigError(f"Preprocessing spec {self.spec!r} yields images of "
                        f"{shape}, not uint8 [S, S, 3]: start it with decode and end the "
                        "example ops with a square crop or resize, e.g. central_crop(224).")
    if not image.flags.c_contiguous:
      example = dict(example, image=np.ascontiguousarray(image))
    return example

  def apply_batch(self, batch: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    """Runs the batch ops (mixup, cutmix) on a host batch; the batch itself if none."""
    for op in self.batch_ops:
      batch = op(batch, rng)
    return batch


def parse(spec: str, *, num_classes: int) -> Preprocessor:
  """Builds the Preprocessor of `spec`; every mistake is a ConfigError naming the fix."""
  example_ops, batch_op_list, normalization = [], [], None
  for name, args, kwargs in _split_spec(spec):
    factory = OPS.get(name)
    is_batch = getattr(factory, "is_batch_op", False)
    if not is_batch and batch_op_list and name != "normalize":
      raise ConfigError(f"Preprocessing spec {spec!r}: example op {name!r} comes after a batch "
                        "op; put batch ops (mixup, cutmix) at the end.")
    op = _build(factory, name, args, kwargs, num_classes)
    if isinstance(op, Normalization):
      if normalization is not None:
        raise ConfigError(f"Preprocessing spec {spec!r} has two normalize ops; keep one.")
      normalization = op
    elif is_batch:
      batch_op_list.append(op)
    else:
      example_ops.append(op)
  normalization = normalization or Normalization(*NORMALIZATIONS[DEFAULT_NORMALIZATION])
  return Preprocessor(example_ops, batch_op_list, normalization.mean, normalization.std, spec)


def _build(factory, name: str, args: list, kwargs: dict, num_classes: int):
  params = inspect.signature(factory).parameters
  shown = ", ".join(n if p.default is p.empty else f"{n}={p.default!r}"
                    for n, p in params.items() if n != "num_classes")
  if "num_classes" in kwargs:
    raise ConfigError(f"Preprocessing op {name!r}: num_classes comes from config.num_classes; "
                      "remove it from the spec.")
  if "num_classes" in params:
    kwargs = dict(kwargs, num_classes=num_classes)
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ConfigError(f"Bad arguments for preprocessing op {name!r} ({e}); its signature is "
                      f"{name}({shown}).") from None
  return factory(*args, **kwargs)


def _split_spec(spec: str) -> List[Tuple[str, list, dict]]:
  """'a|b(1, k=x)' → [('a', [], {}), ('b', [1], {'k': 'x'})], without evaluating code."""
  try:
    tree = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ConfigError(f"Cannot parse preprocessing spec {spec!r} ({e.msg}); write ops as "
                      "name or name(args) joined by '|'.") from None
  nodes = []
  while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitOr):
    nodes.append(tree.right)
    tree = tree.left
  nodes.append(tree)
  return [_op_call(node, spec) for node in reversed(nodes)]


def _op_call(node: ast.AST, spec: str) -> Tuple[str, list, dict]:
  if isinstance(node, ast.Name):
    return node.id, [], {}
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    args = [_literal(a, spec) for a in node.args]
    kwargs = {k.arg: _literal(k.value, spec) for k in node.keywords if k.arg is not None}
    if len(kwargs) != len(node.keywords):
      raise ConfigError(f"Preprocessing spec {spec!r}: '**' is not allowed in op arguments.")
    return node.func.id, args, kwargs
  raise ConfigError(f"Preprocessing spec {spec!r}: {ast.unparse(node)!r} is not an op; "
                    "write name or name(args).")


_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _literal(node: ast.AST, spec: str):
  """A literal argument; bare identifiers are strings and `3/4`-style arithmetic is allowed."""
  if isinstance(node, ast.Name):
    return node.id  # normalize(imagenet)
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, (ast.Tuple, ast.List)):
    values = [_literal(e, spec) for e in node.elts]
    return tuple(values) if isinstance(node, ast.Tuple) else values
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    value = _literal(node.operand, spec)
    if isinstance(value, (int, float)):
      return -value if isinstance(node.op, ast.USub) else value
  if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
    a, b = _literal(node.left, spec), _literal(node.right, spec)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) and not (
        isinstance(node.op, ast.Div) and b == 0):
      return _ARITHMETIC[type(node.op)](a, b)
  raise ConfigError(f"Preprocessing spec {spec!r}: argument {ast.unparse(node)!r} is not a "
                    "literal (numbers, strings, identifiers, tuples, lists, True/False/None; "
                    "+ - * / between numbers).")
