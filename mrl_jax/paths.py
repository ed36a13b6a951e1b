"""Paths under a workdir on any file system: a local directory, `gs://`, `s3://`, `az://`.

Every read and write of a workdir (configs, summaries, metrics, tables, plots,
eval outputs, embeddings, exports) goes through these helpers, over
`etils.epath` (what Orbax and TFDS use too): a local path goes to the os, a
`gs://…` / `s3://…` / `az://…` / `hf://…` URL to fsspec (gcsfs, s3fs, adlfs; or
TensorFlow's gfile where TensorFlow is installed). Object stores have no
directories, no append and no rename (a rename is a copy), but a single PUT is
atomic, so `write_*` writes a temporary file and renames it on a local disk and
writes the object once on a store: readers see the old file or the whole new one.
Libraries that want a local file name (safetensors, faiss, numpy memory maps)
get one from `staged_write` / `staged_read`, which copy through a local
temporary file when the path is remote.
"""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator, List, Optional, Union

from etils import epath

from mrl_jax.errors import ConfigError

PathLike = Union[str, os.PathLike]
# The URL schemes epath routes to a remote backend (etils/epath/gpath.py); any other
# "x://" would silently become a local directory named "x:".
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_COPY_CHUNK = 16 << 20
_SPOOL_BYTES = 64 << 20  # a remote write beyond this is spooled to a local temp file


def scheme(path: PathLike) -> Optional[str]:
  """'gs' for gs://bucket/x, None for a local path."""
  match = _SCHEME.match(os.fspath(path))
  return match.group(1).lower() if match else None


def is_local(path: PathLike) -> bool:
  return scheme(path) is None


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as it is, a local path made absolute (~ expanded)."""
  if isinstance(path, epath.Path) and not is_local(path):
    return path
  name = scheme(path)
  if name is None:
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  if name not in REMOTE_SCHEMES:
    raise ConfigError(f"{os.fspath(path)}: {name}:// is not a supported file system; use a "
                      f"local path or {', '.join(s + '://' for s in REMOTE_SCHEMES)}.")
  return epath.Path(os.fspath(path))


def join(path: PathLike, *parts: str) -> str:
  """`path`/parts as a string (what the public functions return and log)."""
  return os.fspath(as_path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_file(path: PathLike) -> bool:
  return as_path(path).is_file()


def is_dir(path: PathLike) -> bool:
  """True for a directory, or on a store for a prefix with objects under it."""
  return as_path(path).is_dir()


def makedirs(path: PathLike) -> None:
  """A no-op on a store: a prefix exists once an object is under it, and asking gcsfs
  to make one costs a bucket lookup (a bucket creation where that lookup is denied)."""
  if is_local(path):
    as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> List[str]:
  """The names in a directory, sorted; [] if it does not exist."""
  p = as_path(path)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


def remove(path: PathLike) -> None:
  as_path(path).unlink(missing_ok=True)


def remove_tree(path: PathLike) -> None:
  p = as_path(path)
  if p.exists():
    p.rmtree()


def read_text(path: PathLike) -> str:
  return as_path(path).read_bytes().decode("utf-8")  # epath's os backend ignores encoding=


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_json(path: PathLike) -> Any:
  return json.loads(read_text(path))


def open_read(path: PathLike, mode: str = "rb"):
  """A file object to read `path` (seekable: np.load takes it)."""
  return as_path(path).open(mode)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[Any]:
  """A file ("w" text, "wb" binary) whose content appears at `path` only when the block
  ends without an error: a renamed temp file locally, one upload on a store."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes ('w' or 'wb'), not {mode!r}.")
  p = as_path(path)
  makedirs(p.parent)
  if is_local(p):
    tmp = f"{os.fspath(p)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
      with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})
                ) as f:
        yield f
      os.replace(tmp, p)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as buffer:
    f = buffer if "b" in mode else io.TextIOWrapper(buffer, encoding="utf-8", newline="")
    yield f
    f.flush()
    if f is not buffer:
      f.detach()  # so closing the wrapper later does not close the buffer
    buffer.seek(0)
    with p.open("wb") as out:
      shutil.copyfileobj(buffer, out, _COPY_CHUNK)


def write_bytes(path: PathLike, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def write_text(path: PathLike, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def savefig(fig, path: PathLike, **kwargs) -> None:
  """matplotlib's savefig into a file object (the format from the suffix)."""
  fmt = kwargs.pop("format", os.path.splitext(os.fspath(path))[1].lstrip(".") or "png")
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format=fmt, **kwargs)


def upload(local_file: str, path: PathLike) -> None:
  """Copies a local file to `path`: atomically as write_bytes locally; streamed to a
  store, where the object appears when the upload completes (no second local copy)."""
  if is_local(path):
    with open(local_file, "rb") as src, atomic_open(path, "wb") as dst:
      shutil.copyfileobj(src, dst, _COPY_CHUNK)
    return
  with open(local_file, "rb") as src, as_path(path).open("wb") as dst:
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


@contextlib.contextmanager
def staged_write(path: PathLike) -> Iterator[str]:
  """A local file name for a library that writes to names only; what it writes there
  becomes `path` when the block ends without an error."""
  p = as_path(path)
  local_dir = None
  if is_local(p):  # beside the target, so the final rename stays on one disk
    makedirs(p.parent)
    local_dir = os.fspath(p.parent)
  with tempfile.TemporaryDirectory(prefix=".mrl_jax_stage_", dir=local_dir) as tmp:
    local = os.path.join(tmp, p.name)
    yield local
    if is_local(p):
      os.replace(local, p)
    else:
      upload(local, p)


@contextlib.contextmanager
def staged_read(path: PathLike) -> Iterator[str]:
  """A local file name holding `path`'s content: the path itself if local, else a
  downloaded copy (same base name, so suffix checks still work), deleted afterwards."""
  if is_local(path):
    yield os.fspath(as_path(path))
    return
  p = as_path(path)
  if not p.exists():  # the reader's own "no such file" error, naming the real path
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="mrl_jax_stage_") as tmp:
    local = os.path.join(tmp, p.name)
    with p.open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, _COPY_CHUNK)
    yield local
