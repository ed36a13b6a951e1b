"""Embeddings z (the backbone output before the head) of a split, written to disk in shards.

  python -m mrl_jax.embed --config=configs/demo.py --workdir=/tmp/demo --split=train \
      [--step=N] [--dtype=float16] [--out=DIR]

The model of a run's checkpoint (the latest, or `--step`) embeds every example of
the split with the eval preprocessing, sharded over all devices and hosts: each
process reads its own examples (the grain eval iterator), runs the jitted
forward on its part of the global batch and writes its rows. A shard is a
preallocated `.npy` memory map filled as batches arrive, so ImageNet train
(1.28M × 2048) never sits in host memory. Layout of DIR (default
`<workdir>/embeddings/step_<N>/<split>`):

  p000-00000.z.npy        [n, d] float32 / float16 (rows beyond `count` unused)
  p000-00000.labels.npy   [n] int32, or [n, L] uint8 for multi-label data
  p000-00000.ids.npy      [n] the source's example ids
  index-p000.json         the shard list of process 0 (one such file per process)
  index.json              split, step, dim, dtype, num_examples, the shards in order
                          (written last, by process 0: its presence means complete)

Several processes write into one directory, so with more than one host DIR (the
workdir) must be on a shared file system, as the checkpoints are.

`read_embeddings(DIR)` gives them back as one `Embeddings` (memory-mapped when
the split is a single shard). Splits other than train/val are defined in
`config.embed.splits` (name → overrides of `config.input`).
"""

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mrl_jax import checkpointing, data, errors, experiment, optim, sharding, steps
from mrl_jax.data import pipeline
from mrl_jax.errors import ConfigError

_LOG_EVERY_SECONDS = 10.0


@dataclasses.dataclass
class Embeddings:
  """A split's representations; `z` may be an np.memmap (slice z[:, :m], don't copy it)."""
  z: np.ndarray          # [N, d] float32 or float16
  labels: np.ndarray     # [N] int32, or [N, L] uint8 multi-hot
  ids: np.ndarray        # [N]


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
  state, step = checkpointing.restore_state(workdir, target, step)
  return Run(config, mesh, graphdef, state, shardings, step, dims)


def abstract_model_state(config: Any) -> Tuple[nnx.GraphDef, Any, Tuple[int, ...]]:
  """(graphdef, abstract train state, head dims) as training builds them, unallocated."""
  build_model = experiment.model_factory(config)
  model = nnx.eval_shape(build_model)
  tx, _ = optim.make_optimizer(config.optim, 0, steps.split_model(model)[1])
  graphdef, abstract = steps.abstract_train_state(build_model, tx)
  return graphdef, abstract, tuple(model.head.dims)


def make_embed_fn(graphdef: nnx.GraphDef, state_shardings: Any, batch_sharding, *,
                  normalization=steps.MINUS_ONE_ONE, dtype=jnp.float32):
  """(state, uint8 images [B, S, S, 3]) → z [B, d] in `dtype`, sharded like the batch."""

  def embed(state, images):
    model = nnx.merge(graphdef, state["params"], state["model_state"], copy=True)
    z, _ = model(steps.normalize_images(images, normalization), train=False)
    return z.astype(dtype)  # Cast on the device: float16 halves the transfer too.

  return jax.jit(embed, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=batch_sharding)


def split_input_config(config: Any, split: str) -> Any:
  """`config.input`, with `config.embed.splits[split]` applied for an extra split."""
  extra = config.get("embed", {}).get("splits", {})
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


def embeddings_dir(workdir: str, step: int, split: str) -> str:
  return os.path.join(os.path.abspath(workdir), "embeddings", f"step_{step}", split)


