"""The expert cosine similarity (appendix A.4) against a direct computation that
forms every expert's d_in x d_out matrix."""

import numpy as np
import pytest

from mlae_jax.adapters import Lora, Mlae
from mlae_jax.adapters.sites import Site, adapter_scope
from mlae_jax.analysis import expert_cosine_matrix, expert_similarity, export_similarity
from mlae_jax.checkpoints.layout import flatten
from mlae_jax.export import export_adapters
from tiny import init, randomize, tiny_model


def direct_cosines(a, b, coeff=None):
  """Flattens c_i outer(a_i, b_i) for every expert and takes all pairwise cosines."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  coeff = np.ones(len(a)) if coeff is None else np.asarray(coeff, np.float64)
  experts = np.stack([c * np.outer(ai, bi).ravel() for c, ai, bi in zip(coeff, a, b)])
  unit = experts / np.linalg.norm(experts, axis=1, keepdims=True)
  return unit @ unit.T


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_materialised_experts(seed):
  rng = np.random.default_rng(seed)
  r, d_in, d_out = 6, 10, 24
  a, b = rng.standard_normal((r, d_in)), rng.standard_normal((r, d_out))
  # Correlated experts too, so similarities far from 0 are covered.
  a[1], b[1] = a[0] + 0.1 * a[1], b[0] - 0.2 * b[1]
  coeff = rng.standard_normal(r) * 3  # Mixed signs.
  np.testing.assert_allclose(expert_cosine_matrix(a, b, coeff), direct_cosines(a, b, coeff),
                             atol=1e-12)
  np.testing.assert_allclose(expert_cosine_matrix(a, b), direct_cosines(a, b), atol=1e-12)
  # Only the coefficients' signs matter.
  np.testing.assert_allclose(expert_cosine_matrix(a, b, coeff),
                             expert_cosine_matrix(a, b, np.sign(coeff) * 1e-3), atol=1e-12)


def test_identical_experts_have_similarity_one():
  rng = np.random.default_rng(0)
  a = np.tile(rng.standard_normal(8), (4, 1))
  b = np.tile(rng.standard_normal(12), (4, 1))
  np.testing.assert_allclose(expert_cosine_matrix(a, b, [1.0, 2.0, 0.5, 4.0]), 1.0, atol=1e-12)
  # Scaling a and b (the same matrix written differently) changes nothing.
  np.testing.assert_allclose(expert_cosine_matrix(a * [[1], [-3], [2], [5]],
                                                  b * [[1], [-1], [0.5], [2]]), 1.0, atol=1e-12)
  # A negative coefficient flips the expert: similarity -1 with the others.
  m = expert_cosine_matrix(a, b, [1.0, -1.0, 1.0, 1.0])
  np.testing.assert_allclose(m[1, [0, 2, 3]], -1.0, atol=1e-12)
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)


def test_orthogonal_experts_have_similarity_zero():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  a_orth = q[:5]                                   # Orthogonal rows of A.
  b_any = rng.standard_normal((5, 9))
  np.testing.assert_allclose(expert_cosine_matrix(a_orth, b_any, rng.standard_normal(5)),
                             np.eye(5), atol=1e-12)
  a_same = np.tile(rng.standard_normal(16), (5, 1))  # Same a, orthogonal b: still 0.
  np.testing.assert_allclose(expert_cosine_matrix(a_same, q[:5]), np.eye(5), atol=1e-12)


def test_zero_experts_are_undefined_and_skipped():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
  b[2] = 0.0
  m = expert_cosine_matrix(a, b, [1.0, 1.0, 1.0, 0.0])  # Expert 2: B = 0; expert 3: c = 0.
  assert np.isnan(m[2]).all() and np.isnan(m[:, 3]).all()
  np.testing.assert_allclose(m[:2, :2], direct_cosines(a[:2], b[:2]), atol=1e-12)
  model = tiny_model(Mlae(rank=4))
  similarity = expert_similarity(model, init(model))  # B = 0 at init: nothing defined.
  assert np.isnan(similarity.mean())


def _direct_model_similarity(model, params, include_coeff=True):
  flat = flatten(params)
  out = {}
  for layer, settings in enumerate(model.adapter.layer_experts(model.num_layers)):
    for target in model.adapter.targets:
      scope = adapter_scope(Site(target, layer))
      coeff = np.asarray(flat.get(f'{scope}/coeff', np.full(settings.experts,
                                                            settings.coeff_init)))
      out[layer, target] = direct_cosines(flat[f'{scope}/A'], flat[f'{scope}/B'],
                                          coeff if include_coeff else None)
  return out


ADAPTERS = {
    'mlae': Mlae(rank=4, drop_rate=0.5, coeff_init=2.0),
    'mlae_two_targets': Mlae(targets=('qkv', 'fc1'), rank=3),
    'mlae_frozen_coeff': Mlae(rank=3, adaptive_coeff=False, coeff_init=-0.5),
    'lora': Lora(rank=4, alpha=8),
}


@pytest.mark.parametrize('name', ADAPTERS)
@pytest.mark.parametrize('include_coeff', [True, False])
def test_model_similarity_matches_direct(name, include_coeff):
  model = tiny_model(ADAPTERS[name])
  params = randomize(init(model))  # Random A, B and (where trained) coefficients.
  similarity = expert_similarity(model, params, include_coeff=include_coeff)
  expected = _direct_model_similarity(model, params, include_coeff)
  assert similarity.matrices.keys() == expected.keys()
  for key, matrix in expected.items():
    np.testing.assert_allclose(similarity.matrices[key], matrix, atol=1e-6)
  for target in similarity.targets:
    block_means = [matrix[np.triu_indices(len(matrix), 1)].mean()
                   for (layer, t), matrix in sorted(expected.items()) if t == target]
    np.testing.assert_allclose(list(similarity.block_means(target).values()), block_means,
                               atol=1e-6)
    np.testing.assert_allclose(similarity.mean(target), np.mean(block_means), atol=1e-6)
    rank = model.adapter.layer_experts(model.num_layers)[0].experts
    assert similarity.stacked(target).shape == (model.num_layers, rank, rank)


def test_fixed_masks_weigh_every_block_equally():
  model = tiny_model(Mlae(mask='fixed', pattern='hourglass'), num_layers=12)
  params = randomize(init(model))
  similarity = expert_similarity(model, params)
  sizes = [similarity.matrices[layer, 'qkv'].shape[0] for layer in range(12)]
  assert sizes == [14, 14, 14, 2, 2, 2, 2, 2, 2, 14, 14, 14]
  np.testing.assert_allclose(similarity.mean(),
                             np.mean(list(similarity.block_means().values())), atol=1e-12)
  with pytest.raises(ValueError, match='different numbers of experts'):
    similarity.stacked()


def test_export_gives_the_same_similarity(tmp_path):
  model = tiny_model(Mlae(rank=4, drop_rate=0.5, coeff_init=2.0))
  params = randomize(init(model))
  export_adapters(str(tmp_path), model, params)
  from_export = export_similarity(tmp_path)
  direct = expert_similarity(model, params)
  for key, matrix in direct.matrices.items():
    np.testing.assert_allclose(from_export.matrices[key], matrix, atol=1e-12)
  assert from_export.mean() == pytest.approx(direct.mean())


def test_model_without_adapters_is_rejected():
  model = tiny_model()
  with pytest.raises(ValueError, match='defined for MLAE and LoRA adapters; the model has none'):
    expert_similarity(model, init(model))
