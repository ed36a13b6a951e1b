"""Weight files in, without PyTorch: `torch.save` checkpoints (.pt/.pth) and safetensors.

Why torch-free: torch is a multi-GB dependency that nothing else in mrl_jax needs, and
reading weights does not need it either. A `torch.save` file (the zip format, torch >=
1.6) is a zip archive holding `<archive>/data.pkl`, the pickled state dict, in which
every tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` on a storage named by a pickle persistent id, and one raw file of bytes
per storage, `<archive>/data/<key>` (in the byte order `<archive>/byteorder` names,
little-endian when absent).

A pickle can name any Python callable, so unpickling an untrusted file is running its
code. The unpickler here resolves only the globals a state dict needs (the tensor and
parameter rebuild functions, `collections.OrderedDict`, the `torch.*Storage` types,
each mapped to a numpy stand-in); any other global (`os.system`, a pickled nn.Module,
an optimizer) is refused with a DataError naming it, before anything is called.
Tensors come back as numpy arrays with the file's shapes, strides and dtypes
(bfloat16 as ml_dtypes.bfloat16).
"""

import collections
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping, Optional

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from mrl_jax.errors import DataError, MissingFileError

# torch storage type name → numpy dtype of its elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
# Where a checkpoint nests the weights beside other entries (epoch, optimizer, ...).
_NESTED_KEYS = ("state_dict", "model")
_DDP_PREFIX = "module."  # torch DistributedDataParallel's wrapper


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{name: array} of a `.pt`/`.pth` (torch.save zip format) or `.safetensors` file.

  A checkpoint whose top level is a dict holding "state_dict" or "model" yields that
  entry; a `module.` prefix on every key (DistributedDataParallel) is stripped.
  Raises MissingFileError if `path` is not there, DataError if it is truncated,
  corrupt, of another format, or a pickle that would run code.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"No weight file at {path}: give the path of a .pt/.pth "
                           "(torch.save) or .safetensors file.")
  with open(path, "rb") as f:
    head = f.read(8)
  if path.endswith(".safetensors"):
    tensors = _load_safetensors(path)
  elif zipfile.is_zipfile(path):
    tensors = _load_torch_zip(path)
  elif head.startswith(b"PK"):
    raise DataError(f"{path} is a truncated or corrupt zip archive (torch.save format); "
                    "download or copy it again.")
  elif head[:1] == b"\x80":
    raise DataError(f"{path} is a pickle, not a zip archive: torch's legacy (pre-1.6) "
                    "format, which mrl_jax does not read. Re-save it with a recent torch "
                    "(torch.save(torch.load(path), new_path)) or as .safetensors.")
  else:
    raise DataError(f"{path} is neither a torch.save (zip) checkpoint nor a .safetensors "
                    "file (a safetensors file must have the .safetensors suffix).")
  return _strip_prefix(tensors)


def save_safetensors(flat: Mapping[str, np.ndarray], path: str,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes {name: array} to `path` as safetensors (atomically: a temporary file, then a
  rename), with optional string `metadata` in the header."""
  path = os.fspath(path)
  arrays = {name: np.asarray(a, order="C") for name, a in flat.items()}  # 0-d stays 0-d
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
  try:
    return dict(safetensors.numpy.load_file(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise DataError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                    f"{e}") from e


def _load_torch_zip(path: str) -> Dict[str, np.ndarray]:
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist()
                 if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise DataError(f"{path} is a zip archive but not a torch.save checkpoint: expected "
                        f"one <archive>/data.pkl, found {len(pickles)}.")
      prefix = pickles[0][:-len("data.pkl")]
      order = "little"
      if f"{prefix}byteorder" in archive.namelist():
        order = archive.read(f"{prefix}byteorder").decode("ascii").strip()
      with archive.open(pickles[0]) as f:
        obj = _Unpickler(f, archive, prefix, path, order).load()
  except DataError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, TypeError,
          IndexError, AttributeError, pickle.UnpicklingError) as e:
    raise DataError(f"{path} is a truncated or corrupt torch checkpoint: "
                    f"{type(e).__name__}: {e}") from e
  return _tensors_of(obj, path)


class _StorageType:
  """Stands in for torch.FloatStorage & co. in the pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
  """The flat elements of one storage file, read once and shared by its views."""

  def __init__(self, data: np.ndarray):
    self.data = data


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("a tensor whose storage is not a storage record")
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  data = storage.data
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in stride) or any(
      n < 0 for n in size):
    raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, data.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.size:  # as_strided does not check: a lying file must not read past the end
    raise pickle.UnpicklingError(f"a tensor of size {size}, stride {stride} at offset "
                                 f"{offset} runs past its storage of {data.size} elements")
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride),
      writeable=False)
  return np.array(view, order="C")  # own C-contiguous memory; 0-d stays 0-d


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
  """Resolves the globals of a state dict only; storages come from the archive."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, order: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._order = {"little": "<", "big": ">"}.get(order)
    if self._order is None:
      raise DataError(f"{path} names an unknown byte order {order!r}.")
    self._storages: Dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise DataError(
        f"{self._path} is not a plain state dict of tensors: its pickle calls "
        f"{module}.{name}, and loading it would run that code. mrl_jax reads only "
        "tensors (torch._utils._rebuild_tensor_v2 and parameters in (Ordered)dicts): "
        "save `model.state_dict()`, not the model or the training state, or convert "
        "the file to .safetensors with a trusted torch.")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    _, storage_type, key, _location, numel = pid
    key = str(key)
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}data/{key}")
      dtype = storage_type.dtype.newbyteorder(self._order)
      if len(raw) < int(numel) * dtype.itemsize:
        raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, fewer than "
                                     f"its {numel} elements of {storage_type.name}")
      data = np.frombuffer(raw, dtype, count=int(numel))
      if not dtype.isnative:
        data = data.astype(dtype.newbyteorder("="))
      self._storages[key] = _Storage(data)
    return self._storages[key]


def _tensors_of(obj: Any, path: str) -> Dict[str, np.ndarray]:
  if isinstance(obj, dict) and not all(isinstance(v, np.ndarray) for v in obj.values()):
    for key in _NESTED_KEYS:
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict):
    raise DataError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
  others = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if others:
    raise DataError(f"{path} is not a state dict of tensors: {len(others)} entries are not "
                    f"tensors ({', '.join(others[:5])}).")
  return {str(k): v for k, v in obj.items()}


def _strip_prefix(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  if tensors and all(k.startswith(_DDP_PREFIX) for k in tensors):
    return {k[len(_DDP_PREFIX):]: v for k, v in tensors.items()}
  return tensors
