"""The errors a user fixes in their config, data or command line (not bugs in mrl_jax).

Every CLI prints a `UserError` as one clear message instead of a traceback
(`mrl_jax.cli.run`); each subclass also derives from the builtin it refines, so
`except FileNotFoundError` / `except ValueError` keep working.
"""


class UserError(Exception):
  """Base of every error whose message names what the user should change."""


class ConfigError(UserError, ValueError):
  """An impossible or inconsistent experiment setting; the message names the fix."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the command needs is not there; the message says how to make it
  (prepare the dataset, train the run first, …) or which flag points at it."""


class CorruptImageError(ValueError):
  """Bytes that no decoder can read. The pipeline skips such an example, counts it
  and logs its id, instead of crashing a long run or training on a wrong image."""


class DataError(UserError, ValueError):
  """A malformed record or a label the config cannot hold; the message names the
  file or record and the fix. Unlike a corrupt image, this stops the run: it means
  the dataset or the config is wrong, and skipping would train on wrong labels."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be written (unwritable directory, full disk), or the one asked
  for is corrupt; the message says which file and what to do."""
