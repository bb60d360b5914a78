"""How long a run will take on this machine, measured before it starts: the run's own
compiled train and eval steps (built exactly as training builds them) timed here, times
its numbers of steps and evaluation batches, plus their compilation. Checkpoints,
exports and the host loop are not counted."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from mlae_jax.data.task_data import TaskData
from mlae_jax.training import config_checks
from mlae_jax.training.run_setup import build_run, global_eval_batch
from mlae_jax.training.schedules import evaluation_count


@dataclasses.dataclass(frozen=True)
class RunEstimate:
  """Seconds a run of `epochs` epochs takes here, and what they are made of."""
  epochs: int
  device: str
  train_step_seconds: float
  train_steps: int
  eval_batch_seconds: float
  eval_batches: int
  compile_seconds: float

  @property
  def seconds(self) -> float:
    return (self.compile_seconds + self.train_steps * self.train_step_seconds
            + self.eval_batches * self.eval_batch_seconds)

  def describe(self) -> str:
    total = self.seconds
    shown = f'{total / 60:.0f} minutes' if total >= 90 else f'{total:.0f} seconds'
    return (f'about {shown} for {self.epochs} epochs on {self.device} '
            f'({self.train_step_seconds:.3f} s x {self.train_steps:,} training steps, '
            f'{self.eval_batch_seconds:.3f} s x {self.eval_batches:,} evaluation batches, '
            f'{self.compile_seconds:.0f} s compiling)')


def _first_and_median(call: Callable[[], None], repeats: int) -> tuple[float, float]:
  """Seconds of the first call (compilation included) and the median of `repeats` more."""
  seconds = []
  for _ in range(1 + repeats):
    start = time.perf_counter()
    call()
    seconds.append(time.perf_counter() - start)
  return seconds[0], float(np.median(seconds[1:]))


def estimate_training(config: ml_collections.ConfigDict, data: TaskData,
                      repeats: int = 3) -> RunEstimate:
  """Times `config`'s train step (batch config.batch_size) and eval step (a batch of
  config.eval_batch_size, its copy to the devices included) on `data`, and scales them to
  the whole run: config.epochs epochs and the evaluations SPT's schedule makes."""
  config = config_checks.resolve(config)
  run = build_run([config], data)
  state, frozen, images, labels, drop_rates = run.on_devices(run.states, data)
  order = run.order_fn(jax.random.fold_in(run.order_key, 0))
  batch = next(iter(data.eval_batches(config.eval_batch_size)))

  def train() -> None:
    nonlocal state
    state, metrics = run.step_fn(state, frozen, images, labels, order, np.int32(0),
                                 run.train_key, drop_rates)
    jax.block_until_ready(metrics)

  def evaluate() -> None:
    jax.block_until_ready(run.eval_fn(state.trainable, frozen,
                                      *global_eval_batch(batch, run.mesh)))

  train_first, train_seconds = _first_and_median(train, repeats)
  eval_first, eval_seconds = _first_and_median(evaluate, repeats)
  evaluations = evaluation_count(epochs=config.epochs, every=config.eval_every_epochs,
                                 last=config.eval_last_epochs)
  return RunEstimate(
      epochs=config.epochs, device=f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      train_step_seconds=train_seconds, train_steps=config.epochs * run.steps_per_epoch,
      eval_batch_seconds=eval_seconds,
      eval_batches=evaluations * -(-data.num_eval // config.eval_batch_size),
      compile_seconds=max(0.0, train_first - train_seconds) + max(0.0, eval_first - eval_seconds))
