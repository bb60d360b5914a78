"""The Vision Transformer."""

from mlae_jax.checkpoints.variants import VARIANTS, ViTVariant, get_variant
from mlae_jax.model.vit import VisionTransformer, create_model
