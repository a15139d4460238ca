"""Orbax checkpoints of a phase: the train state plus JSON metadata.

Orbax writes each step into a temporary directory and renames it only after
every file is committed, so a save that is interrupted half-way is never
listed as a step and the last complete checkpoint is what resumes. A save
that fails (a full disk) raises ``CheckpointError`` naming the intact step;
a complete step damaged on disk later is set aside and the one before resumes.
"""
import contextlib
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint._src.metadata import array_metadata_store

# Orbax splits the save of a replicated array among its replicas, and each slice
# shape on each device compiles a program of its own: 160 of them for one tiny run
# on 8 CPU devices, each costing far more than writing its kilobytes. Arrays whose
# per-replica slice is smaller than this are written by one replica.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def quiet_logs() -> None:
  """Drops Orbax's INFO lines (a dozen per save) that would drown the progress bars."""
  absl_logging.get_absl_logger().addFilter(
      lambda record: record.levelno > logging.INFO or "/orbax/" not in record.pathname)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's default pytree handler, with small replicated arrays saved unsplit.

  The metadata store is private Orbax API, but the only way to keep the default
  handler's per-array metadata files; setup.cfg keeps orbax-checkpoint below 0.13.
  """
  handlers = ocp.type_handlers
  registry = handlers.create_type_handler_registry(
      *[(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types()])
  registry.add(jax.Array, handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL), override=True)
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the message names the intact one."""


class Checkpoints:
  """A directory of numbered checkpoints ``{'state': pytree, 'meta': json}``."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def discard_after(self, step: int) -> None:
    """Deletes checkpoints newer than ``step`` (written by a run that did not finish)."""
    for newer in [s for s in self._manager.all_steps() if s > step]:
      self._manager.delete(newer)

  @contextlib.contextmanager
  def _writing(self):
    # Orbax writes in the background: a failed write surfaces at the next save or wait.
    try:
      yield
    except OSError as e:
      raise CheckpointError(
          f"writing a checkpoint in {self.directory} failed: {e.strerror or e} "
          f"({e.filename or 'no file named'}); the last complete checkpoint, step "
          f"{self.latest_step()}, is intact") from e

  def save(self, step: int, state: Any, meta: dict) -> None:
    with self._writing():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the structure, shapes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest step that reads back, or None without any.

    A step that fails to read while an older one reads is damaged on disk: it is
    renamed ``damaged-<step>`` (kept for inspection, invisible to Orbax), with a
    warning. When no step reads, the first error is raised: it is then not damage
    (a changed model, say), and nothing is set aside.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        state, meta = self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except  # Orbax and TensorStore raise many types
        if i == len(steps) - 1:
          raise
        absl_logging.warning("checkpoint step %d in %s cannot be read (%s: %s); "
                             "falling back to step %d", step, self.directory,
                             type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                             steps[i + 1])
        continue
      if i:
        for damaged in steps[:i] if jax.process_index() == 0 else ():
          os.replace(self.directory / str(damaged), self.directory / f"damaged-{damaged}")
        self._manager.reload()
      return step, state, meta
    return None

  def wait(self) -> None:
    with self._writing():
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
