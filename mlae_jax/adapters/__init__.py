"""PEFT methods on the ViT: the method interface, its sites, and the methods by name."""

from mlae_jax.adapters.experts import MASK_RNG, LayerExperts, LowRankExperts
from mlae_jax.adapters.low_rank import Lora, Mlae
from mlae_jax.adapters.method import Method, NotMergeable
from mlae_jax.adapters.registry import METHODS, create, get_method
