"""The errors a user fixes in their config, data or command line (not bugs in mrl_jax).

Every CLI prints a `UserError` (and a missing file) as one clear message instead
of a traceback; each subclass also derives from the builtin it refines.
"""


class UserError(Exception):
  """Base of every error whose message names what the user should change."""


# Missing paths keep their builtin type; the CLIs treat them as the user's to fix too.
USER_ERRORS = (UserError, FileNotFoundError)


class ConfigError(UserError, ValueError):
  """An impossible or inconsistent experiment setting; the message names the fix."""


class CorruptImageError(ValueError):
  """Bytes that no decoder can read. The pipeline skips such an example, counts it
  and logs its id, instead of crashing a long run or training on a wrong image."""


class DataError(UserError, ValueError):
  """A malformed record or a label the config cannot hold; the message names the
  file or record and the fix. Unlike a corrupt image, this stops the run: it means
  the dataset or the config is wrong, and skipping would train on wrong labels."""
