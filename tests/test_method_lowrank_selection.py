"""LoRA on q and v (PETL-ViT's convention), MLAE's rank-k experts (Table 12), block
subsets, and the selection methods (linear probe, full fine-tuning, BitFit), against
PyTorch versions inside timm's ViT, with their counts at ViT-B/16.

What the references say (read for this file):
- JieShibo/PETL-ViT:binary_adapter/lora.py, the full-precision path (bit=32):
  `set_adapter` gives every timm Attention two `Adapter`s, `lora_q` and `lora_v`, each
  Linear(768, dim, bias=False) (PyTorch's default init: kaiming_uniform(a=sqrt(5)),
  i.e. U(+-1/sqrt(768))) -> Identity -> Dropout(0.1) -> Linear(dim, 768, bias=False)
  with a zero init. `forward_attn` adds s * lora_q(x) to q and s * lora_v(x) to v of the
  fused qkv output (x: the attention's input, i.e. after norm1); k is untouched.
  binary_adapter/main.py: s = --scale (default 1), AdamW lr 1e-3, wd 1e-4, 100 epochs,
  drop_path 0.1; trained: parameters whose name holds 'adapter' or 'head'.
  Ours: A = adapter_down.weight (r, d), B = adapter_up.weight^T (r, d), scale alpha / r
  (= s). Deviation: PETL-ViT drops (p = 0.1) the r-dim hidden `x_down`; our
  `input_dropout` drops the adapter's input x (loralib's `lora_dropout`). The parity
  runs with dropout 0, where both agree.
- KMnP/vpt:src/models/vit_models.py (`ViT.build_backbone`): transfer type 'linear'
  freezes every encoder parameter, 'end2end' trains them all, 'tinytl-bias' (BitFit)
  trains the encoder parameters with 'bias' in their name. The classifier is a
  separate MLP (`setup_head`), outside the encoder, always trained; the encoder is
  built with num_classes=-1 (src/models/build_vit_backbone.py), so it holds no head.
  src/models/vit_backbones/vit.py: the encoder's biases are those of query, key, value,
  out, fc1, fc2, attention_norm and ffn_norm in every block, the patch embedding's and
  encoder_norm's: 12 x (3*768 + 768 + 3072 + 768 + 2*768) + 768 + 768 = 102,912.
"""

import dataclasses

import torch  # noqa: F401  (PyTorch before jax: see conftest.py)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlae_jax.adapters import Lora, LowRankExperts, Mlae
from mlae_jax.adapters.merge import merge_adapters
from mlae_jax.adapters.selection import BitFit, FullFineTuning, LinearProbe
from mlae_jax.checkpoints import load_pretrained
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.model import create_model
from mlae_jax.partition import combine, count_params, is_trainable, param_role, split_trainable
from tiny import (assert_merge_matches, images, init, moved, randomize, relative_error,
                  tiny_model, train_steps, with_random_biases)
from torch_reference import nchw, tensor, timm_vit, timm_with_mlae, tiny_checkpoint

TOLERANCE = 1e-4
LAYERS = 3  # The tiny model's depth.
ATTENTION = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0'
# ViT-B/16: the backbone (without head) and its biases, per VPT's vit.py (see above).
B16_BACKBONE = 85_798_656
B16_BIASES = 12 * (3 * 768 + 768 + 3072 + 768 + 2 * 768) + 768 + 768


def report(name, errors):
  worst = max(errors, key=errors.get)
  print(f'{name}: logits {errors.get("logits", float("nan")):.2e}, worst {worst} '
        f'{errors[worst]:.2e} over {len(errors)} comparisons')
  assert errors[worst] <= TOLERANCE, errors


def param_counts(method, classes=100):
  model = create_model('ViT-B_16', classes, adapter=method)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  trained = method.trained_patterns(12) if method is not None else ()
  return count_params(shapes['params'], trained), flatten(shapes['params'])


