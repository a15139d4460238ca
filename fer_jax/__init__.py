"""fer_jax: facial-expression recognition in JAX/Flax.

``fer_jax.load(name_or_dir)`` returns a ``fer_jax.predict.Predictor``. It is
resolved on first use, so that importing the package stays cheap (no JAX) and
``python -m fer_jax.predict`` runs its module only once.
"""
import importlib

_LAZY = {"load": "fer_jax.predict"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
