"""The import arrows of docs/architecture.md, checked on the source: they only go down.

Read with `ast` (every import statement, at top level or inside a function), so a
lazy import cannot hide an upward arrow.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mrl_jax"
ENTRY_POINTS = {"mrl_jax.main", "mrl_jax.evaluate", "mrl_jax.embed"}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """Every module `path` imports (for `from a import b`, both a and a.b)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _importers_of(targets, *, among=None):
  return sorted(name for name, imports in MODULES.items()
                if (among is None or among(name)) and imports & set(targets))


def test_the_scan_sees_the_package():
  assert {"mrl_jax.train", "mrl_jax.mrl", "mrl_jax.evaluators.knn"} <= set(MODULES)
  assert "mrl_jax.train" in _importers_of({"mrl_jax.experiment"})


def test_no_module_imports_an_entry_point():
  tools = {name for name in MODULES if name.startswith("mrl_jax.tools.")}
  assert _importers_of(ENTRY_POINTS) == []
  # A tool may use a helper module of tools/, never another tool's CLI.
  cli_tools = {name for name in tools if "__main__" in (
      ROOT / (name.replace(".", "/") + ".py")).read_text(encoding="utf-8")}
  assert _importers_of(cli_tools) == []


def test_the_head_knows_no_backbone():
  assert not any(i.startswith("mrl_jax.models") for i in MODULES["mrl_jax.mrl"])


@pytest.mark.parametrize("forbidden", [
    "mrl_jax.checkpointing", "mrl_jax.checkpoint_read", "orbax", "orbax.checkpoint",
    "mrl_jax.restore", "mrl_jax.inference", "mrl_jax.embed", "mrl_jax.train", "mrl_jax.experiment", "mrl_jax.cli"])
def test_evaluators_receive_functions_not_the_run(forbidden):
  assert _importers_of({forbidden}, among=lambda n: n.startswith("mrl_jax.evaluators")) == []


def test_embedding_files_need_numpy_only():
  assert not any(i == "jax" or i.startswith("jax.") for i in MODULES["mrl_jax.embeddings"])


def test_preprocessing_ops_import_the_leaf_registry_not_preprocess():
  for name in ("mrl_jax.data.image_ops", "mrl_jax.data.batch_ops"):
    assert "mrl_jax.data.preprocess" not in MODULES[name], name
    assert "mrl_jax.data.op_registry" in MODULES[name], name
