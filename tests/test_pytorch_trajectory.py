"""50 training steps of ours against the PyTorch recipe the paper's runs followed.

PyTorch side, written here: timm's ViT (depth 2 at ViT-B/16 width) read from the same
original-layout checkpoint, a PyTorch MLAE layer on every fused qkv, torch.optim.AdamW
with SPT's two parameter groups, timm's CosineLRScheduler stepped once per epoch as
SPT's train_spt.py steps it (`step(epoch)` after each epoch), a last smaller batch
per epoch (SPT: drop_last=False). Ours: the library's own train_step, optimizer and
schedule built from a run config. Both sides get the same initial values, the same
batches, and the same expert masks and stochastic-depth keep patterns (drawn by our
step's PRNG streams, carried to PyTorch).

The recipe is chosen so that each element, left out of the PyTorch run (SPT's
weight-decay groups, its schedule stepping, the per-epoch schedule itself, the expert
masks, stochastic depth), moves the PyTorch loss curve by more than ten times the
tolerance: the comparison can fail on any of them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.scheduler import CosineLRScheduler

from fake_checkpoint import write_original_npz
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.partition import split_trainable
from mlae_jax.training.defaults import base_config
from mlae_jax.training.optimizer import optimizer_from_config
from mlae_jax.training.steps import AUGMENT_RNG, StepConfig, TrainState, step_rngs, train_step
from mlae_jax.training.run_setup import create_model_from_config, initial_params
from torch_reference import PaperMLAELinear, set_drop_path_keeps, timm_vit

TOLERANCE = 1e-3
STEPS, NUM_TRAIN, BATCH, CLASSES, IMAGE, RANK = 50, 20, 8, 5, 32, 8
STEPS_PER_EPOCH = -(-NUM_TRAIN // BATCH)  # 3: batches of 8, 8 and 4.
SIZE = dict(hidden=768, mlp=3072, heads=12, layers=2, patch=16, image_size=IMAGE)
SCOPE = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/adapter_qkv'


def recipe(checkpoint, drop_path_rate):
  config = base_config()  # The defaults: SPT's groups and stepping (the VTAB/FGVC recipe).
  config.model.num_layers = 2
  config.model.dtype = 'float32'
  config.model.drop_path_rate = drop_path_rate
  config.pretrained = str(checkpoint)
  config.adapter.mlae.rank, config.adapter.mlae.drop_rate, config.adapter.mlae.coeff_init = RANK, 0.5, 1.0
  config.batch_size = BATCH
  config.epochs = 20  # 17 of them run (50 steps): the cosine moves every epoch.
  config.warmup_epochs = 3
  config.warmup_lr = 1e-4
  config.min_lr = 1e-5
  config.learning_rate = 1e-3
  # Large enough that decaying the one-dimensional leaves (SPT does not) shows.
  config.weight_decay = 2.0
  return config


@pytest.fixture(scope='module')
def task(tmp_path_factory):
  checkpoint = tmp_path_factory.mktemp('ckpt') / 'b16_depth2.npz'
  write_original_npz(checkpoint, **SIZE)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_TRAIN, IMAGE, IMAGE, 3)).astype(np.uint8)
  labels = rng.integers(0, CLASSES, NUM_TRAIN).astype(np.int32)
  padding = -np.ones(STEPS_PER_EPOCH * BATCH - NUM_TRAIN, np.int32)
  orders = [np.concatenate([rng.permutation(NUM_TRAIN).astype(np.int32), padding])
            for _ in range(-(-STEPS // STEPS_PER_EPOCH))]
  return checkpoint, images, labels, orders


def train_ours(config, images, labels, orders):
  """Our run; returns the per-step losses, the final trainable leaves, the initial
  parameters and, per step, the masks and keep patterns its step drew."""
  model = create_model_from_config(config, CLASSES)
  params = initial_params(config, model, jax.random.key(0), IMAGE)
  trainable, frozen = split_trainable(params)
  tx, _ = optimizer_from_config(config, trainable, STEPS_PER_EPOCH)
  cfg = StepConfig(model, tx, BATCH, (0.5,) * 3, (0.5,) * 3)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable))
  step = jax.jit(functools.partial(train_step, cfg=cfg))
  key = jax.random.key(config.seed)

  @jax.jit
  def drawn(step_index):  # What the step's PRNG streams draw (independent of values).
    rngs = step_rngs(key, step_index)
    del rngs[AUGMENT_RNG]
    _, state = model.apply({'params': params}, jnp.zeros((BATCH, IMAGE, IMAGE, 3)), train=True,
                           rngs=rngs, mutable=['intermediates'])
    return state['intermediates']

  losses, draws = [], []
  for s in range(STEPS):
    epoch, index = divmod(s, STEPS_PER_EPOCH)
    draws.append(flatten(jax.device_get(drawn(s))))
    state, metrics = step(state, frozen, images, labels, orders[epoch], np.int32(index), key)
    losses.append(float(metrics['loss_sum'] / metrics['count']))
  return np.array(losses), flatten(jax.device_get(state.trainable)), flatten(params), draws


def train_pytorch(config, checkpoint, initial, images, labels, orders, draws, *,
                  weight_decay_groups=True, stepping='spt', masks=True, drop_path=True):
  """The PyTorch recipe (SPT's); the keyword arguments leave one element out."""
  rate = config.model.drop_path_rate if drop_path else 0.0
  model = timm_vit(checkpoint, SIZE, CLASSES, rate)
  layers = []
  with torch.no_grad():
    model.head.weight.copy_(torch.from_numpy(np.array(initial['head/kernel']).T))
    model.head.bias.copy_(torch.from_numpy(np.array(initial['head/bias'])))
    for i, block in enumerate(model.blocks):
      layer = PaperMLAELinear(block.attn.qkv, RANK, config.adapter.mlae.drop_rate if masks else 0.0)
      for name, ours in (('lora_A', 'A'), ('lora_B', 'B'), ('lora_lamda', 'coeff')):
        getattr(layer, name).copy_(torch.from_numpy(np.array(initial[f'{SCOPE.format(i)}/{ours}'])))
      block.attn.qkv = layer
      layers.append(layer)
  model.head.weight.requires_grad_(True)
  model.head.bias.requires_grad_(True)
  decay, no_decay = [], []
  for name, parameter in model.named_parameters():  # SPT's lib/utils.py set_weight_decay.
    if parameter.requires_grad:
      if weight_decay_groups and (parameter.ndim == 1 or name.endswith('.bias')):
        no_decay.append(parameter)
      else:
        decay.append(parameter)
  optimizer = torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}],
                                lr=config.learning_rate, weight_decay=config.weight_decay,
                                eps=1e-8)
  per_step = stepping == 'per_step'
  scale = STEPS_PER_EPOCH if per_step else 1
  scheduler = CosineLRScheduler(optimizer, t_initial=config.epochs * scale,
                                warmup_t=config.warmup_epochs * scale,
                                warmup_lr_init=config.warmup_lr, lr_min=config.min_lr,
                                t_in_epochs=not per_step)
  inputs = torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
  model.train()
  losses = []
  for s in range(STEPS):
    epoch, index = divmod(s, STEPS_PER_EPOCH)
    if per_step:
      scheduler.step_update(s)
    elif index == 0 and epoch > 0:  # After epoch `epoch - 1`:
      scheduler.step(epoch - 1 if stepping == 'spt' else epoch)  # SPT | timm train.py.
    rows = orders[epoch][index * BATCH:(index + 1) * BATCH]
    rows = rows[rows >= 0]  # The last batch of an epoch is smaller.
    for i, layer in enumerate(layers):
      layer.mask = torch.from_numpy(np.array(draws[s][f'{SCOPE.format(i)}/expert_mask'][0]))
    if drop_path:
      set_drop_path_keeps(model, draws[s], rows=len(rows))
    loss = torch.nn.functional.cross_entropy(model(inputs[rows]),
                                             torch.from_numpy(labels[rows]).long())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
  final = {'head/kernel': model.head.weight.detach().numpy().T,
           'head/bias': model.head.bias.detach().numpy()}
  for i, layer in enumerate(layers):
    final.update({f'{SCOPE.format(i)}/A': layer.lora_A.detach().numpy(),
                  f'{SCOPE.format(i)}/B': layer.lora_B.detach().numpy(),
                  f'{SCOPE.format(i)}/coeff': layer.lora_lamda.detach().numpy()})
  return np.array(losses), final