def embed_split(run: Run, split: str, out_dir: str, *, dtype: str = "float32",
                shard_size: int = 0, batch_size: int = 0) -> str:
  """Writes the embeddings of `split` to `out_dir` (see the module docstring); returns it.

  `shard_size` rows per shard file (0: one shard per process); `batch_size` the
  global batch (0: `config.input.eval_batch_size`).
  """
  if dtype not in ("float16", "float32"):
    raise ConfigError(f"Embeddings are stored as float16 or float32, not {dtype!r}; set "
                      "--config.embed.dtype (or --dtype) to one of them.")
  config = run.config
  input_config = split_input_config(config, split)
  source = data.build_source(input_config, split, num_classes=config.num_classes)
  preprocess = data.build_preprocess(input_config, "val", num_classes=config.num_classes)
  batch = batch_size or config.input.eval_batch_size
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
  _clear(out_dir, process)
  writer = ShardWriter(out_dir, process, len(range(process, len(source), count)),
                       shard_size, np.dtype(dtype))
  progress = _Progress(f"embed {split}", len(source), num_batches)
  pending, skipped = None, []  # One batch in flight: the next forward runs during the write.
  for i, host in zip(range(num_batches), batches):
    images = pipeline.to_global({"image": host["image"]}, batch_sharding)["image"]
    z = embed(run.state, images)
    if pending is not None:
      writer.add(*pending)
    pending = (z, host)
    skipped.extend(np.asarray(host["id"])[host["skipped"] == 1].tolist())
    progress.log(i + 1)
  if pending is not None:
    writer.add(*pending)
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


def read_embeddings(directory: str, mmap: bool = True) -> Embeddings:
  """The embeddings written by `embed_split`; z is memory-mapped for a single shard, and
  concatenated into memory (the size of the split) for several."""
  index_path = os.path.join(directory, "index.json")
  if not os.path.exists(index_path):
    raise FileNotFoundError(f"No embeddings in {directory} (no index.json): write them with "
                            "`python -m mrl_jax.embed --config=... --workdir=... --split=...`.")
  with open(index_path, encoding="utf-8") as f:
    index = json.load(f)
  if not index["shards"]:
    raise FileNotFoundError(f"{index_path} lists no shards; the split was empty.")
  parts = {"z": [], "labels": [], "ids": []}
  for shard in index["shards"]:
    for key in parts:
      array = np.load(os.path.join(directory, f"{shard['name']}.{key}.npy"),
                      mmap_mode="r" if mmap and key == "z" else None)
      parts[key].append(array[:shard["count"]])
  joined = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
  return Embeddings(**joined)


def is_complete(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "index.json"))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _clear(out_dir: str, process: int) -> None:
  """Removes this process's shards (and, on process 0, the index) of an earlier write."""
  os.makedirs(out_dir, exist_ok=True)
  if process == 0 and os.path.exists(os.path.join(out_dir, "index.json")):
    os.remove(os.path.join(out_dir, "index.json"))
  for name in os.listdir(out_dir):
    if name.startswith(f"p{process:03d}-"):
      os.remove(os.path.join(out_dir, name))
  _sync("mrl_jax_embed_clear")


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local batch order."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # Drops replicas.
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


