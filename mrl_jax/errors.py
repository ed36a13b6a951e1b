"""The error a user fixes in their config or command line (not a bug in mrl_jax).

The entry point prints these as one clear message instead of a traceback.
"""


class ConfigError(ValueError):
  """An impossible or inconsistent experiment setting; the message names the fix."""


class CorruptImageError(ValueError):
  """Bytes that no decoder can read. The pipeline skips such an example, counts it
  and logs its id, instead of crashing a long run or training on a wrong image."""


class DataError(ValueError):
  """A malformed record or a label the config cannot hold; the message names the
  file or record and the fix. Unlike a corrupt image, this stops the run: it means
  the dataset or the config is wrong, and skipping would train on wrong labels."""