def short(key):
  """'A[1]' for block 1's A, 'head/kernel' for the head."""
  if key.startswith('Transformer/'):
    return f'{key.rsplit("/", 1)[-1]}[{key.split("/")[1].rsplit("_", 1)[-1]}]'
  return key


def max_relative(curve, reference):
  return float(np.max(np.abs(curve - reference) / np.abs(reference)))


@pytest.mark.parametrize('drop_path_rate', [0.0, 0.3])
def test_fifty_steps_follow_the_pytorch_recipe(task, drop_path_rate):
  checkpoint, images, labels, orders = task
  config = recipe(checkpoint, drop_path_rate)
  ours, final, initial, draws = train_ours(config, images, labels, orders)
  theirs, their_final = train_pytorch(config, checkpoint, initial, images, labels, orders, draws)

  loss_difference = max_relative(ours, theirs)
  parameter_differences = {
      key: float(np.linalg.norm(final[key] - value) / np.linalg.norm(value))
      for key, value in their_final.items()}
  print(f'\ndrop_path_rate={drop_path_rate}: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}; '
        f'max relative loss difference {loss_difference:.2e}; final parameters '
        '(relative L2): ' + ', '.join(f'{short(k)} {v:.1e}'
                                      for k, v in parameter_differences.items()))
  assert theirs[-1] < 0.5 * theirs[0], 'the run learns: the curve is not flat'
  assert loss_difference <= TOLERANCE, loss_difference
  assert max(parameter_differences.values()) <= TOLERANCE, parameter_differences

  # Each recipe element matters: leaving it out moves the PyTorch curve far more.
  left_out = {'weight decay on 1-D params and biases': dict(weight_decay_groups=False),
              "timm train.py's stepping (one epoch ahead)": dict(stepping='timm'),
              'a per-step schedule': dict(stepping='per_step'),
              'no expert masks': dict(masks=False)}
  if drop_path_rate:
    left_out['no stochastic depth'] = dict(drop_path=False)
  for element, change in left_out.items():
    moved, _ = train_pytorch(config, checkpoint, initial, images, labels, orders, draws,
                             **change)
    print(f'  left out, {element}: the PyTorch curve moves by {max_relative(moved, theirs):.2e}')
    assert max_relative(moved, theirs) > 10 * TOLERANCE, element
