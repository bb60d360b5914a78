"""MLAE and LoRA adapters: configuration, the expert layer, merging and interchange."""

from mlae_jax.adapters.config import TARGETS, AdapterConfig, LayerExperts, lora
from mlae_jax.adapters.experts import MASK_RNG, LowRankExperts
