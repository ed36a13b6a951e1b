"""Data sources (a registry) and the grain pipeline that turns them into global batches.

A source is a random-access sequence (len, getitem) of examples
{"image": uint8 [H, W, C], "label": int or multi-hot vector}; the pipeline
does sharding over hosts, shuffling, preprocessing and batching. Sources are
built by name from `config.input.source` with their split ("train" / "val").
"""

from typing import Any

from mrl_jax.registry import Registry

SOURCES = Registry("data source")


def build_source(input_config: Any, split: str, *, num_classes: int):
  """The source `input_config.source` for `split`, checked to exist."""
  _import_all()
  return SOURCES.get(input_config.source)(input_config, split, num_classes=num_classes)


def _import_all():
  # Each module registers its sources on import.
  from mrl_jax.data import digits, synthetic, tfds_source  # noqa: F401
