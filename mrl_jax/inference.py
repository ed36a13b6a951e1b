"""Using a trained Matryoshka model: load it, embed images at a trained dim, classify.

  from mrl_jax import inference
  model = inference.load("/tmp/demo")            # a workdir (latest step, or step=N),
                                                  # a checkpoint step dir, or an export
  z = model.embed(images, dim=64)                 # [B, 64] float32, L2-normalised
  top = model.classify(images, dim=16)            # top-k classes and probabilities
  out = model.cascade(images, thresholds=0.9)     # adaptive classification

`images` are uint8 arrays ([B, H, W, 3] or one [H, W, 3]), PIL images, file
paths or encoded bytes; the run's eval preprocessing (its `input.pp_eval`, or
the default resize) is applied, then its normalisation on the device. Embedding
follows the MRL protocol: the prefix z[:, :m] of the full representation,
re-normalised after truncating. A model knows the dims it was trained at
(`model.dims`); others are refused unless `allow_untrained_dim=True`, since a
prefix no loss term shaped is not a Matryoshka embedding.

The forward runs batched on every local device (the batch is padded to a
multiple of their count) and compiles once per (padded batch, dim).
"""

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mrl_jax import data, paths, restore, sharding, steps
from mrl_jax.errors import ConfigError, MissingFileError
from mrl_jax.interop import flat, torch_files

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "mrl_config.json"
RUN_CONFIG = "config.json"  # what train.run writes into every workdir

ImageLike = Union[np.ndarray, bytes, str, os.PathLike, Any]  # Any: a PIL image


@dataclasses.dataclass
class Classification:
  """Top-k of one head: classes [B, k] int, probabilities [B, k] float32 (softmax, or
  sigmoid for a multi-label model), best first."""
  classes: np.ndarray
  probabilities: np.ndarray
  dim: int


@dataclasses.dataclass
class CascadeResult:
  """Adaptive classification: each image's class, its confidence and the dim it stopped at
  (the first whose max probability reached its threshold; the largest dim otherwise)."""
  classes: np.ndarray      # [B] int
  confidence: np.ndarray   # [B] float32
  dims: np.ndarray         # [B] int, the dim each image was classified at


