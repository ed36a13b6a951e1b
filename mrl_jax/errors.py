"""The error a user fixes in their config or command line (not a bug in mrl_jax).

The entry point prints these as one clear message instead of a traceback.
"""


class ConfigError(ValueError):
  """An impossible or inconsistent experiment setting; the message names the fix."""
