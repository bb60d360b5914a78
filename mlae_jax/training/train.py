"""Training and evaluation of an adapted ViT on one task, in the style of flax's
imagenet example: pure step functions, and `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mlae_jax.data.task_data import TaskData
from mlae_jax.files import read_json
from mlae_jax.partition import combine, count_params
from mlae_jax.training import config_checks, parallel
from mlae_jax.training import workdir as run_files
from mlae_jax.training.errors import TrainingDiverged
from mlae_jax.training.metrics import logged_evaluations
from mlae_jax.training.phases import batch_gradients, loss_gradients, run_phases
from mlae_jax.training.precision import ComputeDtype
from mlae_jax.training.recorder import RunRecorder
from mlae_jax.training.run_setup import build_run, global_eval_batch
from mlae_jax.training.schedules import is_evaluation_epoch
from mlae_jax.training.steps import unstack_configs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Trains on `config.data`, evaluating, checkpointing and exporting into `workdir`;
  resumes from the newest intact checkpoint there. A workdir holding a run of another
  config is refused (fields in `allow_changes`, e.g. 'epochs', may change on resume,
  and are recorded). Returns the results record."""
  return train_and_evaluate_at_once([config], [workdir], allow_changes)[0]


def train_and_evaluate_at_once(configs: Sequence[ml_collections.ConfigDict],
                               workdirs: Sequence[str],
                               allow_changes: Sequence[str] = ()) -> list[dict[str, Any]]:
  """`train_and_evaluate` of K configurations (of one task, differing only in
  PER_CONFIG_FIELDS) in one vmapped step, sharing the task's data; see
  `train_configs_on_task`."""
  from mlae_jax.data.build import build_task_data

  return _train_in_workdirs(configs, workdirs, lambda: build_task_data(configs[0].data),
                            allow_changes)


