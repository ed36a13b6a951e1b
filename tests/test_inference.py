"""The inference API on a real trained run: load, embed at trained dims, classify, cascade,
and an export that loads back to identical embeddings.

One tiny MRL ResNet is trained in process (a few steps on the bundled digits);
its embeddings are checked against the evaluation path's stored z
(`restore.embed_split`), its classes against numpy on the heads' logits.
"""

import importlib.util
import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import vit_b16_i1k
from mrl_jax import data, embeddings, inference, restore, train
from mrl_jax.errors import ConfigError, MissingFileError
from mrl_jax.tools import export

NESTING = (2, 4, 8, 16, 32)
pytestmark = pytest.mark.slow  # one training run (~15 s) shared by the module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("inference_run")
  c = vit_b16_i1k.get_config("runlocal")  # a ViT "mu/4": z is 32 wide
  c.mrl.nesting = NESTING
  c.total_steps = 3
  train.run(c, str(workdir))
  source = data.build_source(c.input, "val", num_classes=c.num_classes)
  images = np.stack([source[i]["image"] for i in range(12)])
  return c, workdir, images


@pytest.fixture(scope="module")
def model(run):
  return inference.load(str(run[1]))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_embed_is_the_normalised_prefix_of_the_stored_z(run, model, tmp_path):
  config, workdir, images = run
  assert model.dims == NESTING and model.embed_dim == 32 and model.step == 3
  # The evaluation path's z of the val split, written to disk and read back.
  out = restore.embed_split(restore.load_run(config, str(workdir)), "val", str(tmp_path / "z"))
  stored = np.asarray(embeddings.read_embeddings(out).z[:len(images)], np.float32)
  for m in NESTING:
    got = model.embed(images, dim=m)
    assert got.shape == (len(images), m) and got.dtype == np.float32
    np.testing.assert_allclose(got, _unit(stored[:, :m]), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  raw = model.embed(images[:5], dim=8, normalize=False)
  np.testing.assert_allclose(raw, stored[:5, :8], rtol=1e-5, atol=1e-5)
  # Odd batch sizes pad to the device count and give the same rows.
  np.testing.assert_allclose(model.embed(images[:3], dim=4, batch_size=2),
                             model.embed(images, dim=4)[:3], atol=1e-6)


def test_untrained_dims_are_refused_unless_asked_for(run, model):
  images = run[2]
  with pytest.raises(ConfigError, match=r"trained at dims \[2, 4, 8, 16, 32\], not 5"):
    model.embed(images, dim=5)
  assert model.embed(images, dim=5, allow_untrained_dim=True).shape == (len(images), 5)
  with pytest.raises(ConfigError, match="outside the embedding width 1..32"):
    model.embed(images, dim=33, allow_untrained_dim=True)


def test_classify_and_cascade_follow_the_heads(run, model):
  config, workdir, images = run
  restored = restore.load_run(config, str(workdir))
  z = model.embed(images, dim=32, normalize=False)
  logits = restore.apply_heads(restored, z)  # [M, B, L], independently of the forward
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  probs = shifted / shifted.sum(-1, keepdims=True)
  for i, m in enumerate(NESTING):
    top = model.classify(images, dim=m, top_k=3)
    assert top.classes.shape == (len(images), 3) and top.dim == m
    np.testing.assert_array_equal(top.classes[:, 0], probs[i].argmax(-1))
    np.testing.assert_allclose(top.probabilities[:, 0], probs[i].max(-1), atol=1e-5)
    assert np.all(np.diff(top.probabilities, axis=1) <= 0)
  never = model.cascade(images, thresholds=2.0)  # nothing is that confident: the last dim
  np.testing.assert_array_equal(never.dims, NESTING[-1])
  np.testing.assert_array_equal(never.classes, probs[-1].argmax(-1))
  always = model.cascade(images, thresholds=0.0)
  np.testing.assert_array_equal(always.dims, NESTING[0])
  # One threshold per dim: stop at the first dim whose confidence reaches it.
  t = np.array([probs[0].max(-1)[0] + 1e-6, 0.0, 0.0, 0.0])
  mixed = model.cascade(images, thresholds=t)
  expect = np.where(probs[0].max(-1) >= t[0], NESTING[0], NESTING[1])
  np.testing.assert_array_equal(mixed.dims, expect)
  with pytest.raises(ConfigError, match="one threshold per dim"):
    model.cascade(images, thresholds=[0.5, 0.5])


def test_images_as_pil_paths_and_bytes_embed_alike(run, model, tmp_path):
  images = run[2]
  want = model.embed(images[:2], dim=8)
  png = io.BytesIO()
  Image.fromarray(images[0]).save(png, format="PNG")
  path = tmp_path / "one.png"
  Image.fromarray(images[1]).save(path)
  got = model.embed([png.getvalue(), str(path)], dim=8)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(model.embed(Image.fromarray(images[0]), dim=8), want[:1], atol=1e-6)
  with pytest.raises(MissingFileError, match="No image file"):
    model.embed([str(tmp_path / "missing.png")])


def test_load_a_step_directory_and_bad_paths(run, model, tmp_path):
  _, workdir, images = run
  by_step = inference.load(str(workdir / "checkpoints" / "3"))
  assert by_step.step == 3
  np.testing.assert_array_equal(by_step.embed(images, dim=4), model.embed(images, dim=4))
  with pytest.raises(MissingFileError, match="not a run's workdir"):
    inference.load(str(tmp_path))


def test_export_loads_back_to_identical_embeddings(run, model, tmp_path):
  images = run[2]
  export.export(model, str(tmp_path / "exported"))
  meta = json.loads((tmp_path / "exported" / inference.EXPORT_CONFIG).read_text())
  assert meta["matryoshka_dims"] == list(NESTING) and meta["mode"] == "mrl"
  assert meta["preprocessing"]["image_size"] == 32 and meta["num_classes"] == 10
  assert meta["preprocessing"]["pp_eval"].endswith("central_crop(32)|normalize(imagenet)")
  back = inference.load(str(tmp_path / "exported"))
  assert back.dims == model.dims and back.step == model.step
  for m in (2, 16):
    np.testing.assert_array_equal(back.embed(images, dim=m), model.embed(images, dim=m))
  np.testing.assert_array_equal(back.classify(images, dim=4).classes,
                                model.classify(images, dim=4).classes)


def _image_folder(root, images):
  """7 good images (PNG and JPEG, in subfolders) and 2 unreadable ones."""
  for i, image in enumerate(images[:7]):
    sub = root / ("a" if i % 2 else "b")
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(sub / f"img{i}.{'png' if i % 3 else 'jpg'}")
  (root / "a" / "truncated.jpg").write_bytes((root / "b" / "img0.jpg").read_bytes()[:50])
  (root / "b" / "notes.png").write_text("not an image")
  return {f"{'a' if i % 2 else 'b'}/img{i}.{'png' if i % 3 else 'jpg'}": i for i in range(7)}


def test_embed_folder_embeds_each_good_image_once_lists_bad_ones_and_resumes(
    run, model, tmp_path):
  from mrl_jax.tools import embed_folder  # pylint: disable=import-outside-toplevel
  images = run[2]
  expected = _image_folder(tmp_path / "in", images)
  inputs = embed_folder.find_inputs(str(tmp_path / "in"), "train")
  assert len(inputs.ids) == 9
  formats = ["npy", "parquet"] + (["faiss"] if _has_faiss() else [])

  # A run killed in the middle of its third part (of 3 inputs each) ...
  read = inputs.read

  def dies_at_seven(i):
    if i == 7:
      raise KeyboardInterrupt("killed")
    return read(i)

  inputs.read = dies_at_seven
  out = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    embed_folder.embed_inputs(model, inputs, str(out), [4, 16], part_size=3, formats=formats)
  finished = sorted(p.name for p in (out / "parts").glob("*.json"))
  assert finished == ["part-00000.json", "part-00001.json"]
  stamps = {p: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
  # ... resumes: the finished parts are kept as they are, the rest is embedded.
  inputs.read = read
  index = embed_folder.embed_inputs(model, inputs, str(out), [4, 16], part_size=3,
                                    formats=formats)
  assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
  assert (index["num_embedded"], index["num_skipped"]) == (7, 2)
  ids = json.loads((out / "ids.json").read_text())
  assert sorted(ids) == sorted(expected)  # each good image once
  skipped = {s["id"] for s in json.loads((out / "skipped.json").read_text())}
  assert skipped == {"a/truncated.jpg", "b/notes.png"}
  decoded = [np.asarray(Image.open(tmp_path / "in" / i).convert("RGB")) for i in ids]
  for m in (4, 16):
    z = np.load(out / f"embeddings_d{m}.npy")
    np.testing.assert_allclose(z, model.embed(decoded, dim=m), atol=1e-5)
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  table = pq.read_table(out / "embeddings_d16.parquet")
  assert table.column("id").to_pylist() == ids
  np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                             np.load(out / "embeddings_d16.npy"), atol=0)
  if _has_faiss():
    import faiss  # pylint: disable=import-outside-toplevel
    index16 = faiss.read_index(str(out / "faiss_d16.index"))
    z16 = np.load(out / "embeddings_d16.npy")
    scores, _ = index16.search(z16[:3], 2)  # inner product = cosine on these rows
    assert index16.ntotal == 7
    np.testing.assert_allclose(scores, -np.sort(-(z16[:3] @ z16.T), axis=1)[:, :2], atol=1e-5)
  with pytest.raises(ConfigError, match="trained at dims"):
    embed_folder.embed_inputs(model, inputs, str(tmp_path / "x"), [5])


def _has_faiss():
  return importlib.util.find_spec("faiss") is not None


def test_embed_folder_reads_arrayrecord_shards(run, model, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  from mrl_jax.data import records  # pylint: disable=import-outside-toplevel
  from mrl_jax.tools import embed_folder  # pylint: disable=import-outside-toplevel
  images = run[2][:4]
  writer = array_record_module.ArrayRecordWriter(
      str(tmp_path / records.shard_name("val", 0, 1)), records.WRITER_OPTIONS)
  for i, image in enumerate(images):
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    writer.write(records.encode_record(png.getvalue(), 0, f"record-{i}"))
  writer.write(records.encode_record(b"\x89PNG broken", 0, "record-broken"))
  writer.close()
  inputs = embed_folder.find_inputs(str(tmp_path), "val")
  index = embed_folder.embed_inputs(model, inputs, str(tmp_path / "out"), [8])
  assert (index["num_embedded"], index["num_skipped"]) == (4, 1)
  assert json.loads((tmp_path / "out" / "ids.json").read_text()) == [
      f"record-{i}" for i in range(4)]
  np.testing.assert_allclose(np.load(tmp_path / "out" / "embeddings_d8.npy"),
                             model.embed(images, dim=8), atol=1e-5)
