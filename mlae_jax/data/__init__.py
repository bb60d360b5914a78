"""Data: VTAB-1k (TFDS or the PyTorch papers' image folders), FGVC (VPT's json splits) and a
synthetic task, delivered as TaskData (uint8 images; normalisation and crops on the device)."""

from mlae_jax.data.augment import (AUGMENTATIONS, random_resized_crop_flip,
                                   train_augmentation)
from mlae_jax.data.build import NORMALIZATIONS, SOURCES, build_task_data, default_data_config
from mlae_jax.data.task_data import (IMAGENET_MEAN_STD, INCEPTION_MEAN_STD, Batch, TaskData,
                                     normalize, padded_batches, random_crop_flip)
from mlae_jax.data.vtab import SPLITS as VTAB_SPLITS
from mlae_jax.data.vtab import TASK_NAMES as VTAB_TASKS
from mlae_jax.data.fgvc import TASK_NAMES as FGVC_TASKS