def cross_entropy_grads(model, params, x, labels, train=True, rngs=None, trained=None):
  """(gradients, logits, intermediates) of the mean cross-entropy; gradients of the
  `trained` subtree only when given (as training computes them)."""
  trainable, frozen = (params, {}) if trained is None else split_trainable(params, trained)

  def loss_fn(t):
    logits, state = model.apply({'params': combine(t, frozen)}, x, train=train,
                                rngs=rngs or {}, mutable=['intermediates'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, state.get('intermediates', {}))

  grads, (logits, intermediates) = jax.grad(loss_fn, has_aux=True)(trainable)
  return flatten(grads), np.asarray(logits), flatten(intermediates)


def torch_loss_backward(reference, x, labels, train=True):
  reference.train(train)
  logits = reference(nchw(x))
  torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
  return logits.detach().numpy()


def copy_head(reference, flat_params):
  reference.head.requires_grad_(True)
  with torch.no_grad():
    reference.head.weight.copy_(tensor(flat_params['head/kernel']).T)
    reference.head.bias.copy_(tensor(flat_params['head/bias']))


def head_errors(flat_grads, reference):
  return {'head/kernel': relative_error(flat_grads['head/kernel'],
                                        reference.head.weight.grad.numpy().T),
          'head/bias': relative_error(flat_grads['head/bias'], reference.head.bias.grad.numpy())}


def timm_layout(flat, num_layers=LAYERS):
  """Our flat parameters (or gradients) under timm's names and in its shapes."""
  a = {key: np.asarray(value) for key, value in flat.items()}
  d = a['embedding/bias'].shape[0] if 'embedding/bias' in a else None
  out = {'patch_embed.proj.weight': a.get('embedding/kernel'),
         'patch_embed.proj.bias': a.get('embedding/bias'),
         'cls_token': a.get('cls'),
         'pos_embed': a.get('Transformer/posembed_input/pos_embedding'),
         'norm.weight': a.get('Transformer/encoder_norm/scale'),
         'norm.bias': a.get('Transformer/encoder_norm/bias'),
         'head.weight': a.get('head/kernel'), 'head.bias': a.get('head/bias')}
  if out['patch_embed.proj.weight'] is not None:
    out['patch_embed.proj.weight'] = out['patch_embed.proj.weight'].transpose(3, 2, 0, 1)
  if out['head.weight'] is not None:
    out['head.weight'] = out['head.weight'].T
  for i in range(num_layers):
    block, attention, timm = (f'Transformer/encoderblock_{i}', ATTENTION.format(i),
                              f'blocks.{i}')
    qkv = [f'{attention}/{name}' for name in ('query', 'key', 'value')]
    if f'{qkv[0]}/kernel' in a:
      d = a[f'{qkv[0]}/kernel'].shape[0]
      out[f'{timm}.attn.qkv.weight'] = np.concatenate(
          [a[f'{p}/kernel'].reshape(d, d) for p in qkv], axis=1).T
      out[f'{timm}.attn.proj.weight'] = a[f'{attention}/out/kernel'].reshape(d, d).T
      out[f'{timm}.mlp.fc1.weight'] = a[f'{block}/MlpBlock_0/Dense_0/kernel'].T
      out[f'{timm}.mlp.fc2.weight'] = a[f'{block}/MlpBlock_0/Dense_1/kernel'].T
      out[f'{timm}.norm1.weight'] = a[f'{block}/LayerNorm_0/scale']
      out[f'{timm}.norm2.weight'] = a[f'{block}/LayerNorm_1/scale']
    out[f'{timm}.attn.qkv.bias'] = np.concatenate([a[f'{p}/bias'].reshape(-1) for p in qkv])
    out[f'{timm}.attn.proj.bias'] = a[f'{attention}/out/bias']
    out[f'{timm}.mlp.fc1.bias'] = a[f'{block}/MlpBlock_0/Dense_0/bias']
    out[f'{timm}.mlp.fc2.bias'] = a[f'{block}/MlpBlock_0/Dense_1/bias']
    out[f'{timm}.norm1.bias'] = a[f'{block}/LayerNorm_0/bias']
    out[f'{timm}.norm2.bias'] = a[f'{block}/LayerNorm_1/bias']
  return {key: value for key, value in out.items() if value is not None}


def pretrained(path, method, seed=1):
  """The tiny model with `method`, the backbone read from `path`, adapters and head
  random (as if trained)."""
  model = tiny_model(method)
  params = load_pretrained(path, model, rng=jax.random.key(0), image_size=32)
  return model, randomize(params, seed=seed)


# --- LoRA on q and v, following JieShibo/PETL-ViT binary_adapter/lora.py (bit=32). ---

class PetlAdapter(torch.nn.Module):
  """PETL-ViT's full-precision `Adapter`: down (no bias, default init), Identity,
  Dropout, up (no bias, zero init)."""

  def __init__(self, d: int, dim: int, dropout: float = 0.0):
    super().__init__()
    self.adapter_down = torch.nn.Linear(d, dim, bias=False)
    self.adapter_up = torch.nn.Linear(dim, d, bias=False)
    torch.nn.init.zeros_(self.adapter_up.weight)
    self.act = torch.nn.Identity()
    self.dropout = torch.nn.Dropout(dropout)

  def forward(self, x):
    return self.adapter_up(self.dropout(self.act(self.adapter_down(x))))


class QvLoraQkv(torch.nn.Module):
  """timm's fused `attn.qkv` with PETL-ViT's `forward_attn` updates: q + s lora_q(x),
  k, v + s lora_v(x) (the q and v slices of the fused output)."""

  def __init__(self, base: torch.nn.Linear, dim: int, s: float, dropout: float = 0.0):
    super().__init__()
    self.base = base
    self.lora_q = PetlAdapter(base.in_features, dim, dropout)
    self.lora_v = PetlAdapter(base.in_features, dim, dropout)
    self.s = s

  def forward(self, x):
    qkv = self.base(x)
    q, k, v = qkv.chunk(3, dim=-1)
    return torch.cat([q + self.lora_q(x) * self.s, k, v + self.lora_v(x) * self.s], dim=-1)


def test_qv_lora_matches_petl_vit_in_timm(tmp_path):
  # Training mode, dropout 0 (the references' dropouts differ, see above); with no
  # dropout LoRA computes the same in eval.
  train = True
  rank, alpha = 4, 10.0  # s = alpha / r = 2.5.
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model, params = pretrained(path, Lora(targets=('query', 'value'), rank=rank, alpha=alpha))
  x, labels = images(4), np.array([0, 3, 1, 4])
  flat_grads, logits, _ = cross_entropy_grads(model, params, x, labels, train=train)
  flat_params = flatten(params)

  reference = timm_vit(path)
  copy_head(reference, flat_params)
  for i, block in enumerate(reference.blocks):
    block.attn.qkv = QvLoraQkv(block.attn.qkv, rank, alpha / rank)
    with torch.no_grad():
      for site, adapter in (('query', block.attn.qkv.lora_q), ('value', block.attn.qkv.lora_v)):
        scope = f'{ATTENTION.format(i)}/adapter_{site}'
        assert set(k for k in flat_params if k.startswith(scope)) == {f'{scope}/A', f'{scope}/B'}
        adapter.adapter_down.weight.copy_(tensor(flat_params[f'{scope}/A']))
        adapter.adapter_up.weight.copy_(tensor(flat_params[f'{scope}/B']).T)
  torch_logits = torch_loss_backward(reference, x, labels, train)

  errors = {'logits': relative_error(logits, torch_logits), **head_errors(flat_grads, reference)}
  for i, block in enumerate(reference.blocks):
    for site, adapter in (('query', block.attn.qkv.lora_q), ('value', block.attn.qkv.lora_v)):
      scope = f'{ATTENTION.format(i)}/adapter_{site}'
      for ours, theirs in (('A', adapter.adapter_down.weight.grad.numpy()),
                           ('B', adapter.adapter_up.weight.grad.numpy().T)):
        assert np.abs(theirs).max() > 0, (scope, ours)
        errors[f'{i}/{site}/{ours}'] = relative_error(flat_grads[f'{scope}/{ours}'], theirs)
  report('q,v LoRA', errors)


def test_lora_initialisation_is_pytorch_linear_default():
  # Linear(768, r, bias=False).weight: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(768)).
  settings = Lora(rank=64).layer_experts(1)[0]
  layer = LowRankExperts(settings, 768)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 768)), train=False)['params']
  assert set(params) == {'A', 'B'}  # No trained coefficient: LoRA's scale is constant.
  a, bound = np.asarray(params['A']), 1 / np.sqrt(768)
  assert a.shape == (64, 768) and np.abs(a).max() <= bound
  assert abs(a.std() - bound / np.sqrt(3)) < 0.01 * bound
  assert params['B'].shape == (64, 768) and not np.any(params['B'])
  torch_a = torch.nn.Linear(768, 64, bias=False).weight.detach().numpy()
  assert abs(torch_a.std() - a.std()) < 0.01 * bound


