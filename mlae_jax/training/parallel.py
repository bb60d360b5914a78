"""Data parallelism over every visible device: one mesh axis, batch-sharded inputs,
replicated state (what pmap did, expressed as jit with shardings)."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Joins a multi-host job when its coordinator is set in the environment."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS') and jax.process_count() == 1:
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host batch as one array sharded over the mesh. Every host passes the same
  global batch; each contributes the rows of its own devices."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(array, sharding)
  rows = array.shape[0] // jax.process_count()
  local = array[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(sharding, local, array.shape)
