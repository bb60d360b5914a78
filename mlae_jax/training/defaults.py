"""The shared defaults of every run config (configs/*.py start from here)."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  """The paper's recipe (section 4.1, A.2) on ViT-B/16, with MLAE on the fused qkv,
  trained as the PyTorch VTAB-1k runs train (SPT's train_spt.py, which the paper says
  it follows): stochastic depth 0.1, SPT's weight-decay groups, timm's per-epoch
  cosine stepped as SPT steps it, and SPT's evaluation schedule. README,
  "Reproducing the paper", lists every setting and where each comes from."""
  from mlae_jax.adapters.registry import config_group
  from mlae_jax.data.build import default_data_config

  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = 'ViT-B_16'
  # Optional size overrides (None keeps the named size), e.g. for tiny test models.
  for field in ('patch_size', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers'):
    config.model[field] = placeholder(int)
  config.model.gelu_approximate = False  # Exact GELU, as timm (the paper's runs).
  # Stochastic depth of the last block (block i: rate * i / (depth - 1), as timm);
  # 0.1 as the PyTorch runs (SPT's --drop-path default, NOAH, RepAdapter).
  config.model.drop_path_rate = 0.1
  config.model.dtype = 'auto'  # bf16 where native (NVIDIA CC >= 8.0, TPU), else float32.

  # The pre-trained backbone: a path to an original .npz, a released model name (read
  # from / downloaded to the cache), or '' to start from random weights.
  config.pretrained = 'ViT-B_16'
  config.cache_dir = ''  # '' = $MLAE_JAX_CACHE or ~/.cache/mlae_jax.
  config.download = True

  # The PEFT method: config.adapter.method names it, config.adapter.<method> holds its
  # fields (each method's dataclass in mlae_jax.adapters, at its defaults).
  config.adapter = config_group('mlae')
  config.adapter.mlae.drop_rate = 0.5

  config.data = default_data_config()

  # None: the method's paper recipe (its RECIPE; MLAE: 500 epochs on VTAB-1k, 300 on
  # FGVC, lr 5e-4; most PEFT baselines: 100 epochs, lr 1e-3), resolved at the start.
  config.epochs = placeholder(int)
  config.batch_size = 64
  config.eval_batch_size = 256
  config.learning_rate = placeholder(float)
  config.weight_decay = placeholder(float)
  # 'spt': no decay for 1-D parameters (coefficients, biases, norms) and biases, as
  # SPT's set_weight_decay; 'all': decay every trained parameter.
  config.weight_decay_rule = 'spt'
  config.grad_clip_norm = 0.0  # 0 = no clipping.
  # 'timm_cosine_spt': timm's per-epoch CosineLRScheduler stepped as SPT steps it
  # (step(epoch) after each epoch); 'timm_cosine': stepped as timm's train.py
  # (step(epoch + 1)), one epoch ahead; 'warmup_cosine': updated every step.
  config.schedule = 'timm_cosine_spt'
  config.warmup_epochs = 10
  config.warmup_lr = 1e-6
  config.min_lr = 1e-5

  # Evaluate after 0-based epoch e when e % eval_every_epochs == 0 or
  # e >= epochs - eval_last_epochs (SPT's schedule), and always after the last epoch.
  config.eval_every_epochs = 10
  config.eval_last_epochs = 10
  config.checkpoint_every_epochs = 25
  config.keep_checkpoints = 2
  config.export_merged = True  # For methods that merge (the others export adapters only).
  config.progress_bar = True
  # Also train these methods on the same task, each in <workdir>/baselines/<name> at
  # its config.adapter.<name> settings and recipe, and compare (e.g. 'linear_probe',
  # 'lora', 'bitfit').
  config.baselines = ()
  return config