def test_lora_counts_at_vit_b16():
  # Rank 8 on q and v (PETL-ViT): 12 blocks x 2 maps x 8 x (768 + 768); on the fused
  # qkv (NOAH, MLAE): 12 x 8 x (768 + 2304). The same 294,912 either way.
  for method in (Lora(targets=('query', 'value'), rank=8), Lora(rank=8)):
    counts, shapes = param_counts(method)
    assert counts['adapter'] + counts['tuned'] == 294_912, method
    assert counts['backbone'] == B16_BACKBONE and counts['tuned'] == 0
  _, shapes = param_counts(Lora(targets=('query', 'value'), rank=8))
  scope = ATTENTION.format(0)
  assert shapes[f'{scope}/adapter_query/A'].shape == (8, 768)
  assert shapes[f'{scope}/adapter_value/B'].shape == (8, 768)
  assert not any('adapter_key' in k or 'adapter_qkv' in k for k in shapes)


@pytest.mark.parametrize('method', [
    Lora(targets=('query', 'value'), rank=4, alpha=8.0),
    Lora(targets=('query', 'value'), rank=3, layers=(0, 2)),
])
def test_qv_lora_merged_equals_adapted(method):
  model = tiny_model(method)
  params = with_random_biases(randomize(init(model)))
  plain_params = assert_merge_matches(model, params)
  # Only the query and value kernels change; keys and every bias stay.
  before, after = flatten(params), flatten(plain_params)
  changed = {k for k in after if not np.array_equal(np.asarray(after[k]), np.asarray(before[k]))}
  blocks = method.blocks(LAYERS)
  assert changed == {f'{ATTENTION.format(i)}/{site}/kernel'
                     for i in blocks for site in ('query', 'value')}


