"""Training and evaluation of an adapted ViT on one task, in the style of flax's
imagenet example: pure step functions, and `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm.auto import tqdm

from mlae_jax.adapters.experts import drop_rate_variables
from mlae_jax.adapters.placement import tuned_paths
from mlae_jax.checkpoints.download import resolve_checkpoint
from mlae_jax.checkpoints.pretrained import init_params, load_pretrained
from mlae_jax.data.augment import train_augmentation
from mlae_jax.data.task_data import TaskData
from mlae_jax.export import export_adapters, export_merged
from mlae_jax.files import read_json, write_json
from mlae_jax.model.vit import VisionTransformer, create_model
from mlae_jax.partition import combine, count_params, split_trainable
from mlae_jax.training import config_checks, parallel
from mlae_jax.training import workdir as run_files
from mlae_jax.training.checkpointing import RunCheckpoints
from mlae_jax.training.errors import OutputWriteError, TrainingDiverged
from mlae_jax.training.metrics import MetricsLog, logged_evaluations
from mlae_jax.training.optimizer import optimizer_from_config
from mlae_jax.training.schedules import is_evaluation_epoch
from mlae_jax.training.steps import (StepConfig, TrainState, epoch_order, jit_eval_step,
                                    jit_train_step, stack_configs, unstack_configs)


def compute_dtype(name: str) -> Any:
  if name == 'auto':
    return jnp.bfloat16 if jax.default_backend() in ('gpu', 'tpu') else jnp.float32
  return jnp.dtype(name)


def create_model_from_config(config: ml_collections.ConfigDict,
                             num_classes: int) -> VisionTransformer:
  overrides = {field: config.model[field] for field in
               ('patch_size', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers')
               if config.model[field] is not None}
  return create_model(config.model.name, num_classes,
                      adapter=config_checks.adapter_config(config),
                      gelu_approximate=config.model.gelu_approximate,
                      drop_path_rate=float(config.model.drop_path_rate),
                      dtype=compute_dtype(config.model.dtype), **overrides)


def initial_params(config: ml_collections.ConfigDict, model: VisionTransformer,
                   key: jax.Array, image_size: int) -> dict:
  """The pre-trained backbone with fresh adapters and head (or all random)."""
  if not config.pretrained:
    return init_params(model, key, image_size)
  path = resolve_checkpoint(config.pretrained, cache_dir=config.cache_dir or None,
                            download=config.download)
  return load_pretrained(path, model, rng=key, image_size=image_size)


def create_train_state(trainable: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))


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
  config_checks.validate(config)
  method = config.mlae.method if config.mlae.method != 'none' else 'linear_probe'
  results = {method: train_and_evaluate(config, workdir, allow_changes)}
  for name in config.baselines:
    results[name] = train_and_evaluate(config_checks.baseline_config(config, name),
                                       os.path.join(workdir, 'baselines', name), allow_changes)
  return results


def train_on_task(config: ml_collections.ConfigDict, workdir: str,
                  data: TaskData) -> dict[str, Any]:
  """`train_and_evaluate` on task data that is already built."""
  return train_configs_on_task([config], [workdir], data)[0]


# The fields in which configurations trained at once may differ.
PER_CONFIG_FIELDS = ('mlae.drop_rate', 'mlae.coeff_init')


def check_trainable_at_once(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises unless the configs differ in PER_CONFIG_FIELDS alone (and can vary them)."""
  def rest(config):
    flat = json.loads(config.to_json_best_effort())
    for field in PER_CONFIG_FIELDS:
      group, name = field.split('.')
      flat[group].pop(name)
    return flat

  for index, config in enumerate(configs[1:], 1):
    if rest(config) != rest(configs[0]):
      raise ValueError(f'Configurations trained at once may differ only in '
                       f'{", ".join(PER_CONFIG_FIELDS)}; config {index} differs from config 0 '
                       'elsewhere. Train it separately.')
  if len(configs) > 1 and configs[0].mlae.method != 'mlae':
    raise ValueError('Only MLAE configurations (config.mlae.method = "mlae") train at once.')
  if (len({str(c.mlae.coeff_init) for c in configs}) > 1
      and not configs[0].mlae.adaptive_coeff):
    raise ValueError('Configurations with different mlae.coeff_init train at once only with '
                     'config.mlae.adaptive_coeff = True (a frozen coefficient is a constant '
                     'of the compiled model).')


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
  for config in configs:
    if not isinstance(config, ml_collections.ConfigDict):
      raise TypeError(f'A run config must be an ml_collections.ConfigDict (e.g. from '
                      f'mlae_jax.training.defaults.base_config()), got {type(config).__name__}.')
    config_checks.validate(config)
  check_trainable_at_once(configs)
  for path in workdirs:
    if not isinstance(path, (str, os.PathLike)):
      raise TypeError(f'A workdir must be a path, got {path!r}.')
  workdirs = [os.fspath(path) for path in workdirs]
  allow_changes = run_files.check_allowed(allow_changes)
  parallel.maybe_initialize_distributed()
  primary = jax.process_index() == 0  # The process that writes the workdir's files.
  with contextlib.ExitStack() as open_files:
    changes = []
    for config, path in zip(configs, workdirs):
      run_files.prepare(path)
      if primary:
        open_files.enter_context(run_files.locked(path))
      changes.append(run_files.check_config(path, config, allow_changes))
    if not any(changes) and all(run_files.results_complete(path) for path in workdirs):
      _report('Already finished: ' + ', '.join(workdirs) + '.')
      return [read_json(os.path.join(path, run_files.RESULTS_FILE)) for path in workdirs]
    data = get_data()
    if data.num_classes < 2:
      raise ValueError(f'Task {data.name!r} has {data.num_classes} class(es); a classifier '
                       'needs at least 2.')
    return _train(configs, workdirs, data, changes, primary, open_files)


