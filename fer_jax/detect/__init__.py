"""Face detection for ``fer_jax.predict``: MTCNN in JAX (see ``mtcnn``).

The names are resolved on first use, so that importing the package does not
load JAX and ``python -m fer_jax.detect.mtcnn`` runs the module only once.
"""
import importlib

__all__ = ["MTCNN", "detect_faces"]


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("fer_jax.detect.mtcnn"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
