"""mlae_jax: Masked LoRA Experts (MLAE) for Vision Transformers in JAX/Flax."""

__version__ = '0.1.0'
