"""Embeds every image of a folder (or of ArrayRecord shards) at several trained dims.

  python -m mrl_jax.tools.embed_folder --model=/tmp/demo --input_dir=photos/ \
      --dims=16,64,512 --output=/tmp/photos_emb [--dtype=float16] \
      [--formats=npy,parquet,faiss] [--step=N]

--model is anything `mrl_jax.inference.load` takes (a workdir, a checkpoint step
directory, an export). --input_dir is searched recursively for image files
(ids: their paths relative to it), or holds `<split>-*.array_record` shards of
`python -m mrl_jax.tools.build_dataset` (ids: the records' ids; pick the split
with --split). Each embedding is the MRL protocol's: the prefix z[:, :m],
L2-normalised. Output in --output:

  embeddings_d<m>.npy     [N, m] float32 / float16, one row per embedded image
  ids.json                the N ids, in row order
  skipped.json            the unreadable inputs, with the reason
  embeddings_d<m>.parquet (formats=parquet) columns id, embedding: what vector
                          databases (LanceDB, Qdrant, Milvus, pgvector loaders) load
  faiss_d<m>.index        (formats=faiss; needs `pip install faiss-cpu`) an exact
                          inner-product index, i.e. cosine on the normalised rows
  index.json              model, dims, counts (written last: the output is complete)

The work is split into parts of --part_size inputs, each written when done, so a
killed run resumes where it stopped: rerun the same command. --output (and
--model) may be a bucket (gs://…; mrl_jax.paths); --input_dir is read locally.
"""

import dataclasses
import glob
import json
import os
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
from absl import flags, logging
from array_record.python import array_record_data_source

from mrl_jax import cli, inference, paths
from mrl_jax.data import records
from mrl_jax.data.folder_source import IMAGE_EXTENSIONS
from mrl_jax.errors import ConfigError, CorruptImageError, MissingFileError

FLAGS = flags.FLAGS
FORMATS = ("npy", "parquet", "faiss")
PARTS_DIR = "parts"


@dataclasses.dataclass
class Inputs:
  """The inputs in a fixed order: their ids and how to read the i-th one's bytes."""
  ids: List[str]
  read: Callable[[int], bytes]
  description: str


def folder_inputs(input_dir: str) -> Inputs:
  """Every image file under `input_dir` (recursively, by extension), sorted by path."""
  files = sorted(p for p in glob.glob(os.path.join(input_dir, "**", "*"), recursive=True)
                 if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(p))

  def read(i: int) -> bytes:
    with open(files[i], "rb") as f:
      return f.read()

  return Inputs([os.path.relpath(p, input_dir) for p in files], read,
                f"{len(files)} image files under {input_dir}")


def arrayrecord_inputs(input_dir: str, split: str) -> Inputs:
  """The records of `split`'s shards in `input_dir`, in shard order."""
  shards = sorted(glob.glob(os.path.join(input_dir, records.shard_glob(split))))
  source = array_record_data_source.ArrayRecordDataSource(shards)
  decoded = [records.decode_record(source[i]) for i in range(len(source))]
  return Inputs([str(r["id"]) for r in decoded], lambda i: decoded[i]["image"],
                f"{len(decoded)} records of split {split!r} in {input_dir}")


def find_inputs(input_dir: str, split: str) -> Inputs:
  if not os.path.isdir(input_dir):
    raise MissingFileError(f"--input_dir={input_dir} does not exist.")
  if glob.glob(os.path.join(input_dir, records.shard_glob(split))):
    inputs = arrayrecord_inputs(input_dir, split)
  else:
    inputs = folder_inputs(input_dir)
  if not inputs.ids:
    raise MissingFileError(f"No images under {input_dir} (files ending in "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}) and no "
                           f"{records.shard_glob(split)} shards.")
  return inputs


