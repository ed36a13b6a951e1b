"""The torch-free weight-file reader: torch.save zip checkpoints and safetensors.

torch is not a dependency: the tests of files that torch wrote either read the
committed fixture (tests/fixtures/torch_resnet50_w4_mrl.pt) or are skipped without torch;
the refusals are checked on archives written here by hand (pickle opcodes in a zip).
"""

import os
import struct
import zipfile

import numpy as np
import pytest

from mrl_jax.errors import DataError, MissingFileError
from mrl_jax.interop import torch_files

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torch_resnet50_w4_mrl.pt")


# --- hand-made torch.save archives (pickle protocol 2 opcodes) ---------------------------

def _str(s: str) -> bytes:
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _int(n: int) -> bytes:
  return b"J" + struct.pack("<i", n)


def _tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def _tensor(key: str, numel: int, offset: int, size, stride) -> bytes:
  """torch._utils._rebuild_tensor_v2(storage `key`, offset, size, stride, False, {})."""
  storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"),
                   _int(numel)) + b"Q"
  args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                b"\x89", _global("collections", "OrderedDict") + b")R")
  return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict(**tensors: bytes) -> bytes:
  items = b"".join(_str(k) + v for k, v in tensors.items())
  return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + items + b"u."


def _archive(path, pickle_bytes: bytes, storages=None):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/byteorder", "little")
    for key, data in (storages or {}).items():
      z.writestr(f"archive/data/{key}", data)
    z.writestr("archive/version", "3\n")
  return str(path)


def test_a_hand_made_archive_reads_with_offsets_and_strides(tmp_path):
  data = np.arange(12, dtype=np.float32)
  path = _archive(tmp_path / "sd.pt", _state_dict(
      **{"module.a": _tensor("0", 12, 0, (3, 4), (4, 1)),
         "module.b": _tensor("0", 12, 1, (2, 3), (1, 4))}),  # a transposed view at offset 1
      {"0": data.tobytes()})
  sd = torch_files.load_state_dict(path)
  assert list(sd) == ["a", "b"]  # the DistributedDataParallel prefix is stripped
  np.testing.assert_array_equal(sd["a"], data.reshape(3, 4))
  np.testing.assert_array_equal(sd["b"], np.array([[1, 5, 9], [2, 6, 10]], np.float32))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capfd):
  marker = tmp_path / "ran"
  evil = (b"\x80\x02" + _global("os", "system") + _tuple(_str(f"touch {marker}")) + b"R.")
  path = _archive(tmp_path / "evil.pt", evil)
  with pytest.raises(DataError, match=r"evil\.pt.*os\.system.*run that code"):
    torch_files.load_state_dict(path)
  assert not marker.exists()