class ShardWriter:
  """Fills one process's shards: z into preallocated memory maps, labels and ids buffered
  per shard (small), each shard closed as soon as it is full.

  `capacity` is the most rows this process will add (its share of the split);
  `add(z, host_batch)` takes the global batch-sharded z and this process's host
  batch (its "mask", "label", "id"), and keeps the rows whose mask is 1.
  """

  def __init__(self, out_dir: str, process: int, capacity: int, shard_size: int,
               dtype: np.dtype):
    self.out_dir, self.process, self.dtype = out_dir, process, dtype
    self.remaining = capacity
    self.shard_size = shard_size if shard_size > 0 else max(capacity, 1)
    self.shards: List[Dict[str, Any]] = []
    self._z = None

  def add(self, z: jax.Array, host: Dict[str, np.ndarray]) -> None:
    rows = _local_rows(z)
    if len(rows) != len(host["mask"]):
      raise RuntimeError(f"Got {len(rows)} local rows for a local batch of "
                         f"{len(host['mask'])}; the batch sharding and the data disagree.")
    keep = host["mask"] == 1
    rows, labels, ids = rows[keep], host["label"][keep], np.asarray(host["id"])[keep]
    while len(rows):
      if self._z is None:
        self._open(rows.shape[1])
      take = min(len(rows), len(self._z) - self._count)
      self._z[self._count:self._count + take] = rows[:take]
      self._labels.append(labels[:take])
      self._ids.append(ids[:take])
      self._count += take
      rows, labels, ids = rows[take:], labels[take:], ids[take:]
      if self._count == len(self._z):
        self._finish()

  def _open(self, dim: int) -> None:
    size = min(self.shard_size, self.remaining)
    if size <= 0:
      raise RuntimeError("More examples than this process's shard of the split holds.")
    self._name = f"p{self.process:03d}-{len(self.shards):05d}"
    self._z = np.lib.format.open_memmap(os.path.join(self.out_dir, f"{self._name}.z.npy"),
                                        mode="w+", dtype=self.dtype, shape=(size, dim))
    self.remaining -= size
    self._count, self._labels, self._ids = 0, [], []

  def _finish(self) -> None:
    self._z.flush()
    self._z = None
    ids = np.concatenate(self._ids)
    if ids.dtype == object:
      ids = ids.astype(str)
    np.save(os.path.join(self.out_dir, f"{self._name}.labels.npy"),
            np.concatenate(self._labels))
    np.save(os.path.join(self.out_dir, f"{self._name}.ids.npy"), ids)
    self.shards.append({"name": self._name, "count": int(self._count)})

  def close(self) -> None:
    """Finishes a partly filled shard (skipped images leave its last rows unused)."""
    if self._z is not None and self._count:
      self._finish()
    with open(os.path.join(self.out_dir, f"index-p{self.process:03d}.json"), "w",
              encoding="utf-8") as f:
      json.dump({"shards": self.shards}, f)


def write_index(out_dir: str, num_processes: int, info: Dict[str, Any]) -> None:
  """index.json from every process's shard list (process 0, once all have closed)."""
  shards = []
  for p in range(num_processes):
    with open(os.path.join(out_dir, f"index-p{p:03d}.json"), encoding="utf-8") as f:
      shards.extend(json.load(f)["shards"])
  dim = (int(np.load(os.path.join(out_dir, f"{shards[0]['name']}.z.npy"), mmap_mode="r")
             .shape[1]) if shards else 0)
  info = dict(info, dim=dim, num_examples=sum(s["count"] for s in shards), shards=shards)
  with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)


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


def main(argv) -> None:
  """The CLI (flags defined in `_define_flags`, with --config/--workdir from main)."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from mrl_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  main_lib.init_distributed()
  config = f.config
  embed_config = config.get("embed", {})
  try:
    split_input_config(config, f.split)  # An unknown split fails before the restore.
    run = load_run(config, f.workdir, f.step)
    out = f.out or embeddings_dir(f.workdir, run.step, f.split)
    embed_split(run, f.split, out, dtype=f.dtype or embed_config.get("dtype", "float32"),
                shard_size=embed_config.get("shard_size", 0),
                batch_size=embed_config.get("batch_size", 0))
  except errors.USER_ERRORS as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    print(json.dumps({"split": f.split, "step": run.step, "dir": out}))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from mrl_jax import main as _  # noqa: F401  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("split", "val", "train, val or a split of config.embed.splits.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", None, ["float16", "float32"],
                    "Storage dtype (default: config.embed.dtype).")
  flags.DEFINE_string("out", "", "Output directory (default: "
                      "<workdir>/embeddings/step_<N>/<split>).")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=ungrouped-imports
  _define_flags()
  jax.config.config_with_absl()
  _app.run(main)