def embed_inputs(model: inference.Model, inputs: Inputs, output: str, dims: Sequence[int], *,
                 dtype: str = "float32", part_size: int = 4096, batch_size: int = 256,
                 formats: Sequence[str] = ("npy",)) -> Dict[str, Any]:
  """Embeds `inputs` into `output` (see the module docstring); returns index.json's dict."""
  dims = sorted({model.check_dim(int(m)) for m in dims})
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or dtype not in ("float16", "float32"):
    raise ConfigError(f"--formats {unknown} / --dtype={dtype!r}: choose formats from "
                      f"{FORMATS} and dtype float16 or float32.")
  if "faiss" in formats:
    _faiss()  # Missing faiss fails now, not after hours of embedding.
  parts_dir = paths.join(output, PARTS_DIR)
  paths.makedirs(parts_dir)
  num_parts = -(-len(inputs.ids) // part_size)
  start, done_before = time.time(), 0
  for p in range(num_parts):
    rows = range(p * part_size, min((p + 1) * part_size, len(inputs.ids)))
    if _part_done(parts_dir, p, [inputs.ids[i] for i in rows], dims, dtype):
      done_before += len(rows)
      continue
    _write_part(model, inputs, rows, parts_dir, p, dims, dtype, batch_size)
    done = rows.stop
    rate = (done - done_before) / max(time.time() - start, 1e-9)
    logging.info("embed_folder: %d/%d inputs (part %d/%d), %.0f img/s, ETA %dm%02ds", done,
                 len(inputs.ids), p + 1, num_parts, rate, (len(inputs.ids) - done) / rate // 60,
                 (len(inputs.ids) - done) / rate % 60)
  if done_before:
    logging.info("embed_folder: resumed; %d inputs were already embedded.", done_before)
  return _join(parts_dir, output, num_parts, dims, dtype, formats, model, inputs)


def _part_paths(parts_dir: str, p: int) -> Tuple[str, Callable[[int], str]]:
  base = paths.join(parts_dir, f"part-{p:05d}")
  return f"{base}.json", lambda m: f"{base}.d{m}.npy"


def _part_done(parts_dir: str, p: int, ids: List[str], dims, dtype: str) -> bool:
  meta_path, npy = _part_paths(parts_dir, p)
  if not paths.exists(meta_path):
    return False
  meta = paths.read_json(meta_path)
  return (meta["inputs"] == ids and meta["dtype"] == dtype
          and all(paths.exists(npy(m)) for m in dims))


def _write_part(model, inputs: Inputs, rows: range, parts_dir: str, p: int, dims, dtype: str,
                batch_size: int) -> None:
  images, kept, skipped = [], [], []
  for i in rows:
    try:
      images.append(model.preprocess_one(inputs.read(i)))
      kept.append(inputs.ids[i])
    except (CorruptImageError, OSError) as e:
      skipped.append({"id": inputs.ids[i], "reason": f"{type(e).__name__}: {e}"[:300]})
  size = model.config.input.image_size
  batch = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
  z = (model.embed_preprocessed(batch, dims[-1], normalize=False, batch_size=batch_size)
       if len(batch) else np.zeros((0, dims[-1]), np.float32))
  meta_path, npy = _part_paths(parts_dir, p)
  for m in dims:
    prefix = z[:, :m]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    _save_atomic(npy(m), (prefix / np.maximum(norms, 1e-12)).astype(dtype))
  paths.write_json(meta_path, {"inputs": [inputs.ids[i] for i in rows], "ids": kept,
                               "skipped": skipped, "dtype": dtype}, indent=1)


def _save_atomic(path: str, array: np.ndarray) -> None:
  with paths.atomic_open(path, "wb") as f:
    np.save(f, array)


def _load(path: str) -> np.ndarray:
  with paths.open_read(path) as f:
    return np.load(f)


def _join(parts_dir, output, num_parts, dims, dtype, formats, model, inputs) -> Dict[str, Any]:
  ids, skipped = [], []
  for p in range(num_parts):
    meta = paths.read_json(_part_paths(parts_dir, p)[0])
    ids.extend(meta["ids"])
    skipped.extend(meta["skipped"])
  for m in dims:
    z = np.concatenate([_load(_part_paths(parts_dir, p)[1](m)) for p in range(num_parts)])
    _save_atomic(paths.join(output, f"embeddings_d{m}.npy"), z)
    if "parquet" in formats:
      with paths.staged_write(paths.join(output, f"embeddings_d{m}.parquet")) as local:
        _write_parquet(local, ids, z)
    if "faiss" in formats:
      faiss = _faiss()
      index = faiss.IndexFlatIP(m)
      index.add(np.ascontiguousarray(z, np.float32))
      with paths.staged_write(paths.join(output, f"faiss_d{m}.index")) as local:
        faiss.write_index(index, local)  # faiss writes to a local file name only
  paths.write_json(paths.join(output, "ids.json"), ids, indent=1)
  paths.write_json(paths.join(output, "skipped.json"), skipped, indent=1)
  if skipped:
    logging.warning("embed_folder: %d unreadable inputs were skipped (listed in %s), e.g. %s",
                    len(skipped), paths.join(output, "skipped.json"), skipped[0])
  index = {"model": repr(model), "matryoshka_dims": [int(m) for m in model.dims],
           "dims": [int(m) for m in dims], "dtype": dtype, "normalized": True,
           "num_embedded": len(ids), "num_skipped": len(skipped), "formats": list(formats),
           "input": inputs.description}
  paths.write_json(paths.join(output, "index.json"), index, indent=1)
  return index


def _write_parquet(path: str, ids: List[str], z: np.ndarray) -> None:
  # Imported here: only this output format needs pyarrow (installed with tfds).
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  values = pa.array(np.ascontiguousarray(z).reshape(-1))
  column = pa.FixedSizeListArray.from_arrays(values, z.shape[1])
  pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "embedding": column}), path)


def _faiss():
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("--formats=faiss needs FAISS: `pip install faiss-cpu` "
                      "(an optional extra), or leave faiss out of --formats.") from None
  return faiss


def main(argv) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # The progress lines are the point of a CLI.
  inputs = find_inputs(FLAGS.input_dir, FLAGS.split)
  model = inference.load(FLAGS.model, step=FLAGS.step)
  logging.info("embed_folder: %s with %r.", inputs.description, model)
  dims = [int(m) for m in FLAGS.dims] or [model.dims[-1]]
  index = embed_inputs(model, inputs, FLAGS.output, dims, dtype=FLAGS.dtype,
                       part_size=FLAGS.part_size, batch_size=FLAGS.batch_size,
                       formats=FLAGS.formats)
  print(json.dumps(index))


def _define_flags() -> None:
  flags.DEFINE_string("model", None, "A workdir, checkpoint step dir or export.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
  flags.DEFINE_string("input_dir", None, "Image folder (recursive) or ArrayRecord shards.")
  flags.DEFINE_string("split", "train", "The split of ArrayRecord shards in --input_dir.")
  flags.DEFINE_list("dims", [], "Trained dims to embed at (default: the largest).")
  flags.DEFINE_string("output", None, "Output directory.")
  flags.DEFINE_enum("dtype", "float32", ["float16", "float32"], "Storage dtype.")
  flags.DEFINE_list("formats", ["npy"], f"Any of {', '.join(FORMATS)}.")
  flags.DEFINE_integer("part_size", 4096, "Inputs per resumable part.")
  flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
  flags.mark_flags_as_required(["model", "input_dir", "output"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
