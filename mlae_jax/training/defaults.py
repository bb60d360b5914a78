"""The shared defaults of every run config (configs/*.py start from here)."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  """The paper's recipe (section 4.1, A.2) on ViT-B/16, with MLAE on the fused qkv."""
  from mlae_jax.data.build import default_data_config

  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = 'ViT-B_16'
  # Optional size overrides (None keeps the named size), e.g. for tiny test models.
  for field in ('patch_size', 'hidden_size', 'mlp_dim', 'num_heads', 'num_layers'):
    config.model[field] = placeholder(int)
  config.model.gelu_approximate = False  # Exact GELU, as timm (the paper's runs).
  config.model.dtype = 'auto'  # bfloat16 compute on GPU/TPU, float32 on CPU.

  # The pre-trained backbone: a path to an original .npz, a released model name (read
  # from / downloaded to the cache), or '' to start from random weights.
  config.pretrained = 'ViT-B_16'
  config.cache_dir = ''  # '' = $MLAE_JAX_CACHE or ~/.cache/mlae_jax.
  config.download = True

  config.mlae = ml_collections.ConfigDict()
  config.mlae.method = 'mlae'
  config.mlae.targets = ('qkv',)
  config.mlae.rank = 8
  config.mlae.drop_rate = 0.5
  config.mlae.mask = 'stochastic'
  config.mlae.pattern = 'uniform'
  config.mlae.pattern_seed = 0
  config.mlae.coeff_init = 1.0
  config.mlae.adaptive_coeff = True
  config.mlae.per_example_mask = False
  config.mlae.input_dropout = 0.0
  config.mlae.lora_alpha = placeholder(float)

  config.data = default_data_config()

  config.epochs = 500
  config.batch_size = 64
  config.eval_batch_size = 256
  config.learning_rate = 5e-4
  config.weight_decay = 1e-4
  config.grad_clip_norm = 0.0  # 0 = no clipping.
  # 'warmup_cosine' (per step) or 'timm_cosine' (timm's per-epoch scheduler, for parity).
  config.schedule = 'warmup_cosine'
  config.warmup_epochs = 10
  config.warmup_lr = 1e-6
  config.min_lr = 1e-5

  config.eval_every_epochs = 50
  config.checkpoint_every_epochs = 25
  config.keep_checkpoints = 2
  config.export_merged = True
  config.progress_bar = True
  # Also train these on the same task, each in <workdir>/baselines/<name>, and compare:
  # 'linear_probe' (head only) and 'lora' (LoRA of the same rank and placement).
  config.baselines = ()
  return config
