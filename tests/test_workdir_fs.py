"""A workdir in a bucket (`--workdir=gs://…`): every output goes through mrl_jax.paths.

The bucket is fsspec's in-memory file system registered as `gs://` (FakeGCS), with
an object store's rules: no directories, no append. epath sends gs:// to fsspec,
so our code runs its real remote branch, offline. A write that bypassed epath
(a builtin `open`, `os.makedirs`) would either fail or create a local `gs:`
folder in the working directory, which the tests check is not there.

Checkpoints are the exception: Orbax hands array data to tensorstore, which maps
gs:// to its own GCS driver (network) and every other path to local files, so
no offline in-memory checkpoint exists; here they go to a local directory.
"""

import json
import os
import struct

import numpy as np
import pytest

from configs import vit_b16_i1k
from mrl_jax import (checkpoint_read, checkpointing, embeddings, evaluators, inference, paths,
                     restore, train)
from mrl_jax.errors import ConfigError
from mrl_jax.evaluators import runner
from mrl_jax.interop import flat
from mrl_jax.metric_writer import JsonLines, MetricWriter
from mrl_jax.tools import export
from tests.fake_bucket import BUCKET

def _event_scalars(data: bytes):
  """{tag: [(step, value)]} of a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out, i = {}, 0
  while i < len(data):
    (length,) = struct.unpack("Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
    i += 12 + length + 4
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _lines(path):
  return [json.loads(line) for line in paths.read_text(path).splitlines()]


def test_paths_write_atomically_and_stage_for_file_name_libraries(bucket, tmp_path):
  for root in (f"{BUCKET}/p", str(tmp_path / "p")):
    paths.write_json(paths.join(root, "a", "x.json"), {"k": 1})
    with paths.atomic_open(paths.join(root, "a", "t.csv")) as f:
      f.write("dim,top1\r\n")
    with pytest.raises(RuntimeError):  # a failed write leaves nothing behind
      with paths.atomic_open(paths.join(root, "a", "broken.bin"), "wb") as f:
        f.write(b"partial")
        raise RuntimeError("killed")
    with paths.staged_write(paths.join(root, "w.bin")) as local:
      assert paths.is_local(local)
      with open(local, "wb") as f:
        f.write(b"\x00\x01")
    with paths.staged_read(paths.join(root, "w.bin")) as local:
      with open(local, "rb") as f:
        assert f.read() == b"\x00\x01"
    assert paths.read_json(paths.join(root, "a", "x.json")) == {"k": 1}
    assert paths.read_text(paths.join(root, "a", "t.csv")) == "dim,top1\r\n"
    assert paths.listdir(paths.join(root, "a")) == ["t.csv", "x.json"]
    assert paths.listdir(paths.join(root, "w.bin", "nothing")) == []
    paths.remove_tree(paths.join(root, "a"))
    assert not paths.exists(paths.join(root, "a", "x.json"))
  assert sorted(bucket) == ["bucket/p/w.bin"]
  assert paths.join(BUCKET, "run") == "gs://bucket/run"
  with pytest.raises(ConfigError, match="memory:// is not a supported file system"):
    paths.as_path("memory://run")  # epath would make it a local folder "memory:"


def test_metrics_on_a_bucket_are_one_file_rewritten_whole(bucket):
  workdir = f"{BUCKET}/run"
  writer = MetricWriter(workdir)
  writer.write(1, {"train/loss": 2.5, "eval/retrieval/mAP@10_d8": 0.5})
  writer.write(2, {"train/loss": 2.0})
  assert not paths.exists(f"{workdir}/metrics.jsonl")  # buffered (REMOTE_FLUSH_SECONDS)
  writer.flush()
  assert [l["step"] for l in _lines(f"{workdir}/metrics.jsonl")] == [1, 2]
  # Another writer meanwhile (an evaluation beside the training): both keep their lines.
  other = JsonLines(f"{workdir}/metrics.jsonl")
  writer.write(3, {"train/loss": 1.5})
  other.write(json.dumps({"step": 9, "eval/x": 1.0}) + "\n")
  other.close()
  writer.close()
  writer.close()  # twice is fine (the loop closes in a finally)
  assert [l["step"] for l in _lines(f"{workdir}/metrics.jsonl")] == [1, 2, 9, 3]
  events = paths.listdir(f"{workdir}/tensorboard")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
  scalars = _event_scalars(paths.read_bytes(f"{workdir}/tensorboard/{events[0]}"))
  assert scalars["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
  assert scalars["eval/retrieval/mAP_at_10_d8"] == [(1, 0.5)]
  resumed = MetricWriter(workdir)  # a resumed run continues the same file
  resumed.write(4, {"train/loss": 1.0})
  resumed.close()
  assert [l["step"] for l in _lines(f"{workdir}/metrics.jsonl")] == [1, 2, 9, 3, 4]


def _checkpoints_on_local_disk(monkeypatch, root):
  """Orbax cannot write an in-memory bucket (module docstring): a gs:// workdir's
  checkpoints go to root/<bucket path> instead; everything else stays in the bucket."""
  def local(workdir):
    workdir = os.fspath(workdir)
    return workdir if paths.is_local(workdir) else str(root / workdir.replace("://", "/"))

  for module, name in ((checkpointing, "Checkpointer"), (checkpointing, "check_writable"),
                       (checkpoint_read, "restore_state")):
    original = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda workdir, *a, _f=original, **k: _f(local(workdir), *a, **k))


@pytest.mark.slow
def test_a_run_with_its_workdir_in_a_bucket(bucket, monkeypatch, tmp_path):
  _checkpoints_on_local_disk(monkeypatch, tmp_path / "ckpt")
  workdir = f"{BUCKET}/run"
  config = vit_b16_i1k.get_config("runlocal")  # 4 steps, the heads' evaluator at the end
  config.evals.classification.every_steps = 2  # ... and a round during training
  config.embed.shard_size = 24  # 64 val examples: 3 shards, each staged and uploaded
  summary = train.run(config, workdir)

  assert paths.read_json(f"{workdir}/summary.json")["steps"] == summary["steps"] == 4
  assert paths.read_json(f"{workdir}/config.json")["mrl"]["nesting"] == [4, 8, 16, 32]
  for name in ("results.json", "results.csv", "results.md", "eval_report.md"):
    assert paths.read_text(f"{workdir}/{name}"), name
  assert paths.read_bytes(f"{workdir}/results.png").startswith(b"\x89PNG")
  for step in (2, 4):
    result = paths.read_json(f"{workdir}/eval/step_{step}/classification.json")
    assert result["step"] == step and result["dims"] == [4, 8, 16, 32]
    assert paths.read_text(f"{workdir}/eval/step_{step}/classification.csv").startswith("dim,")
    assert paths.read_bytes(f"{workdir}/eval/step_{step}/classification.png")[:4] == b"\x89PNG"
  assert paths.read_json(f"{workdir}/eval/latest.json")["step"] == 4
  assert not paths.exists(f"{workdir}/embeddings")  # the loop's rounds remove theirs
  lines = _lines(f"{workdir}/metrics.jsonl")
  assert [l["step"] for l in lines if "train/loss" in l] == [1, 2, 3, 4]
  assert [l["step"] for l in lines if "eval/classification/top1_d8" in l] == [2, 4]
  (events,) = paths.listdir(f"{workdir}/tensorboard")
  scalars = _event_scalars(paths.read_bytes(f"{workdir}/tensorboard/{events}"))
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  assert "val/top1_d32" in scalars
  assert (tmp_path / "ckpt" / "gs" / "bucket" / "run" / "checkpoints" / "4").is_dir()

  # `python -m mrl_jax.evaluate` on it (its main, in process), drawn beside itself.
  config = inference.read_run_config(workdir)  # config.json, read from the bucket
  run = restore.load_run(config, workdir)
  writer = MetricWriter(workdir)
  with restore.RoundFunctions(run, workdir, keep_embeddings=True) as fns:
    ctx = evaluators.EvalContext(run.step, run.dims, run.mesh, fns.embed_split,
                                 fns.apply_heads)
    runner.evaluate_round(ctx, evaluators.build_evaluators(config, dims=run.dims), workdir,
                          title="bucket", writer=writer, compare={"again": [workdir]})
  writer.close()
  assert paths.read_bytes(f"{workdir}/eval/step_4/classification_compare.png")[:4] == b"\x89PNG"
  lines = _lines(f"{workdir}/metrics.jsonl")  # the training's lines kept, the new ones after
  assert [l["step"] for l in lines if "eval/classification/top1_d8" in l] == [2, 4, 4]
  assert len(paths.listdir(f"{workdir}/tensorboard")) == 2

  # Its embeddings, kept in the bucket, read back as the same split embedded locally.
  directory = embeddings.embeddings_dir(workdir, 4, "val")
  index = paths.read_json(paths.join(directory, "index.json"))
  assert [s["count"] for s in index["shards"]] == [24, 24, 16] and index["dim"] == 32
  in_bucket = embeddings.read_embeddings(directory)
  local = embeddings.read_embeddings(restore.embed_split(run, "val", str(tmp_path / "z")))
  np.testing.assert_array_equal(in_bucket.z, local.z)
  np.testing.assert_array_equal(in_bucket.labels, local.labels)
  np.testing.assert_array_equal(in_bucket.ids, local.ids)

  # An export into the bucket, loaded back (inference.load of a workdir is load_run
  # after read_run_config, both above: not restored a third time here).
  model = inference.Model(config, run.state["params"], run.state["model_state"], run.graphdef,
                          step=run.step, source=workdir)
  export.export(model, f"{BUCKET}/export")
  exported = inference.load(f"{BUCKET}/export")
  assert exported.dims == model.dims
  want = flat.flatten(model.params, model.model_state)
  got = flat.flatten(exported.params, exported.model_state)
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
