"""Small models and helpers shared by the tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.checkpoints.layout import flatten, unflatten
from mlae_jax.model.vit import VisionTransformer, create_model
from mlae_jax.partition import combine, count_params, param_role, split_trainable
from mlae_jax.training.optimizer import make_optimizer
from mlae_jax.training.steps import StepConfig, create_train_state, epoch_order, train_step

TINY = dict(patch_size=8, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=3)
TINY_IMAGE = 32


def tiny_model(adapter=None, num_classes: int = 5, **overrides) -> VisionTransformer:
  return VisionTransformer(num_classes=num_classes, adapter=adapter, **{**TINY, **overrides})


def images(batch: int = 2, size: int = TINY_IMAGE, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def init(model: VisionTransformer, size: int = TINY_IMAGE, seed: int = 0) -> dict:
  return model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))['params']


def randomize(params: dict, roles=('adapter', 'head'), seed: int = 1) -> dict:
  """Gives the leaves of `roles` random values (as if trained), so B != 0."""
  rng = np.random.default_rng(seed)
  flat = flatten(params)
  for key, value in flat.items():
    if param_role(key) in roles:
      flat[key] = jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype)
  return unflatten(flat)


def with_random_biases(params: dict, seed: int = 4) -> dict:
  """`params` with every backbone bias at a visible value (checkpoints' init is ~1e-6),
  so a merge that mishandles the base bias shows."""
  rng = np.random.default_rng(seed)
  flat = flatten(params)
  for key, value in flat.items():
    if param_role(key) == 'backbone' and key.endswith('/bias'):
      flat[key] = jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype)
  return unflatten(flat)


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: the parity tests' measure."""
  theirs = np.asarray(theirs)
  return float(np.abs(np.asarray(ours) - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def train_steps(model: VisionTransformer, steps: int, params: dict | None = None,
                batch: int = 8) -> tuple[dict, dict, dict]:
  """Runs `steps` steps of mlae_jax.training's `train_step` (per config, jitted) on
  `batch` random images, training what the model's method trains, with AdamW at 1e-2
  and no weight decay (whatever moves, moved by its gradient). Checks the loss stays
  finite; returns the flat parameters (backbone included) before and after, and the
  last step's metrics."""
  params = init(model) if params is None else params
  patterns = model.adapter.trained_patterns(model.num_layers) if model.adapter else ()
  trainable, frozen = split_trainable(params, patterns)
  tx = make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.0, grad_clip_norm=1.0)
  cfg = StepConfig(model, tx, batch, (0.5,) * 3, (0.5,) * 3)
  state = create_train_state(trainable, tx)
  rng = np.random.default_rng(0)
  data = rng.integers(0, 255, (batch, TINY_IMAGE, TINY_IMAGE, 3)).astype(np.uint8)
  labels = rng.integers(0, model.num_classes, batch).astype(np.int32)
  step = jax.jit(functools.partial(train_step, cfg=cfg))
  for index in range(steps):  # One batch per epoch, a new order (and new PRNG draws) each.
    order = epoch_order(jax.random.key(index), batch, batch)
    state, metrics = step(state, frozen, data, labels, order, np.int32(0), jax.random.key(9))
    assert np.isfinite(float(metrics['loss_sum'])), index
  return flatten(params), flatten(combine(state.trainable, frozen)), metrics


def moved(before: dict, after: dict) -> set[str]:
  """The keys of two flat parameter dicts whose values differ."""
  assert set(before) == set(after)
  return {k for k in before if not np.array_equal(np.asarray(after[k]), np.asarray(before[k]))}


def assert_merge_matches(model: VisionTransformer, params: dict, rtol: float = 1e-4,
                         batch: int = 3) -> dict:
  """Checks that merging the method into the base weights (`merge_adapters`) leaves a
  plain model (no adapter, no adapter parameters) whose eval logits are the adapted
  model's, and that the method matters (the base weights alone give other logits).
  Returns the merged parameters."""
  plain_model, plain_params = merge_adapters(model, params)
  assert plain_model.adapter is None
  assert not any(param_role(k) == 'adapter' for k in flatten(plain_params))
  x = images(batch)
  adapted = np.asarray(model.apply({'params': params}, x))
  merged = np.asarray(plain_model.apply({'params': plain_params}, x))
  base = np.asarray(plain_model.apply({'params': params}, x))
  np.testing.assert_allclose(merged, adapted, rtol=rtol, atol=1e-5 * np.abs(adapted).max())
  assert np.abs(base - adapted).max() > 1e-2  # The method does change the outputs.
  return plain_params


def vit_b16_counts(method) -> dict[str, int]:
  """`count_params` of ViT-B/16 (100 classes) with `method`, from shapes alone."""
  model = create_model('ViT-B_16', 100, adapter=method)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return count_params(shapes['params'], method.trained_patterns(12))


def vit_b16_adapter_count(method) -> int:
  """counts['adapter'] + counts['tuned'] of ViT-B/16 with `method` (the head excluded)."""
  counts = vit_b16_counts(method)
  return counts['adapter'] + counts['tuned']


def loss_and_grads(model: VisionTransformer, params: dict, x, labels, train: bool,
                   drop_path_key: jax.Array | None = None) -> tuple:
  """(logits, flat gradients, flat sown intermediates) of the mean cross-entropy, with
  dropout key 3 and, if given, the stochastic-depth key."""
  rngs = {'dropout': jax.random.key(3)}
  if drop_path_key is not None:
    rngs['drop_path'] = drop_path_key

  def loss_fn(p):
    logits, state = model.apply({'params': p}, x, train=train, rngs=rngs,
                                mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, state['intermediates'])

  grads, (logits, intermediates) = jax.grad(loss_fn, has_aux=True)(params)
  return logits, flatten(grads), flatten(intermediates)