# --- MLAE with rank-k experts (the paper's Table 12). ---

@pytest.mark.parametrize('k', [2, 4])
def test_rank_k_experts_mask_and_match_pytorch(tmp_path, k):
  rank, drop_rate = 8, 0.5
  groups = rank // k
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  model, params = pretrained(path, Mlae(rank=rank, expert_rank=k, drop_rate=drop_rate,
                                        coeff_init=2.0))
  flat_params = flatten(params)
  scopes = [f'{ATTENTION.format(i)}/adapter_qkv' for i in range(LAYERS)]
  for scope in scopes:
    assert flat_params[f'{scope}/A'].shape == (rank, 32)
    assert flat_params[f'{scope}/coeff'].shape == (groups,)
  x, labels = images(4), np.array([0, 3, 1, 4])
  # A key under which some experts are dropped and some kept.
  for seed in range(50):
    rngs = {'expert_mask': jax.random.key(seed)}
    flat_grads, logits, inter = cross_entropy_grads(model, params, x, labels, rngs=rngs)
    masks = [np.asarray(inter[f'{scope}/expert_mask'][0]) for scope in scopes]
    if 0 < np.concatenate(masks).sum() < LAYERS * groups:
      break
  for scope, mask in zip(scopes, masks):
    assert mask.shape == (groups,) and mask.dtype == bool
    columns = np.repeat(mask, k)  # One bit per expert drops its k columns together.
    for name in ('A', 'B'):
      grad = np.asarray(flat_grads[f'{scope}/{name}'])
      assert not np.any(grad[~columns]), (scope, name, mask)
      assert np.all(np.any(grad[columns] != 0, axis=-1)), (scope, name, mask)
    coeff_grad = np.asarray(flat_grads[f'{scope}/coeff'])
    assert not np.any(coeff_grad[~mask]) and np.all(coeff_grad[mask] != 0)

  # The same step in timm: one rank-1 column per PyTorch expert, each column given its
  # expert's coefficient and mask bit.
  reference = timm_with_mlae(path, rank, drop_rate)
  copy_head(reference, flat_params)
  for block, scope, mask in zip(reference.blocks, scopes, masks):
    layer = block.attn.qkv
    with torch.no_grad():
      layer.lora_A.copy_(tensor(flat_params[f'{scope}/A']))
      layer.lora_B.copy_(tensor(flat_params[f'{scope}/B']))
      layer.lora_lamda.copy_(tensor(np.repeat(np.asarray(flat_params[f'{scope}/coeff']), k)))
    layer.mask = tensor(np.repeat(mask, k).astype(np.float32))
  torch_logits = torch_loss_backward(reference, x, labels)
  errors = {'logits': relative_error(logits, torch_logits), **head_errors(flat_grads, reference)}
  for block, scope in zip(reference.blocks, scopes):
    layer = block.attn.qkv
    errors[f'{scope}/A'] = relative_error(flat_grads[f'{scope}/A'], layer.lora_A.grad.numpy())
    errors[f'{scope}/B'] = relative_error(flat_grads[f'{scope}/B'], layer.lora_B.grad.numpy())
    # An expert's coefficient scales its k columns: its gradient is their sum.
    errors[f'{scope}/coeff'] = relative_error(
        flat_grads[f'{scope}/coeff'], layer.lora_lamda.grad.numpy().reshape(groups, k).sum(1))
  report(f'MLAE expert_rank={k}', errors)


