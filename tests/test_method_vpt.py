"""VPT-Deep against a PyTorch VPT-Deep written from KMnP/vpt's
src/models/vit_prompt/vit.py (`incorporate_prompt`, `forward_deep_prompt`) over timm's
ViT blocks, and its count, init, dropout, validation and one training step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.method import NotMergeable
from mlae_jax.adapters.vpt import VptDeep, prompt_init_bound
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.model import create_model
from mlae_jax.partition import count_params
from tiny import TINY, images, init, moved, randomize, relative_error, tiny_model, train_steps
from torch_reference import nchw, tensor, timm_vit, tiny_checkpoint

TOLERANCE = 1e-4
TOKENS = 4


def jit_init(model):
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']


def scope(layer):
  return f'Transformer/encoderblock_{layer}/adapter_tokens'


class TorchVptDeep(torch.nn.Module):
  """VPT-Deep over timm's ViT, as KMnP/vpt's PromptedTransformer: the embeddings
  (patches, class token, position embedding), then before each prompted block the
  prompts, dropped out per example: inserted after the class token at the first,
  written over tokens 1..p at the later ones (`prompt_embeddings` (1, p, d) and
  `deep_prompt_embeddings` (blocks - 1, p, d)); blocks without prompts run as they are
  (the reference's partial depth). The class token after the final norm feeds the
  head. Every block computes every token (no class-token shortcut)."""

  def __init__(self, vit, num_tokens, dropout, layers=()):
    super().__init__()
    self.vit = vit
    self.num_tokens = num_tokens
    self.layers = sorted(layers) if layers else list(range(len(vit.blocks)))
    d = vit.embed_dim
    self.prompt_embeddings = torch.nn.Parameter(torch.zeros(1, num_tokens, d))
    self.deep_prompt_embeddings = torch.nn.Parameter(
        torch.zeros(len(self.layers) - 1, num_tokens, d))
    self.prompt_dropout = torch.nn.Dropout(dropout)

  def prompt(self, k):
    return self.prompt_embeddings[0] if k == 0 else self.deep_prompt_embeddings[k - 1]

  def forward(self, x):
    vit = self.vit
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    batch = x.shape[0]
    for i, block in enumerate(vit.blocks):
      if i in self.layers:
        k = self.layers.index(i)
        prompts = self.prompt_dropout(self.prompt(k).expand(batch, -1, -1))
        rest = x[:, 1:] if k == 0 else x[:, 1 + self.num_tokens:]
        x = torch.cat((x[:, :1], prompts, rest), dim=1)
      x = block(x)
    return vit.head(vit.norm(x)[:, 0])


def both_models(tmp_path, method):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model = tiny_model(method)
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32))
  flat = flatten(params)
  reference = TorchVptDeep(timm_vit(path), method.num_tokens, method.dropout, method.layers)
  with torch.no_grad():
    reference.vit.head.weight.copy_(tensor(flat['head/kernel']).T)
    reference.vit.head.bias.copy_(tensor(flat['head/bias']))
    for k, layer in enumerate(reference.layers):
      reference.prompt(k).copy_(tensor(flat[f'{scope(layer)}/prompt']))
  reference.vit.head.requires_grad_(True)  # timm_vit freezes every parameter.
  return model, params, reference


# (1,): block 0 runs without prompts, block 1 inserts them, block 2 carries their outputs.
@pytest.mark.parametrize('layers', [(), (1,)])
def test_logits_and_gradients_match_pytorch(tmp_path, layers):
  method = VptDeep(num_tokens=TOKENS, dropout=0.0, layers=layers)
  model, params, reference = both_models(tmp_path, method)
  x, labels = images(4), np.array([0, 3, 1, 4])

  def loss_fn(p):
    logits = model.apply({'params': p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  grads, logits = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
  flat_grads = flatten(grads)
  assert sorted(k for k in flat_grads if 'adapter' in k) == sorted(
      f'{scope(i)}/prompt' for i in reference.layers)

  reference.train()
  torch_logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()

  # Our last block computes the class token alone; timm's computes every token.
  assert relative_error(logits, torch_logits.detach().numpy()) <= TOLERANCE
  for k, layer in enumerate(reference.layers):
    theirs = (reference.prompt_embeddings.grad[0] if k == 0
              else reference.deep_prompt_embeddings.grad[k - 1]).numpy()
    assert np.abs(theirs).max() > 0
    assert relative_error(flat_grads[f'{scope(layer)}/prompt'], theirs) <= TOLERANCE
  head = reference.vit.head
  assert relative_error(flat_grads['head/kernel'], head.weight.grad.numpy().T) <= TOLERANCE
  assert relative_error(flat_grads['head/bias'], head.bias.grad.numpy()) <= TOLERANCE


def test_eval_logits_match_pytorch_without_dropout(tmp_path):
  model, params, reference = both_models(tmp_path, VptDeep(num_tokens=TOKENS, dropout=0.1))
  x = images(3, seed=2)
  logits = jax.jit(model.apply)({'params': params}, x)  # Eval: needs no 'dropout' key.
  reference.eval()
  with torch.no_grad():
    assert relative_error(logits, reference(nchw(x)).numpy()) <= TOLERANCE


def test_prompt_dropout_per_example_and_block():
  model = tiny_model(VptDeep(num_tokens=TOKENS, dropout=0.5), num_layers=2)
  params = randomize(jit_init(model))
  x, labels = images(1), np.array([2])

  @jax.jit
  def loss(p, key):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  # One example: a dropped prompt entry gets no gradient; about half are dropped,
  # with a different pattern in each block.
  grad = jax.grad(loss, has_aux=True)
  grads, first = grad(params, jax.random.key(3))
  grads = flatten(grads)
  zeros = [np.asarray(grads[f'{scope(i)}/prompt']) == 0 for i in range(2)]
  for dropped in zeros:
    assert 0.3 < dropped.mean() < 0.7
  assert not np.array_equal(zeros[0], zeros[1])
  # The output depends on the key (eval, without dropout: the eval parity test).
  _, second = grad(params, jax.random.key(4))
  assert not np.allclose(first, second)


def test_prompts_init_uniform_within_the_reference_bound():
  # B/16: sqrt(6 / (3 * 16 * 16 + 768)) = sqrt(6 / 1536) = 1 / 16.
  assert prompt_init_bound(16, 768) == pytest.approx(0.0625)
  params = flatten(jit_init(tiny_model(VptDeep(num_tokens=50))))
  bound = prompt_init_bound(TINY['patch_size'], TINY['hidden_size'])
  prompts = [np.asarray(params[f'{scope(i)}/prompt']) for i in range(TINY['num_layers'])]
  for prompt in prompts:
    assert prompt.shape == (50, TINY['hidden_size'])
    assert np.abs(prompt).max() <= bound and np.abs(prompt).max() > 0.95 * bound
    assert abs(prompt.mean()) < 0.1 * bound
  assert not np.array_equal(prompts[0], prompts[1])


def test_sequence_grows_by_the_prompts_once():
  # An intermediate block returns every token: 1 + p + patches, p added only once.
  model = tiny_model(VptDeep(num_tokens=TOKENS, dropout=0.0))
  params = jax.eval_shape(lambda: init(model))
  patches = (32 // TINY['patch_size']) ** 2
  _, state = jax.eval_shape(lambda p: model.apply(
      {'params': p}, images(2), capture_intermediates=True, mutable=['intermediates']), params)
  inter = flatten(state['intermediates'])
  for layer in range(TINY['num_layers'] - 1):
    out = inter[f'Transformer/encoderblock_{layer}/__call__'][0]
    assert out.shape == (2, 1 + TOKENS + patches, TINY['hidden_size'])


def param_counts(adapter, classes=100):
  model = create_model('ViT-B_16', classes, adapter=adapter)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return count_params(shapes['params'], adapter.trained_patterns(12))


def test_trainable_parameter_count_of_vit_b16():
  # 768 * p per block, 12 blocks: 9,216 * p. KMnP/vpt demo.ipynb's VTAB runs print the
  # tuned parameters with the head: sun397 (p = 5, 397 classes) 351,373 = 46,080 +
  # 397 * 769; dmlab (p = 100, 6 classes) 926,214 = 921,600 + 6 * 769. The paper's
  # 0.53 M (VTAB-1k, VPT-Deep) averages over tasks with per-task p.
  for tokens, expected in ((50, 460_800), (5, 46_080), (100, 921_600)):
    counts = param_counts(VptDeep(num_tokens=tokens))
    assert counts['adapter'] + counts['tuned'] == expected == 9_216 * tokens
    assert counts['backbone'] == 85_798_656
  assert VptDeep().num_tokens == 5  # src/configs/config.py MODEL.PROMPT.NUM_TOKENS.
  assert param_counts(VptDeep(layers=(0, 5)))['adapter'] == 2 * 768 * 5


def test_not_mergeable(tmp_path):
  model = tiny_model(VptDeep())
  assert not VptDeep.MERGEABLE
  with pytest.raises(NotMergeable, match='vpt_deep cannot be merged'):
    merge_adapters(model, jax.eval_shape(lambda: init(model)))


def test_recipe_is_the_peft_adamw_recipe():
  assert VptDeep().recipe('tfds') == {'learning_rate': 1e-3, 'weight_decay': 1e-4,
                                      'epochs': 100}


def test_one_training_step_moves_the_prompts_and_the_head():
  model = tiny_model(VptDeep(num_tokens=TOKENS))  # Default dropout 0.1: 'dropout' stream.
  # A random head passes gradients on to the prompts from the first step.
  before, after, _ = train_steps(model, 1, params=randomize(jit_init(model), roles=('head',)))
  assert moved(before, after) == {f'{scope(i)}/prompt' for i in range(TINY['num_layers'])} | {
      'head/bias', 'head/kernel'}


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_tokens=0), 'num_tokens must be an integer >= 1'),
    (dict(num_tokens=2.5), 'num_tokens must be an integer >= 1'),
    (dict(num_tokens=True), 'num_tokens must be an integer >= 1'),
    (dict(dropout=1.0), r'dropout must lie in \[0, 1\)'),
    (dict(dropout=-0.1), r'dropout must lie in \[0, 1\)'),
    (dict(targets=()), "targets is empty; choose from \\('tokens',\\)"),
    (dict(targets=('qkv',)), "targets \\['qkv'\\] are not sites"),
    (dict(layers=(1, 1)), 'name a block twice'),
])
def test_bad_fields_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    VptDeep(**kwargs)


def test_layers_beyond_the_model_fail_by_name():
  with pytest.raises(ValueError, match='beyond the model'):
    jax.eval_shape(lambda: init(tiny_model(VptDeep(layers=(5,)))))
