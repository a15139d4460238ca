"""The dataset registry and the contract every dataset follows.

A dataset loader is registered under a name and called with the ``config.data``
ConfigDict; it returns a ``Dataset``. A split is random access: ``len(split)``
and ``split[i]`` give one record, a dict of numpy values:

  * ``'image'``: uint8 ``[H, W, C]`` (C is 1 or 3);
  * ``'label'``: int32 class index in the dataset's ``class_names`` order;
  * optional ``'soft_label'`` (float32 ``[K]``, a distribution over classes),
    ``'valence'`` and ``'arousal'`` (float32 in [-1, 1]), ``'index'`` (int64).

``ArraySplit`` is the in-memory form (all records as stacked arrays); a
``tfds.data_source`` split has the same record interface. Small datasets are
materialised with ``as_arrays`` and live on the accelerator; large ones stream
through Grain.
"""
import dataclasses
from typing import Mapping, Protocol

import numpy as np

from fer_jax.registry import Registry


class DataError(ValueError):
  """Malformed input data; the message names the file, the row and what was expected."""


DATASETS = Registry("dataset")


class Split(Protocol):

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A split held as stacked numpy arrays, one per record field."""
  arrays: Mapping[str, np.ndarray]

  def __post_init__(self):
    sizes = {k: len(v) for k, v in self.arrays.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"split fields have different lengths: {sizes}")

  def __len__(self) -> int:
    return len(self.arrays["label"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  class_names: tuple[str, ...]
  splits: Mapping[str, Split]

  def split(self, name: str) -> Split:
    if name not in self.splits:
      raise KeyError(f"dataset {self.name!r} has no split {name!r}; "
                     f"splits: {', '.join(self.splits)}")
    return self.splits[name]


def as_arrays(split: Split) -> dict[str, np.ndarray]:
  """Stacks every record of ``split`` into arrays (a no-op for ArraySplit)."""
  if isinstance(split, ArraySplit):
    return dict(split.arrays)
  n = len(split)
  getitems = getattr(split, "__getitems__", None)
  records = getitems(list(range(n))) if getitems else [split[i] for i in range(n)]
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