def test_a_pickled_module_is_refused(tmp_path):
  pkl = (b"\x80\x02" + _global("torch.nn.modules.linear", "Linear") + b")\x81.")
  with pytest.raises(DataError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
    torch_files.load_state_dict(_archive(tmp_path / "module.pt", pkl))


def test_a_tensor_past_the_end_of_its_storage_is_refused(tmp_path):
  path = _archive(tmp_path / "lie.pt", _state_dict(w=_tensor("0", 4, 0, (100,), (1,))),
                  {"0": np.zeros(4, np.float32).tobytes()})
  with pytest.raises(DataError, match=r"lie\.pt.*past its storage"):
    torch_files.load_state_dict(path)


def test_truncated_and_corrupt_checkpoints_name_the_file(tmp_path):
  raw = open(FIXTURE, "rb").read()
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(DataError, match=r"truncated\.pt is a truncated or corrupt"):
    torch_files.load_state_dict(str(truncated))
  # Flip bytes inside a stored tensor: the zip's CRC catches it.
  corrupt = tmp_path / "corrupt.pt"
  with zipfile.ZipFile(FIXTURE) as z:
    info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
  start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
  corrupt.write_bytes(raw[:start] + bytes(b ^ 0xFF for b in raw[start:start + 16])
                      + raw[start + 16:])
  with pytest.raises(DataError, match=r"corrupt\.pt.*(CRC|corrupt)"):
    torch_files.load_state_dict(str(corrupt))


def test_missing_legacy_and_foreign_files(tmp_path):
  with pytest.raises(MissingFileError, match="nope.pt"):
    torch_files.load_state_dict(str(tmp_path / "nope.pt"))
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(b"\x80\x02\x8a\x0a" + b"\x00" * 20)
  with pytest.raises(DataError, match="legacy"):
    torch_files.load_state_dict(str(legacy))
  text = tmp_path / "notes.pth"
  text.write_text("hello")
  with pytest.raises(DataError, match="neither"):
    torch_files.load_state_dict(str(text))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(DataError, match=r"bad\.safetensors"):
    torch_files.load_state_dict(str(bad))


def test_the_committed_fixture_reads_without_torch():
  sd = torch_files.load_state_dict(FIXTURE)
  assert not any(k.startswith("module.") for k in sd)
  assert sd["conv1.weight"].shape == (4, 3, 7, 7) and sd["conv1.weight"].flags.c_contiguous
  assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.num_batches_tracked"] == 3
  assert sd["layer2.0.downsample.0.blur_filter"].shape == (16, 1, 3, 3)


def test_safetensors_round_trip(tmp_path):
  flat = {"params/backbone/stem_conv/kernel": np.random.default_rng(0).normal(
              size=(7, 7, 3, 4)).astype(np.float32),
          "model_state/backbone/stem_bn/mean": np.arange(4, dtype=np.float32),
          "x/half": np.ones((2, 3), np.float16),
          "x/count": np.array(7, np.int64),
          "x/view": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]}
  path = tmp_path / "model.safetensors"
  torch_files.save_safetensors(flat, str(path), metadata={"format": "mrl_jax"})
  back = torch_files.load_state_dict(str(path))
  assert set(back) == set(flat) and not list(tmp_path.glob("*.tmp*"))
  for k, v in flat.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v)


# --- files torch itself wrote (skipped without torch) ------------------------------------

def test_reads_what_torch_saves(tmp_path):
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
  tensors = {
      "conv.weight": conv.weight.detach(),          # channels_last strides
      "half": torch.randn(3, 4).half(),
      "bf16": torch.randn(2, 3).bfloat16(),
      "view": torch.arange(20.).reshape(4, 5)[1:, ::2],   # offset + strides, shared storage
      "base": torch.arange(20.).reshape(4, 5),
      "long": torch.tensor(5), "flags": torch.tensor([True, False]),
      "empty": torch.zeros(0, 3), "int8": torch.arange(-3, 3, dtype=torch.int8),
  }
  wraps = {"plain": lambda sd: sd,
           "nested": lambda sd: {"state_dict": sd, "epoch": 3},
           "ddp": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "opt": 1}}
  for name, wrap in wraps.items():
    path = tmp_path / f"{name}.pt"
    torch.save(wrap(tensors), path)
    sd = torch_files.load_state_dict(str(path))
    assert list(sd) == list(tensors), name
    for k, t in tensors.items():
      want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
      got = sd[k].astype(np.float32) if t.dtype == torch.bfloat16 else sd[k]
      assert got.shape == want.shape and got.dtype == want.dtype, k
      np.testing.assert_array_equal(got, want)
  # Parameters (state_dict(keep_vars=True)) rebuild through _rebuild_parameter.
  torch.save(torch.nn.Linear(4, 2).state_dict(keep_vars=True), tmp_path / "params.pt")
  assert torch_files.load_state_dict(str(tmp_path / "params.pt"))["weight"].shape == (2, 4)
  torch.save(torch.nn.Linear(4, 2), tmp_path / "module.pt")
  with pytest.raises(DataError, match="Linear"):
    torch_files.load_state_dict(str(tmp_path / "module.pt"))
