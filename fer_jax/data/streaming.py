"""Streaming input for datasets too big for device memory: a Grain pipeline over
a random-access split, split across JAX processes, with a checkpointable
position.

Every process builds the same globally shuffled order (same seed), takes every
``process_count``-th record starting at its ``process_index`` and batches its
share, so processes read disjoint records and together cover each epoch. The
returned iterator is a ``grain.DatasetIterator``: ``get_state()`` /
``set_state()`` (or ``grain.checkpoint.CheckpointSave/Restore`` inside an Orbax
``CheckpointManager``) resume at the same batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from etils import epy
import jax
import numpy as np

with epy.lazy_imports():  # only a training split too large to stay on the devices streams
  import grain

from fer_jax.data.base import Split


def batches(split: Split, *, global_batch_size: int, seed: int = 0,
            shuffle: bool = True, num_epochs: int | None = None,
            drop_remainder: bool = True,
            transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
            process_index: int | None = None, process_count: int | None = None,
            read_options: grain.ReadOptions | None = None, first_batch: int = 0
            ) -> grain.DatasetIterator:
  """An iterator of this process's numpy batches of ``split``.

  Args:
    split: a random-access split (``tfds.data_source`` split, ``ArraySplit``).
    global_batch_size: records per step over all processes; each process
      yields ``global_batch_size // process_count`` of them.
    seed: shuffle seed, the same on every process; each epoch reshuffles.
    shuffle: False keeps the split order (evaluation).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch (keep it for evaluation).
    transform: per-record function applied before batching.
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).
    read_options: Grain prefetch threads and buffer.
    first_batch: where to start; the order is a pure function of ``seed``, so
      starting at batch ``k`` continues a run that stopped after ``k`` batches.

  Returns:
    A ``grain.DatasetIterator`` of dicts of stacked numpy arrays.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible "
                     f"by the {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
  dataset = grain.MapDataset.source(split).seed(seed)
  if shuffle:
    dataset = dataset.shuffle()
  dataset = dataset.repeat(num_epochs)[process_index::process_count]
  if transform is not None:
    dataset = dataset.map(transform)
  dataset = dataset.batch(global_batch_size // process_count,
                          drop_remainder=drop_remainder)
  return iter(dataset[first_batch:].to_iter_dataset(read_options))


def to_global(batch, mesh: jax.sharding.Mesh,
              batch_axes: str | tuple[str, ...] = "data"):
  """Turns a pytree of host-local batch arrays into global ``jax.Array``s.

  The leading (batch) dimension is split over the mesh axes ``batch_axes``;
  the global batch is the concatenation of every process's local batch.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def numeric_fields(record: dict[str, Any]) -> dict[str, np.ndarray]:
  """A record's numeric fields, the ones that go to the accelerator (not names or paths)."""
  record = {k: np.asarray(v) for k, v in record.items()}
  return {k: v for k, v in record.items() if v.dtype.kind in "biuf"}


@dataclasses.dataclass(frozen=True)
class TrainStream:
  """A training split streamed through Grain as global batches, one per step."""
  split: Split
  mesh: jax.sharding.Mesh
  batch_size: int
  seed: int

  def from_step(self, step: int) -> Iterator[dict[str, jax.Array]]:
    """The batches of steps ``step``, ``step + 1``, ...: the same whenever a run resumes."""
    local = batches(self.split, global_batch_size=self.batch_size, seed=self.seed,
                    transform=numeric_fields, first_batch=step)
    return (to_global(batch, self.mesh) for batch in local)