def _train(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
           data: TaskData, changes: Sequence[Mapping[str, Any]], primary: bool,
           open_files: contextlib.ExitStack) -> list[dict[str, Any]]:
  """The training loop of `train_configs_on_task`, in claimed workdirs; `changes` are
  recorded once the run has resumed, and files opened here close with `open_files`."""
  config, count = configs[0], len(configs)
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ValueError(f'Bad config value config.{field} = {config[field]}: must be a multiple '
                       f'of the {devices} devices the batch is split over.')

  num_train = len(data.train_labels)
  steps_per_epoch = -(-num_train // config.batch_size)
  image_size = data.train_crop or data.train_images.shape[1]
  models = [create_model_from_config(c, data.num_classes) for c in configs]
  init_key, train_key, order_key = jax.random.split(jax.random.key(config.seed), 3)
  tuned = tuned_paths(models[0].adapter, models[0].num_layers)
  trainable, frozen = split_trainable(initial_params(config, models[0], init_key, image_size),
                                      tuned)
  # Same key, so the same A and head as separate runs; only the coefficients differ.
  trainables = [_with_coefficients(trainable, c.mlae.coeff_init) for c in configs]
  tx, schedule = optimizer_from_config(config, trainable, steps_per_epoch)
  states = [create_train_state(t, tx) for t in trainables]

  checkpoints = [open_files.enter_context(contextlib.closing(RunCheckpoints(
      os.path.join(w, run_files.CHECKPOINT_DIR), config.keep_checkpoints, primary)))
                 for w in workdirs]
  histories: list[dict[str, list]] = [{'train': [], 'eval': []} for _ in configs]
  restored = [c.restore_latest(s) for c, s in zip(checkpoints, states)]
  latest = [r[0] if r else 0 for r in restored]
  if len(set(latest)) > 1:
    raise ValueError(f'The workdirs were checkpointed after different epochs ({latest}); '
                     'resume them one at a time (or delete their checkpoints to restart).')
  start_epoch = latest[0]
  if start_epoch > config.epochs:
    raise ValueError(f'{checkpoints[0].directory} holds a checkpoint after epoch {start_epoch}, '
                     f'beyond config.epochs = {config.epochs}; a run cannot be shortened. Use '
                     'a new workdir.')
  if start_epoch:
    states, histories = [r[1] for r in restored], [r[2] for r in restored]
    for history, path in zip(histories, workdirs):  # Evaluations made after the checkpoint.
      kept = {r['epoch'] for r in history['eval']}
      history['eval'] = sorted(history['eval'] + [
          r for r in logged_evaluations(path, start_epoch) if r['epoch'] not in kept],
                               key=lambda r: r['epoch'])
    _report(f'Resuming from the checkpoint after epoch {start_epoch}.')
  if primary:
    for config_k, path, change in zip(configs, workdirs, changes):
      run_files.record_config(path, config_k, change)
  logs = [open_files.enter_context(contextlib.closing(MetricsLog(w))) for w in workdirs]
  for log, history in zip(logs, histories):
    # As written during training: an epoch's train record, then its evaluation.
    log.reset(sorted(history['train'] + history['eval'],
                     key=lambda r: (r['epoch'], r['kind'] != 'train')))

  replicated = parallel.replicated(mesh)
  state = states[0] if count == 1 else stack_configs(states)
  drop_rates = None if count == 1 else stack_configs([
      drop_rate_variables(m.layer_experts(), trainable) for m in models])
  state, frozen, drop_rates = jax.device_put((state, frozen, drop_rates), replicated)
  images, labels = jax.device_put((data.train_images, data.train_labels), replicated)
  cfg = StepConfig(models[0], tx, config.batch_size, tuple(data.mean), tuple(data.std),
                   train_augmentation(data) if data.train_crop else None,
                   parallel.batch_sharding(mesh))
  step_fn = jit_train_step(cfg, replicated, count)
  eval_fn = jit_eval_step(cfg, replicated, count)
  order_fn = jax.jit(functools.partial(epoch_order, num_examples=num_train,
                                       batch_size=config.batch_size), out_shardings=replicated)
  finite_fn = jax.jit(functools.partial(_finite_configs, count=count))
  step_args = () if count == 1 else (drop_rates,)

  def evaluate(epoch: int, step: int) -> None:
    """Evaluates after `epoch` (completed epochs) and records it in every workdir."""
    totals = None
    for batch in data.eval_batches(config.eval_batch_size):
      sums = eval_fn(state.trainable, frozen, parallel.global_batch(batch.images, mesh),
                     parallel.global_batch(batch.labels, mesh),
                     parallel.global_batch(batch.mask, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
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
      logs[k].write(result)
      _report(f'epoch {epoch}: eval accuracy {result["accuracy"]:.4f}'
              + (f' ({workdirs[k]})' if count > 1 else ''))

  def due(epoch: int) -> bool:
    return is_evaluation_epoch(epoch - 1, epochs=config.epochs, every=config.eval_every_epochs,
                               last=config.eval_last_epochs)

  if start_epoch and due(start_epoch) and not any(
      r['epoch'] == start_epoch for r in histories[0]['eval']):
    # Checkpoints are written before their epoch's evaluation: redo one that was cut off.
    _report(f'Evaluating after epoch {start_epoch} (its checkpoint was written before its '
            'evaluation).')
    evaluate(start_epoch, int(jnp.ravel(state.step)[0]))

  bar = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
             unit='step', disable=not config.progress_bar, desc=data.name)
  started = time.time()
  for epoch in range(start_epoch, config.epochs):
    epoch_start = time.time()
    order = order_fn(jax.random.fold_in(order_key, epoch))
    per_step = []
    for index in range(steps_per_epoch):
      state, metrics = step_fn(state, frozen, images, labels, order, np.int32(index), train_key,
                               *step_args)
      per_step.append(metrics)
      bar.update()
    # Fetched once per epoch: (steps,) or (steps, K) arrays, and whether each
    # configuration's trained parameters are all finite.
    per_step, finite = jax.device_get((jax.tree.map(lambda *m: jnp.stack(m), *per_step),
                                       finite_fn(state.trainable)))
    seconds = time.time() - epoch_start
    step = int(jnp.ravel(state.step)[0])
    _check_finite(per_step['loss_sum'], finite, epoch, steps_per_epoch, workdirs, checkpoints,
                  config)
    sums = jax.tree.map(lambda m: m.sum(0), per_step)
    for k, run_sums in enumerate(unstack_configs(sums, count)):
      record = {'kind': 'train', 'epoch': epoch + 1, 'step': step,
                'loss': float(run_sums['loss_sum'] / run_sums['count']),
                'accuracy': float(run_sums['correct'] / run_sums['count']),
                'learning_rate': float(schedule(step - 1)),
                'images_per_sec': num_train / seconds, 'seconds': seconds}
      histories[k]['train'].append(record)
      logs[k].write(record)
    bar.set_postfix(loss=f'{record["loss"]:.3f}', img_s=f'{count * num_train / seconds:.1f}')
    # The checkpoint comes first: an evaluation that fails loses no training.
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.epochs:
      for k, run_state in enumerate(unstack_configs(state, count)):
        checkpoints[k].save(epoch + 1, run_state, histories[k])
    if due(epoch + 1):
      evaluate(epoch + 1, step)
  bar.close()

  results = []
  final_frozen = jax.device_get(frozen)
  for k, run_state in enumerate(unstack_configs(jax.device_get(state), count)):
    final_params = combine(run_state.trainable, final_frozen)
    record = _results(configs[k], data, final_params, tuned, histories[k],
                      time.time() - started)
    record['configs_at_once'] = count
    record['config_changes'] = run_files.recorded_changes(workdirs[k])
    _export(configs[k], workdirs[k], models[k], final_params, data, image_size)
    _write_output(os.path.join(workdirs[k], run_files.RESULTS_FILE),
                  lambda path: write_json(path, record))
    results.append(record)
  return results


def _finite_configs(trainable: Any, count: int) -> jax.Array:
  """(K,) bools: whether every trained parameter of each configuration is finite (K = 1:
  leaves without a config axis, read as one row)."""
  return jnp.stack([jnp.isfinite(leaf).reshape(count, -1).all(1)
                    for leaf in jax.tree.leaves(trainable)]).all(0)


def _check_finite(losses: np.ndarray, finite: np.ndarray, epoch: int, steps_per_epoch: int,
                  workdirs: Sequence[str], checkpoints: Sequence[RunCheckpoints],
                  config: ml_collections.ConfigDict) -> None:
  """Raises TrainingDiverged, naming the epoch, the first bad step and the last good
  checkpoint, if a loss of this epoch or a trained parameter is not finite."""
  losses = losses.reshape(steps_per_epoch, -1)
  for k, path in enumerate(workdirs):
    bad_steps = np.flatnonzero(~np.isfinite(losses[:, k]))
    if not len(bad_steps) and finite[k]:
      continue
    if len(bad_steps):
      index = int(bad_steps[0])
      what = f'the loss became {float(losses[index, k])}'
    else:
      index = steps_per_epoch - 1
      what = 'a trained parameter became NaN or infinite'
    good = checkpoints[k].latest_epoch()
    where = (f'the last good checkpoint is {checkpoints[k].directory}/{good} (after epoch {good})'
             if good else 'no checkpoint was written before it')
    raise TrainingDiverged(
        f'Training in {path} diverged: {what} at epoch {epoch + 1}, step '
        f'{epoch * steps_per_epoch + index + 1}. Nothing of the diverged state was saved or '
        f'exported; {where}. Lower config.learning_rate (now {config.learning_rate:g}) or set '
        'config.grad_clip_norm, in a new workdir.')


def _write_output(path: str, write: Callable[[str], None]) -> None:
  """Writes one output file; a failure is an OutputWriteError naming it."""
  try:
    write(path)
  except OSError as error:
    raise OutputWriteError(
        f'Cannot write {path} ({error.strerror or error}). Free disk space or fix the folder, '
        'then re-run the same command: training is checkpointed and is not repeated.') from error


def _with_coefficients(trainable: dict, coeff_init: float) -> dict:
  """`trainable` with every MLAE coefficient vector reset to `coeff_init`."""
  flat = flatten_dict(trainable, sep='/')
  return unflatten_dict({path: jnp.full_like(leaf, coeff_init) if path.endswith('/coeff')
                         else leaf for path, leaf in flat.items()}, sep='/')


def _report(message: str) -> None:
  """A progress message on the console (beside the progress bar) and in the log."""
  tqdm.write(message, file=sys.stderr)
  logging.info(message)


def _results(config, data: TaskData, params: Any, tuned: frozenset[str],
             history: dict[str, list], seconds: float) -> dict[str, Any]:
  evaluations = history['eval']
  best = max(evaluations, key=lambda r: r['accuracy'])
  counts = count_params(params, tuned)
  train_speeds = [r['images_per_sec'] for r in history['train'][1:]] or [
      r['images_per_sec'] for r in history['train']]
  return {
      'task': data.name, 'model': config.model.name, 'method': config.mlae.method,
      'epochs': config.epochs, 'seed': config.seed, 'num_eval': data.num_eval,
      'final_epoch_accuracy': evaluations[-1]['accuracy'],
      'best_of_evaluations_accuracy': best['accuracy'],
      'best_of_evaluations_epoch': best['epoch'],
      'evaluated_epochs': [r['epoch'] for r in evaluations],
      # How the figures were obtained (config.json beside this file has every field).
      'recipe': {'schedule': config.schedule, 'weight_decay': config.weight_decay,
                 'weight_decay_rule': config.weight_decay_rule,
                 'drop_path_rate': config.model.drop_path_rate,
                 'train_bias': config.mlae.train_bias,
                 'evaluation': f'after 0-based epoch e with e % {config.eval_every_epochs} == 0 '
                               f'or e >= epochs - {config.eval_last_epochs}, and the last'},
      'adapter_params': counts['adapter'], 'tuned_backbone_params': counts['tuned'],
      'trainable_params': counts['trainable'],
      'train_images_per_sec_median': float(np.median(train_speeds)) if train_speeds else None,
      'wall_seconds_this_session': seconds,
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
  }


def _export(config, workdir: str, model: VisionTransformer, params: Any, data: TaskData,
            image_size: int) -> None:
  """Writes the exports into a partial folder, then puts it in place of export/: never a
  mix of two runs' files."""
  final = os.path.join(workdir, run_files.EXPORT_DIR)
  partial = final + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  extra = {'task': data.name, 'image_size': image_size, 'mean': list(data.mean),
           'std': list(data.std), 'pretrained': config.pretrained}
  if model.adapter is not None:
    _write_output(partial, lambda path: export_adapters(path, model, params, extra))
  if config.export_merged:
    _write_output(os.path.join(partial, 'merged.npz'),
                  lambda path: export_merged(path, model, params))
  if not os.path.isdir(partial):
    return
  shutil.rmtree(final, ignore_errors=True)
  os.replace(partial, final)
