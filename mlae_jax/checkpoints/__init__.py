"""Original ViT `.npz` checkpoints: layout, reading, loading, downloading."""

from mlae_jax.checkpoints.download import CheckpointDownloadError, resolve_checkpoint
from mlae_jax.checkpoints.npz import CheckpointError, read_npz, write_npz
from mlae_jax.checkpoints.pretrained import init_params, load_pretrained