class Model:
  """A trained (or imported) MRL model on this machine's devices; see the module docstring."""

  def __init__(self, config: Any, params: Any, model_state: Any, graphdef: nnx.GraphDef, *,
               step: int, source: str):
    self.config, self.step, self.source = config, int(step), source
    self._graphdef = graphdef
    self.mesh = _local_mesh()
    replicated = sharding.replicated(self.mesh)
    self._state = jax.device_put({"params": params, "model_state": model_state}, replicated)
    self.params, self.model_state = self._state["params"], self._state["model_state"]
    self._state_sharding = jax.tree.map(lambda _: replicated, self._state)
    model = nnx.merge(graphdef, params, model_state)
    self.dims: Tuple[int, ...] = tuple(int(m) for m in model.head.dims)
    self.embed_dim = _embed_width(model)  # d: the width of z
    self.multi_label = config.mrl.loss == "sigmoid"
    self._preprocess = data.build_preprocess(config.input, "val", num_classes=config.num_classes)
    self._normalization = data.normalization(config.input, num_classes=config.num_classes)
    self._compiled: Dict[Any, Any] = {}

  def __repr__(self) -> str:
    c = self.config
    return (f"Model({c.model.name} {c.model.variant}, {c.mrl.mode}, dims {list(self.dims)}, "
            f"{c.num_classes} classes, {c.input.image_size}px, step {self.step}, "
            f"from {self.source})")

  # --- the three uses -------------------------------------------------------------------

  def embed(self, images: Union[ImageLike, Sequence[ImageLike]], dim: Optional[int] = None, *,
            normalize: bool = True, allow_untrained_dim: bool = False,
            batch_size: int = 256) -> np.ndarray:
    """float32 [B, dim]: z[:, :dim] (default: the largest trained dim), L2-normalised."""
    return self.embed_preprocessed(self.preprocess(images), dim, normalize=normalize,
                                   allow_untrained_dim=allow_untrained_dim,
                                   batch_size=batch_size)

  def embed_preprocessed(self, batch: np.ndarray, dim: Optional[int] = None, *,
                         normalize: bool = True, allow_untrained_dim: bool = False,
                         batch_size: int = 256) -> np.ndarray:
    """`embed` of images already through `preprocess` (uint8 [B, S, S, 3])."""
    dim = self.check_dim(dim, allow_untrained_dim)
    return self._run(("embed", dim, normalize), batch, batch_size)

  def classify(self, images, dim: Optional[int] = None, *, top_k: int = 5,
               batch_size: int = 256) -> Classification:
    """The top-k classes of the head at `dim` (MRL-E: the tied head sliced to dim)."""
    dim = self.check_dim(dim)
    probs = self._run(("probs", self.dims.index(dim)), self.preprocess(images), batch_size)
    k = min(int(top_k), probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return Classification(order, np.take_along_axis(probs, order, axis=1), dim)

  def cascade(self, images, thresholds: Union[float, Sequence[float]], *,
              batch_size: int = 256) -> CascadeResult:
    """Classifies each image at the smallest trained dim whose max probability reaches its
    threshold (one per dim but the last, or one for all), else at the largest dim."""
    if len(self.dims) < 2:
      raise ConfigError(f"A cascade needs several trained heads; this model has {self.dims}.")
    t = np.broadcast_to(np.asarray(thresholds, np.float64), (len(self.dims) - 1,)) \
        if np.ndim(thresholds) == 0 else np.asarray(thresholds, np.float64)
    if t.shape != (len(self.dims) - 1,):
      raise ConfigError(f"Give one threshold per dim but the last ({len(self.dims) - 1} for "
                        f"dims {list(self.dims)}), or a single one; got {len(t)}.")
    probs = self._run(("all_probs",), self.preprocess(images), batch_size)  # [M, B, L]
    confidence, classes = probs.max(-1), probs.argmax(-1)
    stops = np.concatenate([confidence[:-1] >= t[:, None],
                            np.ones((1, confidence.shape[1]), bool)])
    at = np.argmax(stops, axis=0)
    rows = np.arange(probs.shape[1])
    return CascadeResult(classes[at, rows], confidence[at, rows].astype(np.float32),
                         np.asarray(self.dims)[at])

  # --- plumbing -------------------------------------------------------------------------

  def check_dim(self, dim: Optional[int], allow_untrained: bool = False) -> int:
    """`dim` if the model was trained at it (None: the largest trained dim); else a
    ConfigError listing the trained dims."""
    if dim is None:
      return self.dims[-1]
    dim = int(dim)
    if dim in self.dims or (allow_untrained and 0 < dim <= self.embed_dim):
      return dim
    if allow_untrained:
      raise ConfigError(f"dim={dim} is outside the embedding width 1..{self.embed_dim}.")
    raise ConfigError(f"This model was trained at dims {list(self.dims)}, not {dim}: use one "
                      "of those (or pass allow_untrained_dim=True to embed an untrained "
                      "prefix anyway).")

  def _run(self, what: Tuple, batch: np.ndarray, batch_size: int) -> np.ndarray:
    devices = sharding.data_parallel_size(self.mesh)
    block = max(devices, -(-min(batch_size, len(batch)) // devices) * devices)
    out = []
    for start in range(0, len(batch), block):
      rows = batch[start:start + block]
      padded = np.zeros((block,) + rows.shape[1:], np.uint8)
      padded[:len(rows)] = rows
      fn = self._function(what, padded.shape)
      result = np.asarray(fn(self._state, jax.device_put(
          padded, sharding.batch_sharding(self.mesh))))
      out.append(result[:, :len(rows)] if what[0] == "all_probs" else result[:len(rows)])
    return np.concatenate(out, axis=1 if what[0] == "all_probs" else 0)

  def preprocess_one(self, image: ImageLike) -> np.ndarray:
    """uint8 [S, S, 3]: the run's eval preprocessing of one image (CorruptImageError if
    it cannot be decoded)."""
    return self._preprocess({"image": _image_input(image), "label": 0, "id": ""},
                            None)["image"]

  def preprocess(self, images) -> np.ndarray:
    """uint8 [B, S, S, 3]: the run's eval preprocessing of each image."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      items = list(images)
    elif isinstance(images, (list, tuple)):
      items = list(images)
    else:
      items = [images]
    if not items:
      raise ConfigError("No images given.")
    return np.stack([self.preprocess_one(x) for x in items])

  def _function(self, what: Tuple, shape: Tuple[int, ...]):
    key = (what, shape)
    if key not in self._compiled:
      graphdef, normalization, multi = self._graphdef, self._normalization, self.multi_label

      def forward(state, images):
        model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)
        z, logits = model(steps.normalize_images(images, normalization), train=False)
        if what[0] == "embed":
          _, dim, normalize = what
          z = z[:, :dim].astype(jnp.float32)
          if normalize:  # A zero prefix stays zero rather than NaN.
            z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
          return z
        logits = logits.astype(jnp.float32)
        probs = jax.nn.sigmoid(logits) if multi else jax.nn.softmax(logits, axis=-1)
        return probs[what[1]] if what[0] == "probs" else probs

      self._compiled[key] = jax.jit(
          forward, in_shardings=(self._state_sharding, sharding.batch_sharding(self.mesh)),
          out_shardings=sharding.replicated(self.mesh))
    return self._compiled[key]


def load(path: str, *, step: Optional[int] = None) -> Model:
  """The model at `path`: a run's workdir (its latest checkpoint, or `step`), a checkpoint
  step directory (<workdir>/checkpoints/<step>), or an exported directory
  (`python -m mrl_jax.tools.export`: model.safetensors + mrl_config.json)."""
  where = paths.as_path(path)  # a local path or a bucket URL (mrl_jax.paths)
  if paths.is_file(where / EXPORT_CONFIG):
    return _load_export(str(where))
  if where.name.isdigit() and where.parent.name == "checkpoints":
    if step is not None and int(step) != int(where.name):
      raise ConfigError(f"{where} is step {where.name}; do not pass step={step}.")
    step, where = int(where.name), where.parent.parent
  path = str(where)
  config = read_run_config(path)
  run = restore.load_run(config, path, step, mesh=_local_mesh())
  return Model(config, run.state["params"], run.state["model_state"], run.graphdef,
               step=run.step, source=path)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json, written by every run)."""
  config_path = paths.join(workdir, RUN_CONFIG)
  if not paths.exists(config_path):
    raise MissingFileError(
        f"{workdir} is not a run's workdir (no {RUN_CONFIG}), a checkpoint step directory "
        f"or an exported model (no {EXPORT_CONFIG}). Point at the --workdir of a "
        "`python -m mrl_jax.main` run, or export one with `python -m mrl_jax.tools.export`.")
  return ml_collections.ConfigDict(paths.read_json(config_path))


def export_metadata(config: Any, dims: Sequence[int], step: int) -> Dict[str, Any]:
  """mrl_config.json: what a reader needs to rebuild and use the model, with the
  `matryoshka_dims` that serving tools (sentence-transformers, TEI) look for."""
  pp_eval = data.preprocess_spec(config.input, "val")
  mean, std = data.normalization(config.input, num_classes=config.num_classes)
  return {
      "format": "mrl_jax", "format_version": 1, "step": int(step),
      "model": {"name": config.model.name, "variant": config.model.variant,
                "options": config.model.options.to_dict(), "neck_dim": config.model.neck_dim},
      "mode": config.mrl.mode, "matryoshka_dims": [int(m) for m in dims],
      "num_classes": int(config.num_classes), "loss": config.mrl.loss,
      "preprocessing": {"image_size": int(config.input.image_size), "pp_eval": pp_eval,
                        "mean": [float(x) for x in np.ravel(mean)],
                        "std": [float(x) for x in np.ravel(std)]},
      "config": json.loads(config.to_json_best_effort()),
  }


def _load_export(directory: str) -> Model:
  meta = paths.read_json(paths.join(directory, EXPORT_CONFIG))
  if meta.get("format") != "mrl_jax":
    raise ConfigError(f"{directory}/{EXPORT_CONFIG} is not an mrl_jax export (format "
                      f"{meta.get('format')!r}); export with `python -m mrl_jax.tools.export`.")
  config = ml_collections.ConfigDict(meta["config"])
  weights_path = paths.join(directory, EXPORT_WEIGHTS)
  with paths.staged_read(weights_path) as local:  # safetensors reads a local file
    weights = torch_files.load_state_dict(local)
  graphdef, params, model_state = flat.model_template(config)
  params, model_state = flat.into_state(weights, params, model_state, source=weights_path)
  return Model(config, params, model_state, graphdef, step=meta.get("step", 0),
               source=directory)


def _local_mesh() -> jax.sharding.Mesh:
  """Data parallel over this process's devices (inference needs no other host)."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)),
                            devices=jax.local_devices())


def _embed_width(model) -> int:
  return int(model.neck.out_features if model.neck is not None else model.backbone.embed_dim)


def _image_input(x: ImageLike):
  """What the `decode` op takes: bytes or a uint8 array."""
  if isinstance(x, (bytes, bytearray, memoryview, np.ndarray)):
    return bytes(x) if not isinstance(x, np.ndarray) else x
  if isinstance(x, (str, os.PathLike)):
    if not paths.is_file(x):
      raise MissingFileError(f"No image file {x}.")
    return paths.read_bytes(x)
  if hasattr(x, "convert"):  # a PIL image
    return np.asarray(x.convert("RGB"))
  raise ConfigError(f"Cannot read an image from {type(x).__name__}: pass uint8 arrays, PIL "
                    "images, file paths or encoded bytes.")
