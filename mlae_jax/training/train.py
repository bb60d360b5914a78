"""Training and evaluation of an adapted ViT on one task, in the style of flax's
imagenet example: pure step functions, and `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from mlae_jax.checkpoints.download import resolve_checkpoint
from mlae_jax.checkpoints.pretrained import init_params, load_pretrained
from mlae_jax.data.augment import train_augmentation
from mlae_jax.data.task_data import TaskData
from mlae_jax.export import export_adapters, export_merged
from mlae_jax.model.vit import VisionTransformer, create_model
from mlae_jax.partition import combine, count_params, split_trainable
from mlae_jax.training import config_checks, parallel
from mlae_jax.training.checkpointing import RunCheckpoints
from mlae_jax.training.metrics import MetricsLog
from mlae_jax.training.optimizer import make_optimizer
from mlae_jax.training.schedules import learning_rate_schedule
from mlae_jax.training.steps import StepConfig, TrainState, epoch_order, eval_step, train_step

RESULTS_FILE = 'results.json'


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains on `config.data`, evaluating, checkpointing and exporting into `workdir`;
  resumes from the latest checkpoint there. Returns the results record."""
  from mlae_jax.data.build import build_task_data

  config_checks.validate(config)
  return train_on_task(config, workdir, build_task_data(config.data))


def train_with_baselines(config: ml_collections.ConfigDict,
                         workdir: str) -> dict[str, dict[str, Any]]:
  """`train_and_evaluate`, then each of `config.baselines` on the same task in
  `<workdir>/baselines/<name>`; returns the results by name, the configured method first."""
  config_checks.validate(config)
  method = config.mlae.method if config.mlae.method != 'none' else 'linear_probe'
  results = {method: train_and_evaluate(config, workdir)}
  for name in config.baselines:
    results[name] = train_and_evaluate(config_checks.baseline_config(config, name),
                                       os.path.join(workdir, 'baselines', name))
  return results


