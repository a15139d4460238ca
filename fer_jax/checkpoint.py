"""Orbax checkpoints of a phase: the train state plus JSON metadata.

Orbax writes each step into a temporary directory and renames it only after
every file is committed, so a save that is interrupted half-way is never
listed as a step and the last complete checkpoint is what resumes.
"""
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging


def quiet_logs() -> None:
  """Drops Orbax's INFO lines (a dozen per save) that would drown the progress bars."""
  absl_logging.get_absl_logger().addFilter(
      lambda record: record.levelno > logging.INFO or "/orbax/" not in record.pathname)


class Checkpoints:
  """A directory of numbered checkpoints ``{'state': pytree, 'meta': json}``."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def discard_after(self, step: int) -> None:
    """Deletes checkpoints newer than ``step`` (written by a run that did not finish)."""
    for newer in [s for s in self._manager.all_steps() if s > step]:
      self._manager.delete(newer)

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the structure, shapes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
