"""Pre-trains the demo's backbone: a small ViT on scikit-learn's digits 0-4, every
parameter trained, saved in the original ViT checkpoint layout as
mlae_jax/assets/digits_vit.npz. The demo (configs/demo.py) then adapts it with MLAE
to digits 5-9, which it never saw.

  python scripts/pretrain_digits_backbone.py [--out=PATH]
"""

import functools

from absl import app, flags
import jax
import numpy as np
import optax

from mlae_jax.assets import DIGITS_BACKBONE
from mlae_jax.checkpoints import layout
from mlae_jax.checkpoints.npz import write_npz
from mlae_jax.checkpoints.pretrained import init_params
from mlae_jax.data.digits import digits_task
from mlae_jax.data.task_data import INCEPTION_MEAN_STD, normalize
from mlae_jax.model.vit import VisionTransformer

_OUT = flags.DEFINE_string('out', DIGITS_BACKBONE, 'Where to write the backbone.')
_EPOCHS = flags.DEFINE_integer('epochs', 60, 'Training epochs.')

# The backbone's size (configs/demo.py uses the same numbers).
SIZE = dict(patch_size=8, hidden_size=64, mlp_dim=128, num_heads=4, num_layers=4)
IMAGE_SIZE, PADDED, BATCH, SEED = 32, 36, 64, 0


def main(argv):
  del argv
  data = digits_task('digits_0to4', num_train=800, image_size=PADDED, seed=SEED)
  centre = (PADDED - IMAGE_SIZE) // 2
  model = VisionTransformer(num_classes=data.num_classes, **SIZE)
  params = init_params(model, jax.random.key(SEED), IMAGE_SIZE)
  steps = _EPOCHS.value * (len(data.train_labels) // BATCH)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, steps // 10, steps),
                   weight_decay=0.05)
  opt_state = tx.init(params)
  mean, std = INCEPTION_MEAN_STD

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, images, labels, key):
    # Random 32-pixel crops of the 36-pixel images: small shifts (no flips: digits).
    offsets = jax.random.randint(key, (len(images), 2), 0, PADDED - IMAGE_SIZE + 1)
    images = jax.vmap(lambda image, at: jax.lax.dynamic_slice(
        image, (at[0], at[1], 0), (IMAGE_SIZE, IMAGE_SIZE, 3)))(images, offsets)

    def loss_fn(p):
      logits = model.apply({'params': p}, normalize(images, mean, std))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(SEED + 1)
  rng = np.random.default_rng(SEED)
  for epoch in range(_EPOCHS.value):
    order = rng.permutation(len(data.train_labels))
    for start in range(0, len(order) - BATCH + 1, BATCH):
      rows = order[start:start + BATCH]
      key, step_key = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, data.train_images[rows],
                                     data.train_labels[rows], step_key)
    if (epoch + 1) % 10 == 0:
      print(f'epoch {epoch + 1}: loss {float(loss):.4f}')

  correct = 0
  for batch in data.eval_batches(128):
    images = batch.images[:, centre:centre + IMAGE_SIZE, centre:centre + IMAGE_SIZE]
    logits = model.apply({'params': params}, normalize(images, mean, std))
    correct += int(np.sum((np.argmax(logits, -1) == batch.labels) & batch.mask))
  print(f'held-out accuracy on digits 0-4: {correct / data.num_eval:.4f} ({data.num_eval} images)')
  write_npz(_OUT.value, layout.to_pre_linen(layout.as_numpy(layout.flatten(params))))
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