def train_on_task(config: ml_collections.ConfigDict, workdir: str,
                  data: TaskData) -> dict[str, Any]:
  """`train_and_evaluate` on task data that is already built."""
  config_checks.validate(config)
  parallel.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ValueError(f'Bad config value config.{field} = {config[field]}: must be a multiple '
                       f'of the {devices} devices the batch is split over.')
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  num_train = len(data.train_labels)
  steps_per_epoch = -(-num_train // config.batch_size)
  image_size = data.train_crop or data.train_images.shape[1]
  model = create_model_from_config(config, data.num_classes)
  init_key, train_key, order_key = jax.random.split(jax.random.key(config.seed), 3)
  params = initial_params(config, model, init_key, image_size)
  trainable, frozen = split_trainable(params)
  schedule = learning_rate_schedule(
      config.schedule, base_lr=config.learning_rate, epochs=config.epochs,
      steps_per_epoch=steps_per_epoch, warmup_epochs=config.warmup_epochs,
      warmup_lr=config.warmup_lr, min_lr=config.min_lr)
  tx = make_optimizer(schedule, weight_decay=config.weight_decay,
                      grad_clip_norm=config.grad_clip_norm or None)
  state = create_train_state(trainable, tx)

  checkpoints = RunCheckpoints(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  history: dict[str, list] = {'train': [], 'eval': []}
  start_epoch = checkpoints.latest_epoch() or 0
  if start_epoch:
    state, history = checkpoints.restore(start_epoch, state)
    _report(f'Resuming from the checkpoint after epoch {start_epoch}.')
  log = MetricsLog(workdir)
  log.reset(sorted(history['train'] + history['eval'], key=lambda r: (r['epoch'], r['kind'])))

  replicated = parallel.replicated(mesh)
  state, frozen = jax.device_put((state, frozen), replicated)
  images, labels = jax.device_put((data.train_images, data.train_labels), replicated)
  cfg = StepConfig(model, tx, config.batch_size, tuple(data.mean), tuple(data.std),
                   train_augmentation(data) if data.train_crop else None)
  step_fn = jax.jit(functools.partial(train_step, cfg=cfg), donate_argnums=0,
                    out_shardings=(replicated, replicated))
  eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg), out_shardings=replicated)
  order_fn = jax.jit(functools.partial(epoch_order, num_examples=num_train,
                                       batch_size=config.batch_size), out_shardings=replicated)

  def evaluate() -> dict[str, float]:
    totals = None
    for batch in data.eval_batches(config.eval_batch_size):
      sums = eval_fn(state.trainable, frozen, parallel.global_batch(batch.images, mesh),
                     parallel.global_batch(batch.labels, mesh),
                     parallel.global_batch(batch.mask, mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    if int(totals['count']) != data.num_eval:
      raise RuntimeError(f'Evaluated {int(totals["count"])} examples, expected {data.num_eval}.')
    return {'accuracy': float(totals['correct'] / totals['count']),
            'loss': float(totals['loss_sum'] / totals['count'])}

  bar = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
             unit='step', disable=not config.progress_bar, desc=data.name)
  started = time.time()
  for epoch in range(start_epoch, config.epochs):
    epoch_start = time.time()
    order = order_fn(jax.random.fold_in(order_key, epoch))
    sums = []
    for index in range(steps_per_epoch):
      state, metrics = step_fn(state, frozen, images, labels, order, np.int32(index), train_key)
      sums.append(metrics)
      bar.update()
    sums = jax.device_get(jax.tree.map(lambda *m: jnp.sum(jnp.stack(m)), *sums))
    seconds = time.time() - epoch_start
    record = {'kind': 'train', 'epoch': epoch + 1, 'step': int(state.step),
              'loss': float(sums['loss_sum'] / sums['count']),
              'accuracy': float(sums['correct'] / sums['count']),
              'learning_rate': float(schedule(int(state.step) - 1)),
              'images_per_sec': num_train / seconds, 'seconds': seconds}
    history['train'].append(record)
    log.write(record)
    bar.set_postfix(loss=f'{record["loss"]:.3f}', img_s=f'{record["images_per_sec"]:.1f}')
    last = epoch + 1 == config.epochs
    if (epoch + 1) % config.eval_every_epochs == 0 or last:
      result = {'kind': 'eval', 'epoch': epoch + 1, 'step': int(state.step), **evaluate()}
      history['eval'].append(result)
      log.write(result)
      _report(f'epoch {epoch + 1}: eval accuracy {result["accuracy"]:.4f}')
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or last:
      checkpoints.save(epoch + 1, state, history)
  bar.close()
  checkpoints.close()
  log.close()

  final_params = combine(jax.device_get(state.trainable), jax.device_get(frozen))
  results = _results(config, data, model, final_params, history, time.time() - started)
  _export(config, workdir, model, final_params, data, image_size)
  with open(os.path.join(workdir, RESULTS_FILE), 'w') as f:
    json.dump(results, f, indent=2)
  return results


def _report(message: str) -> None:
  """A progress message on the console (beside the progress bar) and in the log."""
  tqdm.write(message, file=sys.stderr)
  logging.info(message)


def _results(config, data: TaskData, model: VisionTransformer, params: Any,
             history: dict[str, list], seconds: float) -> dict[str, Any]:
  evaluations = history['eval']
  best = max(evaluations, key=lambda r: r['accuracy'])
  counts = count_params(params)
  train_speeds = [r['images_per_sec'] for r in history['train'][1:]] or [
      r['images_per_sec'] for r in history['train']]
  return {
      'task': data.name, 'model': config.model.name, 'method': config.mlae.method,
      'epochs': config.epochs, 'seed': config.seed, 'num_eval': data.num_eval,
      'final_epoch_accuracy': evaluations[-1]['accuracy'],
      'best_of_evaluations_accuracy': best['accuracy'],
      'best_of_evaluations_epoch': best['epoch'],
      'evaluated_epochs': [r['epoch'] for r in evaluations],
      'adapter_params': counts['adapter'], 'trainable_params': counts['trainable'],
      'train_images_per_sec_median': float(np.median(train_speeds)) if train_speeds else None,
      'wall_seconds_this_session': seconds,
      'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
  }


def _export(config, workdir: str, model: VisionTransformer, params: Any, data: TaskData,
            image_size: int) -> None:
  directory = os.path.join(workdir, 'export')
  extra = {'task': data.name, 'image_size': image_size, 'mean': list(data.mean),
           'std': list(data.std), 'pretrained': config.pretrained}
  if model.adapter is not None:
    export_adapters(directory, model, params, extra)
  if config.export_merged:
    export_merged(os.path.join(directory, 'merged.npz'), model, params)
