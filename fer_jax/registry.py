"""Name -> constructor registries, so configs pick models, datasets and loss terms by name."""
from typing import Any, Callable


class Registry:
  """A mapping from names to callables that reports the known names on a miss."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Callable[..., Any]] = {}

  def register(self, name: str):
    def decorator(fn):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = fn
      return fn
    return decorator

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._entries:
      raise KeyError(
          f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