@pytest.mark.parametrize('k', [1, 2, 4, 8])
def test_rank_k_expert_counts_at_vit_b16(k):
  # Table 12: the 8 columns of A (8, 768) and B (8, 2304) in 8 / k experts, one
  # coefficient each, per block.
  counts, _ = param_counts(Mlae(rank=8, expert_rank=k))
  assert counts['adapter'] + counts['tuned'] == 12 * (8 * (768 + 2304) + 8 // k)
  assert counts['tuned'] == 0


@pytest.mark.parametrize('k', [2, 4])
def test_rank_k_experts_eval_equals_merged(k):
  model = tiny_model(Mlae(rank=8, expert_rank=k, drop_rate=0.5))
  params = with_random_biases(randomize(init(model)))
  plain_params = assert_merge_matches(model, params)
  # Eval uses every expert, unscaled: the merged update is sum_i c_g(i) a_i b_i^T.
  flat = flatten(params)
  scope = f'{ATTENTION.format(1)}/adapter_qkv'
  coeff = np.repeat(np.asarray(flat[f'{scope}/coeff']), k)
  delta = np.einsum('ri,r,ro->io', flat[f'{scope}/A'], coeff, flat[f'{scope}/B'])
  kernel = np.concatenate([np.asarray(flatten(plain_params)[f'{ATTENTION.format(1)}/{p}/kernel'])
                           .reshape(32, 32) for p in ('query', 'key', 'value')], axis=1)
  base = np.concatenate([np.asarray(flat[f'{ATTENTION.format(1)}/{p}/kernel']).reshape(32, 32)
                         for p in ('query', 'key', 'value')], axis=1)
  np.testing.assert_allclose(kernel - base, delta, rtol=1e-4, atol=1e-5)


# --- Block subsets. ---

@pytest.mark.parametrize('method, per_block', [
    (Mlae(layers=(0, 5, 11)), 8 * (768 + 2304) + 8),
    (Lora(layers=(0, 5, 11)), 8 * (768 + 2304)),
    (Lora(targets=('query', 'value'), layers=(11, 0, 5)), 2 * 8 * (768 + 768)),
])
def test_block_subsets_at_vit_b16(method, per_block):
  counts, shapes = param_counts(method)
  blocks = {int(k.split('/')[1].split('_')[1]) for k in shapes if param_role(k) == 'adapter'}
  assert blocks == {0, 5, 11}
  assert all(k.startswith('Transformer/encoderblock_') for k in shapes
             if param_role(k) == 'adapter')
  assert counts['adapter'] + counts['tuned'] == 3 * per_block
  full, _ = param_counts(dataclasses.replace(method, layers=()))
  assert full['adapter'] == 12 * per_block


@pytest.mark.parametrize('method', [Mlae(layers=(0, 12)), Lora(layers=(3, 20))])
def test_a_block_beyond_the_depth_is_refused(method):
  model = create_model('ViT-B_16', 10, adapter=method)
  with pytest.raises(ValueError, match=r'layers \(.*\) name blocks beyond the model\'s 12'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


# --- Selection methods: linear probe, full fine-tuning, BitFit. ---

def test_selection_counts_at_vit_b16():
  head = 768 * 100 + 100
  probe, _ = param_counts(LinearProbe())
  assert probe['adapter'] + probe['tuned'] == 0 and probe['trainable'] == head
  full, _ = param_counts(FullFineTuning())
  assert full['tuned'] == B16_BACKBONE and full['backbone'] == 0 and full['adapter'] == 0
  bitfit, shapes = param_counts(BitFit())
  # VPT's 'tinytl-bias': every encoder parameter named '*bias*', the head apart.
  assert bitfit['adapter'] + bitfit['tuned'] == B16_BIASES == 102_912
  assert bitfit['tuned'] == sum(int(np.prod(v.shape)) for k, v in shapes.items()
                                if k.endswith('/bias') and not k.startswith('head/'))
  assert bitfit['backbone'] == B16_BACKBONE - B16_BIASES
  assert bitfit['trainable'] == B16_BIASES + head


def test_split_trainable_picks_exactly_the_right_leaves():
  params = init(tiny_model())
  keys = set(flatten(params))
  head = {'head/kernel', 'head/bias'}
  biases = {k for k in keys if k.endswith('/bias')} - head
  # Per block: q, k, v, out, fc1, fc2 and the two LayerNorms; patch embedding, final norm.
  assert len(biases) == LAYERS * 8 + 2
  assert 'embedding/bias' in biases and 'Transformer/encoder_norm/bias' in biases
  for method, expected in ((LinearProbe(), head), (BitFit(), head | biases),
                           (FullFineTuning(), keys)):
    trainable, frozen = split_trainable(params, method.trained_patterns(LAYERS))
    assert set(flatten(trainable)) == expected, method.NAME
    assert set(flatten(frozen)) == keys - expected, method.NAME


def test_bitfit_gradients_match_timm(tmp_path):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  method = BitFit()
  model, params = pretrained(path, method)
  x, labels = images(4), np.array([0, 3, 1, 4])
  flat_grads, logits, _ = cross_entropy_grads(model, params, x, labels,
                                              trained=method.trained_patterns(LAYERS))

  reference = timm_vit(path)
  copy_head(reference, flatten(params))
  # VPT's 'tinytl-bias': requires_grad on every parameter named '*bias*'.
  for name, p in reference.named_parameters():
    p.requires_grad_('bias' in name or name.startswith('head.'))
  mapped_params = timm_layout(flatten(params))
  for name, p in reference.named_parameters():  # The two models hold the same weights.
    np.testing.assert_allclose(p.detach().numpy(), mapped_params[name], rtol=0, atol=0)
  torch_logits = torch_loss_backward(reference, x, labels)

  trained = {name: p for name, p in reference.named_parameters() if p.requires_grad}
  ours = timm_layout(flat_grads)
  assert set(ours) == set(trained)  # Ours trains exactly the biases timm trains (+ head).
  errors = {'logits': relative_error(logits, torch_logits)}
  for name, p in trained.items():
    assert np.abs(p.grad.numpy()).max() > 0, name
    errors[name] = relative_error(ours[name], p.grad.numpy())
  # The key bias shifts every score of a query alike: softmax cancels it (~0 gradient).
  key_bias = np.asarray(flat_grads[f'{ATTENTION.format(0)}/key/bias'])
  assert np.abs(key_bias).max() < 1e-6 * np.abs(ours['blocks.0.attn.qkv.bias']).max() + 1e-9
  report('BitFit', errors)


def test_full_fine_tuning_gradients_match_timm(tmp_path):
  path = tiny_checkpoint(tmp_path / 'tiny.npz')
  method = FullFineTuning()
  model = tiny_model(method)
  params = randomize(load_pretrained(path, model, rng=jax.random.key(0), image_size=32),
                     roles=('head',))
  x, labels = images(4), np.array([0, 3, 1, 4])
  flat_grads, logits, _ = cross_entropy_grads(model, params, x, labels,
                                              trained=method.trained_patterns(LAYERS))
  assert set(flat_grads) == set(flatten(params))

  reference = timm_vit(path)
  copy_head(reference, flatten(params))
  reference.requires_grad_(True)
  torch_logits = torch_loss_backward(reference, x, labels)
  ours = timm_layout(flat_grads)
  named = dict(reference.named_parameters())
  assert set(ours) == set(named)
  errors = {'logits': relative_error(logits, torch_logits)}
  for name, p in named.items():
    errors[name] = relative_error(ours[name], p.grad.numpy())
  # The representative leaves, by our names.
  for leaf in ('cls', 'Transformer/posembed_input/pos_embedding', 'embedding/kernel',
               f'{ATTENTION.format(1)}/query/kernel'):
    assert np.abs(np.asarray(flat_grads[leaf])).max() > 0, leaf
  report('full fine-tuning', errors)


@pytest.mark.parametrize('method', [LinearProbe(), BitFit(), FullFineTuning()])
def test_one_training_step_moves_exactly_the_trained_leaves(method):
  # The head starts at zero, so the first step moves the head alone; the second the rest.
  before, after, _ = train_steps(tiny_model(method), 2)
  changed = moved(before, after)
  expected = {k for k in before if is_trainable(k, method.trained_patterns(LAYERS))}
  # Key biases get a ~0 gradient (softmax cancels them), which AdamW may or may not turn
  # into a step: they need not move.
  key_biases = {k for k in expected if k.endswith('/key/bias')}
  assert expected - key_biases <= changed <= expected, (expected - changed, changed - expected)
  if isinstance(method, LinearProbe):
    assert changed == {'head/kernel', 'head/bias'}
  elif isinstance(method, BitFit):
    assert all(k.endswith('/bias') or k.startswith('head/') for k in changed)
    assert len(changed - key_biases) == LAYERS * 7 + 2 + 2
  else:
    assert changed >= {'cls', 'Transformer/posembed_input/pos_embedding', 'embedding/kernel',
                       f'{ATTENTION.format(0)}/query/kernel'}


def test_selection_methods_are_mergeable_as_the_plain_model():
  for method in (LinearProbe(), BitFit(), FullFineTuning()):
    model = tiny_model(method)
    params = randomize(init(model))
    plain_model, plain_params = merge_adapters(model, params)
    assert plain_model.adapter is None
    np.testing.assert_array_equal(
        np.asarray(plain_model.apply({'params': plain_params}, images(2))),
        np.asarray(model.apply({'params': params}, images(2))))