def train_with_baselines(config: ml_collections.ConfigDict, workdir: str,
                         allow_changes: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
  """`train_and_evaluate`, then each of `config.baselines` on the same task in
  `<workdir>/baselines/<name>`; returns the results by name, the configured method first."""
  config_checks.resolve(config)
  results = {config.adapter.method: train_and_evaluate(config, workdir, allow_changes)}
  for name in config.baselines:
    results[name] = train_and_evaluate(config_checks.baseline_config(config, name),
                                       os.path.join(workdir, 'baselines', name), allow_changes)
  return results


def train_on_task(config: ml_collections.ConfigDict, workdir: str,
                  data: TaskData) -> dict[str, Any]:
  """`train_and_evaluate` on task data that is already built."""
  return train_configs_on_task([config], [workdir], data)[0]


# The fields in which configurations trained at once may differ.
PER_CONFIG_FIELDS = ('adapter.mlae.drop_rate', 'adapter.mlae.coeff_init')


def check_trainable_at_once(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises unless the configs differ in PER_CONFIG_FIELDS alone (and can vary them)."""
  def rest(config):
    flat = json.loads(config.to_json_best_effort())
    for field in PER_CONFIG_FIELDS:
      *groups, name = field.split('.')
      inner = flat
      for group in groups:
        inner = inner[group]
      inner.pop(name)
    return flat

  for index, config in enumerate(configs[1:], 1):
    if rest(config) != rest(configs[0]):
      raise ValueError(f'Configurations trained at once may differ only in '
                       f'{", ".join(PER_CONFIG_FIELDS)}; config {index} differs from config 0 '
                       'elsewhere. Train it separately.')
  if len(configs) > 1 and configs[0].adapter.method != 'mlae':
    raise ValueError('Only MLAE configurations (config.adapter.method = "mlae") train at '
                     'once.')
  if (len({str(c.adapter.mlae.coeff_init) for c in configs}) > 1
      and not configs[0].adapter.mlae.adaptive_coeff):
    raise ValueError('Configurations with different adapter.mlae.coeff_init train at once '
                     'only with config.adapter.mlae.adaptive_coeff = True (a frozen '
                     'coefficient is a constant of the compiled model).')


def train_configs_on_task(configs: Sequence[ml_collections.ConfigDict],
                          workdirs: Sequence[str], data: TaskData,
                          allow_changes: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Trains K configurations of one task at once, each into its own workdir.

  The K configurations may differ only in their MLAE drop rates and coefficient
  initialisations (a grid search's points): one compiled step, vmapped over their
  adapters, heads and optimizer states, trains them all on the same batches and
  masks' key, sharing the backbone, the input pipeline and the computation up to
  the first adapter. Each workdir ends up as a run of that config alone would
  leave it (checkpoints, metrics, results, exports), and training is the same as
  that run's up to floating-point reassociation. K = 1 is plain training.
  """
  return _train_in_workdirs(configs, workdirs, lambda: data, allow_changes)


def _train_in_workdirs(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                       get_data: Callable[[], TaskData],
                       allow_changes: Sequence[str]) -> list[dict[str, Any]]:
  """Checks the configs and claims the workdirs (lock, config check, config.json)
  before anything is built; finished runs return their results unchanged."""
  if len(configs) != len(workdirs) or not configs:
    raise ValueError(f'Need one workdir per config; got {len(configs)} configs and '
                     f'{len(workdirs)} workdirs.')
  configs = [config_checks.resolve(config) for config in configs]
  check_trainable_at_once(configs)
  for path in workdirs:
    if not isinstance(path, (str, os.PathLike)):
      raise TypeError(f'A workdir must be a path, got {path!r}.')
  workdirs = [os.fspath(path) for path in workdirs]
  allow_changes = run_files.check_allowed(allow_changes)
  parallel.maybe_initialize_distributed()
  with contextlib.ExitStack() as open_files:

    def claim() -> dict[str, Any]:
      """Locks and checks the workdirs (the primary process's work): the allowed config
      changes, and the results if every run has finished."""
      changes = []
      for config, path in zip(configs, workdirs):
        run_files.prepare(path)
        open_files.enter_context(run_files.locked(path))
        changes.append(run_files.check_config(path, config, allow_changes))
      finished = not any(changes) and all(run_files.results_complete(p) for p in workdirs)
      return {'changes': changes, 'results': [
          read_json(os.path.join(p, run_files.RESULTS_FILE)) for p in workdirs]
              if finished else None}

    claimed = parallel.on_primary(claim)
    if claimed['results'] is not None:
      _report('Already finished: ' + ', '.join(workdirs) + '.')
      return claimed['results']
    data = parallel.on_every(get_data)  # Each host reads its own copy of the data.
    if data.num_classes < 2:
      raise ValueError(f'Task {data.name!r} has {data.num_classes} class(es); a classifier '
                       'needs at least 2.')
    return _train(configs, workdirs, data, claimed['changes'], open_files)


def _train(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
           data: TaskData, changes: Sequence[Mapping[str, Any]],
           open_files: contextlib.ExitStack) -> list[dict[str, Any]]:
  """The training loop of `train_configs_on_task`, in claimed workdirs; `changes` are
  recorded once the run has resumed, and files opened here close with `open_files`.
  Every process of the job runs it; process 0 alone reads and writes the workdirs, in
  the steps run through `parallel.on_primary` (see RunRecorder)."""
  config, count = configs[0], len(configs)
  run = parallel.on_every(lambda: build_run(configs, data))
  states, mesh = run.states, run.mesh
  primary = jax.process_index() == 0
  recorders = [open_files.enter_context(contextlib.closing(RunRecorder(
      w, config.keep_checkpoints))) for w in workdirs]
  restored_states = []

  def restore() -> dict[str, Any]:
    """The epoch to resume after and the histories (the primary process's work)."""
    restored = [r.restore_latest(s) for r, s in zip(recorders, states)]
    latest = [r[0] if r else 0 for r in restored]
    if len(set(latest)) > 1:
      raise ValueError(f'The workdirs were checkpointed after different epochs ({latest}); '
                       'resume them one at a time (or delete their checkpoints to restart).')
    if latest[0] > config.epochs:
      raise ValueError(f'{recorders[0].checkpoint_dir} holds a checkpoint after epoch '
                       f'{latest[0]}, beyond config.epochs = {config.epochs}; a run cannot be '
                       'shortened. Use a new workdir.')
    if not latest[0]:
      return {'epoch': 0, 'histories': [{'train': [], 'eval': []} for _ in configs]}
    restored_states.extend(r[1] for r in restored)
    histories = [r[2] for r in restored]
    for history, path in zip(histories, workdirs):  # Evaluations made after the checkpoint.
      kept = {r['epoch'] for r in history['eval']}
      history['eval'] = sorted(history['eval'] + [
          r for r in logged_evaluations(path, latest[0]) if r['epoch'] not in kept],
                               key=lambda r: r['epoch'])
    return {'epoch': latest[0], 'histories': histories}

  resumed = parallel.on_primary(restore)
  start_epoch, histories = resumed['epoch'], resumed['histories']
  if start_epoch:
    states = parallel.from_primary(restored_states if primary else states)
    _report(f'Resuming from the checkpoint after epoch {start_epoch}.')

  def begin() -> None:
    for recorder, config_k, change, history in zip(recorders, configs, changes, histories):
      # As written during training: an epoch's train record, then its evaluation.
      recorder.begin(config_k, change, sorted(history['train'] + history['eval'],
                                              key=lambda r: (r['epoch'], r['kind'] != 'train')))

  parallel.on_primary(begin)
  last_saved = start_epoch
  state, frozen, images, labels, drop_rates = run.on_devices(states, data)
  run.frozen = states = restored_states = None  # Only the copies on the devices from here on.

  def write(records: Sequence[dict[str, Any]], run_states: Sequence[Any] = (),
            epoch: int = 0) -> None:
    """Logs one record per workdir and checkpoints `run_states` (if given) after `epoch`,
    on process 0; a failure there ends every process."""
    def write_there() -> None:
      for recorder, record in zip(recorders, records):
        recorder.log(record)
      for recorder, run_state, history in zip(recorders, run_states, histories):
        recorder.save(epoch, run_state, history)

    parallel.on_primary(write_there)

  def evaluate(epoch: int, step: int) -> None:
    """Evaluates after `epoch` (completed epochs) and records it in every workdir."""
    totals = None
    for batch in data.eval_batches(config.eval_batch_size):
      sums = run.eval_fn(state.trainable, frozen, *global_eval_batch(batch, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    results = []
    for k, t in enumerate(unstack_configs(jax.device_get(totals), count)):
      if int(t['count']) != data.num_eval:
        raise RuntimeError(f'Evaluated {int(t["count"])} examples, expected {data.num_eval}.')
      if not np.isfinite(t['loss_sum']):
        raise TrainingDiverged(
            f'The evaluation of {workdirs[k]} after epoch {epoch} gave a loss of '
            f'{float(t["loss_sum"] / t["count"])}: the trained parameters are finite but the '
            'logits overflow. No results were written; lower config.learning_rate, in a new '
            'workdir.')
      result = {'kind': 'eval', 'epoch': epoch, 'step': step,
                'accuracy': float(t['correct'] / t['count']),
                'loss': float(t['loss_sum'] / t['count'])}
      histories[k]['eval'].append(result)
      results.append(result)
      _report(f'epoch {epoch}: eval accuracy {result["accuracy"]:.4f}'
              + (f' ({workdirs[k]})' if count > 1 else ''))
    write(results)

  def due(epoch: int) -> bool:
    return is_evaluation_epoch(epoch - 1, epochs=config.epochs, every=config.eval_every_epochs,
                               last=config.eval_last_epochs)

  if start_epoch and due(start_epoch) and not any(
      r['epoch'] == start_epoch for r in histories[0]['eval']):
    # Checkpoints are written before their epoch's evaluation: redo one that was cut off.
    _report(f'Evaluating after epoch {start_epoch} (its checkpoint was written before its '
            'evaluation).')
    evaluate(start_epoch, int(state.step[0]))

  method = run.models[0].adapter
  phased = bool(method and method.phase_epochs(config.epochs))
  gradients_of = batch_gradients(
      loss_gradients(run.models[0], data.mean, data.std), images, labels, run.order_key,
      config.batch_size, run.image_size) if phased else None
  host_frozen = jax.device_get(frozen) if phased else None
  bar = tqdm(total=config.epochs * run.steps_per_epoch,
             initial=start_epoch * run.steps_per_epoch, unit='step',
             disable=not (config.progress_bar and primary), desc=data.name)
  started = time.time()
  for epoch in range(start_epoch, config.epochs):
    epoch_start = time.time()
    order = run.order_fn(jax.random.fold_in(run.order_key, epoch))
    per_step = []
    for index in range(run.steps_per_epoch):
      state, metrics = run.step_fn(state, frozen, images, labels, order, np.int32(index),
                                   run.train_key, drop_rates)
      per_step.append(metrics)
      bar.update()
    # Fetched once per epoch: (steps, K) arrays, and whether each configuration's
    # trained parameters are all finite.
    per_step, finite = jax.device_get((jax.tree.map(lambda *m: jnp.stack(m), *per_step),
                                       run.finite_fn(state.trainable)))
    seconds = time.time() - epoch_start
    step = int(state.step[0])
    _check_finite(per_step['loss_sum'], finite, epoch, run.steps_per_epoch, recorders,
                  last_saved, config)
    if phased:  # Before the checkpoint, which then holds its result.
      state = run_phases(method, epoch + 1, config.epochs, state, host_frozen, count,
                         run.tuned, gradients_of, parallel.replicated(mesh))
    sums = jax.tree.map(lambda m: m.sum(0), per_step)
    records = []
    for k, run_sums in enumerate(unstack_configs(sums, count)):
      record = {'kind': 'train', 'epoch': epoch + 1, 'step': step,
                'loss': float(run_sums['loss_sum'] / run_sums['count']),
                'accuracy': float(run_sums['correct'] / run_sums['count']),
                'learning_rate': float(run.schedule(step - 1)),
                'images_per_sec': run.num_train / seconds, 'seconds': seconds}
      histories[k]['train'].append(record)
      records.append(record)
    bar.set_postfix(loss=f'{record["loss"]:.3f}', img_s=f'{count * run.num_train / seconds:.1f}')
    # The checkpoint comes first: an evaluation that fails loses no training.
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.epochs:
      write(records, unstack_configs(state, count), epoch + 1)  # Sliced on every process.
      last_saved = epoch + 1
    else:
      write(records)
    if due(epoch + 1):
      evaluate(epoch + 1, step)
  bar.close()

  results, final_params = [], []
  final_frozen = jax.device_get(frozen)
  for k, run_state in enumerate(unstack_configs(jax.device_get(state), count)):
    final_params.append(combine(run_state.trainable, final_frozen))
    record = _results(configs[k], data, final_params[k], run.tuned, histories[k],
                      time.time() - started, run.precision)
    record['configs_at_once'] = count
    results.append(record)
  recorded = parallel.on_primary(lambda: [
      r.finish(c, record, model, params, data, run.image_size) for r, c, record, model, params
      in zip(recorders, configs, results, run.models, final_params)])
  for record, changes_k in zip(results, recorded):  # Also where process 0 did not write.
    record['config_changes'] = changes_k
  return results


def _check_finite(losses: np.ndarray, finite: np.ndarray, epoch: int, steps_per_epoch: int,
                  recorders: Sequence[RunRecorder], good: int,
                  config: ml_collections.ConfigDict) -> None:
  """Raises TrainingDiverged, naming the epoch, the first bad step and the last good
  checkpoint (after epoch `good`; 0: none), if a loss of this epoch or a trained parameter
  is not finite. Every process reaches the same verdict from the same global values."""
  losses = losses.reshape(steps_per_epoch, -1)
  for k, recorder in enumerate(recorders):
    bad_steps = np.flatnonzero(~np.isfinite(losses[:, k]))
    if not len(bad_steps) and finite[k]:
      continue
    if len(bad_steps):
      index = int(bad_steps[0])
      what = f'the loss became {float(losses[index, k])}'
    else:
      index = steps_per_epoch - 1
      what = 'a trained parameter became NaN or infinite'
    where = (f'the last good checkpoint is {recorder.checkpoint_dir}/{good} (after epoch {good})'
             if good else 'no checkpoint was written before it')
    raise TrainingDiverged(
        f'Training in {recorder.workdir} diverged: {what} at epoch {epoch + 1}, step '
        f'{epoch * steps_per_epoch + index + 1}. Nothing of the diverged state was saved or '
        f'exported; {where}. Lower config.learning_rate (now {config.learning_rate:g}) or set '
        'config.grad_clip_norm, in a new workdir.')


def _report(message: str) -> None:
  """A progress message on the console (beside the progress bar) and in the log."""
  tqdm.write(message, file=sys.stderr)
  logging.info(message)


def _results(config, data: TaskData, params: Any, tuned: tuple[str, ...],
             history: dict[str, list], seconds: float,
             precision: ComputeDtype) -> dict[str, Any]:
  evaluations = history['eval']
  best = max(evaluations, key=lambda r: r['accuracy'])
  counts = count_params(params, tuned)
  train_speeds = [r['images_per_sec'] for r in history['train'][1:]] or [
      r['images_per_sec'] for r in history['train']]
  return {
      'task': data.name, 'model': config.model.name, 'method': config.adapter.method,
      'epochs': config.epochs, 'seed': config.seed, 'num_eval': data.num_eval,
      'final_epoch_accuracy': evaluations[-1]['accuracy'],
      'best_of_evaluations_accuracy': best['accuracy'],
      'best_of_evaluations_epoch': best['epoch'],
      'evaluated_epochs': [r['epoch'] for r in evaluations],
      # How the figures were obtained (config.json beside this file has every field).
      'recipe': {'learning_rate': config.learning_rate, 'schedule': config.schedule,
                 'weight_decay': config.weight_decay,
                 'weight_decay_rule': config.weight_decay_rule,
                 'drop_path_rate': config.model.drop_path_rate,
                 'trained_in_place': list(tuned),
                 'evaluation': f'after 0-based epoch e with e % {config.eval_every_epochs} == 0 '
                               f'or e >= epochs - {config.eval_last_epochs}, and the last'},
      'adapter_params': counts['adapter'], 'tuned_backbone_params': counts['tuned'],
      'trainable_params': counts['trainable'],
      'train_images_per_sec_median': float(np.median(train_speeds)) if train_speeds else None,
      'wall_seconds_this_session': seconds,
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'processes': jax.process_count(),
      'compute_dtype': precision.record(),
  }

