"""A run's model restored for inference: its state on this machine's mesh, the jitted
forwards (images → z, z → the heads' logits) and the embeddings of a whole split.

`load_run` reads a checkpoint straight into the shardings the config asks for
on the current mesh (which may differ from the training mesh); the training
loop wraps its live state in the same `Run` for its evaluations. `embed_split`
writes a split's z in the format of `mrl_jax.embeddings`: each process reads
its own examples (the grain eval iterator), runs the forward on its part of
the global batch and writes its rows. `RoundFunctions` is what one evaluation
round hands the evaluators: an embed-a-split function (cached on disk) and an
apply-the-heads function.
"""

import dataclasses
import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mrl_jax import checkpoint_read, data, experiment, optim, paths, sharding, steps
from mrl_jax.data import pipeline
from mrl_jax.embeddings import (Embeddings, ShardWriter, clear_process_files, embeddings_dir,
                                is_complete, read_embeddings, write_index)
from mrl_jax.errors import ConfigError

_LOG_EVERY_SECONDS = 10.0


@dataclasses.dataclass
class Run:
  """A run's model restored for inference: what the forward passes need."""
  config: Any
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state: steps.TrainState
  state_shardings: Any
  step: int
  dims: Tuple[int, ...]
  # Jitted forwards by purpose, reused by every round that shares this dict (the
  # training loop's evaluations), so each compiles once per run, not once per round.
  compiled: Dict[Any, Any] = dataclasses.field(default_factory=dict)


def load_run(config: Any, workdir: str, step: Optional[int] = None,
             mesh: Optional[jax.sharding.Mesh] = None) -> Run:
  """The train state of `workdir`'s checkpoint `step` (None: latest), read straight into
  the shardings `config` asks for on this machine's mesh (which may differ from the
  training mesh)."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  graphdef, abstract, dims = abstract_model_state(config)
  shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  state, step = checkpoint_read.restore_state(
      workdir, target, step, checksums=config.checkpoint.verify_checksums)
  return Run(config, mesh, graphdef, state, shardings, step, dims)


def abstract_model_state(config: Any) -> Tuple[nnx.GraphDef, Any, Tuple[int, ...]]:
  """(graphdef, abstract train state, head dims) as training builds them, unallocated."""
  build_model = experiment.model_factory(config)
  model = nnx.eval_shape(build_model)
  tx, _ = optim.make_optimizer(config.optim, 0, steps.split_model(model)[1])
  graphdef, abstract = steps.abstract_train_state(build_model, tx)
  return graphdef, abstract, tuple(model.head.dims)


def make_embed_fn(graphdef: nnx.GraphDef, state_shardings: Any, batch_sharding, *,
                  normalization, dtype=jnp.float32):
  """(state, uint8 images [B, S, S, 3]) → z [B, d] in `dtype`, sharded like the batch;
  `normalization` is the run's (`data.normalization`), applied on the device."""

  def embed(state, images):
    model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)
    z, _ = model(steps.normalize_images(images, normalization), train=False)
    return z.astype(dtype)  # Cast on the device: float16 halves the transfer too.

  return jax.jit(embed, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def make_head_fn(graphdef: nnx.GraphDef, state_shardings: Any, batch_sharding,
                 out_sharding):
  """(state, z [B, d]) → float32 logits [M, B, L] of every trained head, in dims order."""

  def head(state, z):
    model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)
    return model.head(z.astype(jnp.float32)).astype(jnp.float32)

  return jax.jit(head, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=out_sharding)


