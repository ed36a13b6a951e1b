"""The one registry pattern of the project: a decorator to register, a name to look up.

Models, data sources, evaluators and preprocessing ops each own one
`Registry`. Lookups of unknown names fail with the list of known ones, so a typo
in a config is a one-line fix rather than a stack trace.
"""

from typing import Callable, Dict, TypeVar

from mrl_jax.errors import ConfigError

T = TypeVar("T")


class Registry:
  """Maps names to builders (functions or classes)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> Callable:
    if name not in self._entries:
      known = ", ".join(sorted(self._entries)) or "(none)"
      raise ConfigError(f"Unknown {self.kind} {name!r}. Known {self.kind}s: {known}.")
    return self._entries[name]

  def name_of(self, obj: Callable) -> str:
    """The name `obj` was registered under."""
    for name, entry in self._entries.items():
      if entry is obj:
        return name
    raise KeyError(f"{obj!r} is not a registered {self.kind}.")

  def names(self):
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
