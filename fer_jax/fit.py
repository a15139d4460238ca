"""A phase's training loop: checkpoints, best-so-far selection and the NaN stop.

``fit`` steps the phase's program (``fer_jax.phase``) from its latest
checkpoint, or from the initial state, to the last step. Every
``checkpoint_every_steps`` (default: every evaluation) it saves the whole
train state; every ``eval_every_epochs`` it scores the parameters on the
validation split and keeps the best ones in ``best/``. A step whose loss or
gradient is not finite stops the run with each loss term's value and the last
good checkpoint; the step itself was not applied.
"""
import dataclasses
import itertools
import json
import pathlib
import time
from typing import Callable

import jax
import tqdm
from absl import logging

from fer_jax import checkpoint as checkpoint_lib
from fer_jax import phase as phase_lib
from fer_jax import steps


class MetricWriter:
  """Appends JSON lines to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.enabled = jax.process_index() == 0

  def write(self, **record):
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


@dataclasses.dataclass(frozen=True)
class FitResult:
  variables: dict
  best_step: int
  train_seconds: float


@dataclasses.dataclass
class _Progress:
  """What the loop carries between steps besides the train state.

  ``seconds_before`` is the training time of the runs this one resumes, as their last
  checkpoint recorded it, so an interrupted run reports the time of its whole training.
  """
  best: dict
  last_good: int | None
  seconds_before: float = 0.0
  started: float = dataclasses.field(default_factory=time.time)
  pending: tuple | None = None

  def train_seconds(self) -> float:
    return self.seconds_before + time.time() - self.started


def check_finite(name: str, step: int, metrics: dict, last_good: int | None, directory):
  if metrics["finite"]:
    return
  terms = ", ".join(f"{k[5:]}={float(v):.4g}" for k, v in metrics.items()
                    if k.startswith("loss/"))
  where = (f"the last good checkpoint is step {last_good} in {directory}"
           if last_good else "no checkpoint was written yet")
  raise FloatingPointError(
      f"{name}: non-finite loss or gradient at step {step + 1}: "
      f"loss={float(metrics['loss']):.4g} ({terms}); the update was not applied and "
      f"{where}. Lower the learning rate or a term's weight, or add optimizer.clip_norm.")


class _Loop:
  """The state of one ``fit`` call: its checkpoints, bar and writer."""

  def __init__(self, program: phase_lib.PhaseProgram, workdir: pathlib.Path,
               writer: MetricWriter):
    self.program, self.writer = program, writer
    self.ckpts = checkpoint_lib.Checkpoints(workdir / "checkpoints")
    self.best_ckpts = checkpoint_lib.Checkpoints(workdir / "best", max_to_keep=1)
    steps_per_epoch = program.steps_per_epoch
    self.eval_every = max(1, int(program.cfg.eval_every_epochs * steps_per_epoch))
    self.ckpt_every = program.cfg.checkpoint_every_steps or self.eval_every

  def resume(self, state):
    restored = self.ckpts.restore_latest(state)
    latest, meta = None, {"best": {"score": -1.0, "step": 0}}
    if restored is not None:
      latest, state, meta = restored
      logging.info("%s: resumed at step %d from %s", self.program.name, latest,
                   self.ckpts.directory)
    self.best_ckpts.discard_after(latest or 0)
    # Checkpoints written before the time was recorded resume from 0 seconds.
    return state, _Progress(best=meta["best"], last_good=latest,
                            seconds_before=meta.get("train_seconds", 0.0))

  def flush(self, progress: _Progress, bar):
    """Checks and logs the previous step's metrics (read one step late, so the
    host does not wait for the device every step)."""
    if progress.pending is None:
      return
    step, metrics = progress.pending
    progress.pending = None
    metrics = jax.device_get(metrics)
    check_finite(self.program.name, step, metrics, progress.last_good, self.ckpts.directory)
    bar.update(1)
    if (step + 1) % self.program.cfg.log_every_steps == 0:
      shown = {"loss": f"{metrics['loss']:.3f}"}
      if "accuracy" in metrics:
        shown["acc"] = f"{metrics['accuracy']:.3f}"
      bar.set_postfix(shown)
      self.writer.write(phase=self.program.name, step=step + 1,
                        **{k: float(v) for k, v in metrics.items()})

  def after_step(self, done: int, state, progress: _Progress, bar, validate):
    evaluate_now = done % self.eval_every == 0 or done == self.program.total_steps
    save_now = done % self.ckpt_every == 0 or done == self.program.total_steps
    if not (evaluate_now or save_now):
      return
    # Never select or save parameters before their step is known to be finite.
    self.flush(progress, bar)
    if evaluate_now and validate is not None:
      variables = phase_lib.variables_of(state)
      score = validate(variables, done)
      if score > progress.best["score"]:
        progress.best = {"score": score, "step": done}
        self.best_ckpts.save(done, variables, {"best": progress.best})
    if save_now:
      self.ckpts.save(done, state, {"best": progress.best, "phase": self.program.name,
                                    "train_seconds": progress.train_seconds()})
      progress.last_good = done

  def final_variables(self, state, validate) -> dict:
    final = phase_lib.variables_of(state)
    if validate is not None and self.best_ckpts.latest_step() is not None:
      final, _ = self.best_ckpts.restore(self.best_ckpts.latest_step(), final)
    return final

  def wait_and_close(self, close: bool):
    self.ckpts.wait()
    self.best_ckpts.wait()
    if close:
      self.ckpts.close()
      self.best_ckpts.close()


def fit(program: phase_lib.PhaseProgram, spec: steps.StepSpec, state, train_data,
        teacher_vars, workdir: pathlib.Path, writer: MetricWriter,
        validate: Callable[[dict, int], float] | None) -> FitResult:
  """Trains ``state`` to ``program.total_steps``; returns the selected variables.

  ``train_data`` is the device-resident training set, or a ``streaming.TrainStream``
  when ``spec.device_resident`` is False. ``validate(variables, step)`` scores
  parameters for best-so-far selection (None: the last parameters are the result).
  """
  loop = _Loop(program, workdir, writer)
  state, progress = loop.resume(state)
  step_fn = steps.make_train_step(spec)
  weights = jax.device_put(program.weights, steps.replicated(spec.mesh))
  start = int(state["step"])
  bar = tqdm.tqdm(total=program.total_steps, initial=start, desc=program.name, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  # Device-resident data is the same input every step (the step draws its batch);
  # a stream gives each step its batch, from where the run resumes.
  feed = (itertools.repeat(train_data) if spec.device_resident else
          train_data.from_step(start))
  try:
    for step, data in zip(range(start, program.total_steps), feed):
      state, metrics = step_fn(state, weights, teacher_vars, data)
      loop.flush(progress, bar)
      progress.pending = (step, metrics)
      loop.after_step(step + 1, state, progress, bar, validate)
    loop.flush(progress, bar)
  finally:
    # On an interruption (Ctrl-C, preemption, a non-finite loss) the saves in
    # flight still commit, so a restart resumes from the newest checkpoint.
    bar.close()
    loop.wait_and_close(close=False)
  train_seconds = progress.train_seconds()
  final = loop.final_variables(state, validate)
  loop.wait_and_close(close=True)
  return FitResult(variables=final, best_step=progress.best["step"],
                   train_seconds=train_seconds)