def apply_heads(run: Run, z: np.ndarray) -> np.ndarray:
  """The trained heads' float32 logits [M, N, L] of host embeddings z [N, d], in blocks of
  the eval batch (padded to the data-parallel size) on the run's mesh."""
  batch_sharding = sharding.batch_sharding(run.mesh)
  if "head" not in run.compiled:
    run.compiled["head"] = make_head_fn(run.graphdef, run.state_shardings, batch_sharding,
                                        sharding.replicated(run.mesh))
  head_fn = run.compiled["head"]
  parallel = sharding.data_parallel_size(run.mesh)
  block = -(-run.config.input.eval_batch_size // parallel) * parallel
  out = []
  for start in range(0, len(z), block):
    rows = np.asarray(z[start:start + block], np.float32)
    padded = np.zeros((block, z.shape[1]), np.float32)
    padded[:len(rows)] = rows
    array = jax.make_array_from_callback(padded.shape, batch_sharding,
                                         lambda index, p=padded: p[index])
    out.append(np.asarray(head_fn(run.state, array))[:, :len(rows)])
  return np.concatenate(out, axis=1)


def split_input_config(config: Any, split: str) -> Any:
  """`config.input`, with `config.embed.splits[split]` applied for an extra split."""
  extra = config.embed.splits
  if split in ("train", "val"):
    return config.input
  if split not in extra:
    raise ConfigError(f"Unknown split {split!r}: use 'train', 'val' or a split defined in "
                      f"config.embed.splits (defined: {sorted(extra) or 'none'}), e.g. "
                      f"embed.splits.{split} = {{'source': 'folder', 'data_dir': ...}}.")
  input_config = config.input.copy_and_resolve_references()
  with input_config.unlocked():
    input_config.update(extra[split].to_dict())
  return input_config


def embed_split(run: Run, split: str, out_dir: str, *, dtype: Optional[str] = None,
                shard_size: Optional[int] = None, batch_size: Optional[int] = None) -> str:
  """Writes the embeddings of `split` to `out_dir` (`mrl_jax.embeddings`); returns it.

  `dtype`, `shard_size` (rows per shard file, 0: one shard per process) and
  `batch_size` (the global batch, 0: `config.input.eval_batch_size`) default to
  `config.embed`'s.
  """
  config = run.config
  dtype = dtype or config.embed.dtype
  shard_size = config.embed.shard_size if shard_size is None else shard_size
  batch = (config.embed.batch_size if batch_size is None else batch_size
           ) or config.input.eval_batch_size
  if dtype not in ("float16", "float32"):
    raise ConfigError(f"Embeddings are stored as float16 or float32, not {dtype!r}; set "
                      "--config.embed.dtype (or --dtype) to one of them.")
  input_config = split_input_config(config, split)
  source = data.build_source(input_config, split, num_classes=config.num_classes)
  preprocess = data.build_preprocess(input_config, "val", num_classes=config.num_classes)
  batch_sharding = sharding.batch_sharding(run.mesh)
  if ("embed", dtype) not in run.compiled:
    run.compiled["embed", dtype] = make_embed_fn(
        run.graphdef, run.state_shardings, batch_sharding,
        normalization=data.normalization(config.input, num_classes=config.num_classes),
        dtype=jnp.dtype(dtype))
  embed = run.compiled["embed", dtype]
  num_batches = pipeline.num_eval_batches(len(source), batch)
  batches = pipeline.eval_iterator(source, preprocess, global_batch=batch,
                                   num_classes=config.num_classes,
                                   multi_label=input_config.multi_label,
                                   workers=input_config.workers)
  process, count = jax.process_index(), jax.process_count()
  clear_process_files(out_dir, process)
  _sync("mrl_jax_embed_clear")
  writer = ShardWriter(out_dir, process, len(range(process, len(source), count)),
                       shard_size, np.dtype(dtype))
  progress = _Progress(f"embed {split}", len(source), num_batches)
  pending, skipped = None, []  # One batch in flight: the next forward runs during the write.
  for i, host in zip(range(num_batches), batches):
    images = pipeline.to_global({"image": host["image"]}, batch_sharding)["image"]
    z = embed(run.state, images)
    if pending is not None:
      writer.add(local_rows(pending[0]), pending[1])
    pending = (z, host)
    skipped.extend(np.asarray(host["id"])[host["skipped"] == 1].tolist())
    progress.log(i + 1)
  if pending is not None:
    writer.add(local_rows(pending[0]), pending[1])
  writer.close()
  if skipped:
    logging.warning("%d unreadable images of %s were left out (ids %s%s).", len(skipped),
                    split, skipped[:10], " …" if len(skipped) > 10 else "")
  _sync(f"mrl_jax_embed_{split}")
  if process == 0:
    write_index(out_dir, count, dict(split=split, step=int(run.step), dtype=str(dtype),
                                     source=str(input_config.source)))
  _sync(f"mrl_jax_embed_index_{split}")
  logging.info("Wrote the %s embeddings to %s in %.1fs.", split, out_dir, progress.elapsed())
  return out_dir


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local batch order."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # Drops replicas.
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


class RoundFunctions:
  """What one evaluation round of `run` gives its evaluators (`evaluators.EvalContext`):

  `embed_split(split)` computes a split's embeddings once, into
  `<workdir>/embeddings/step_<N>/<split>`, and reuses them if already there
  (e.g. from `python -m mrl_jax.embed`); `apply_heads(z)` runs the trained
  heads. With `keep_embeddings=False` (the training loop) `close()` deletes the
  embeddings this round wrote.
  """

  def __init__(self, run: Run, workdir: str, *, keep_embeddings: bool = True):
    self.run, self.workdir, self._keep = run, workdir, keep_embeddings
    self._written = []

  def embed_split(self, split: str) -> Embeddings:
    directory = embeddings_dir(self.workdir, self.run.step, split)
    if not is_complete(directory):
      embed_split(self.run, split, directory)
      self._written.append(directory)
    return read_embeddings(directory)

  def apply_heads(self, z: np.ndarray) -> np.ndarray:
    return apply_heads(self.run, z)

  def close(self) -> None:
    if self._keep or not self._written:
      return
    _sync(f"mrl_jax_eval_done_{self.run.step}")  # Every process is done with the files.
    if jax.process_index() == 0:
      for directory in self._written:
        paths.remove_tree(directory)
        parent = paths.as_path(directory).parent  # step_<N>/, then embeddings/, if empty
        for folder in (parent, parent.parent):
          if paths.is_dir(folder) and not paths.listdir(folder):
            folder.rmdir()
    self._written = []

  def __enter__(self) -> "RoundFunctions":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class _Progress:
  """A log line every few seconds: batches done, img/s and the ETA."""

  def __init__(self, what: str, num_examples: int, num_batches: int):
    self.what, self.num_examples, self.num_batches = what, num_examples, num_batches
    self.start = self.last = time.time()

  def log(self, done: int) -> None:
    now = time.time()
    if now - self.last < _LOG_EVERY_SECONDS and done != self.num_batches:
      return
    self.last = now
    fraction = done / max(self.num_batches, 1)
    rate = fraction * self.num_examples / max(now - self.start, 1e-9)
    eta = (1 - fraction) * self.num_examples / max(rate, 1e-9)
    logging.info("%s: %d/%d batches (%.1f%%), %.0f img/s, ETA %dm%02ds", self.what, done,
                 self.num_batches, 100 * fraction, rate, eta // 60, eta % 60)

  def elapsed(self) -> float:
    return time.time() - self.start
