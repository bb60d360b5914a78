"""Data parallelism over every device of the job: one mesh axis, batch-sharded inputs,
replicated state (what pmap did, expressed as jit with shardings), on one host or on
several (one process per host, joined by `jax.distributed`).

In a job of several processes, process 0 alone reads and writes the workdirs (lock,
config check, checkpoints, metrics, results, exports): `on_primary` runs such a step
there and hands its outcome to the others, so the workdir need not be on a shared disk.
"""

from __future__ import annotations

import json
import os
from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlae_jax.training.errors import RunError

DATA_AXIS = 'data'
T = TypeVar('T')

# What `jax.distributed.initialize` needs, when no cluster manager that JAX recognises
# (SLURM, Open MPI, Kubernetes, Cloud TPU) says it: JAX reads the first itself.
COORDINATOR, NUM_PROCESSES, PROCESS_ID = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
                                          'JAX_PROCESS_ID')
# Process counts that the launchers JAX recognises set in each process they start (srun's
# job step, mpirun): more than 1 means a job of several processes. (SLURM_NTASKS alone is
# also set in an `sbatch -n 4` shell that starts one python without srun.)
_CLUSTER_SIZES = ('SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE')


def maybe_initialize_distributed() -> None:
  """Joins a job of several processes when the environment describes one: JAX_COORDINATOR_ADDRESS
  (host:port of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or an `srun` job step
  / `mpirun` of more than one task (JAX reads their variables). Must come before anything
  runs on a device; a second call does nothing."""
  if jax.distributed.is_initialized():
    return
  counts = {name: os.environ.get(name) for name in (NUM_PROCESSES, PROCESS_ID)}
  in_cluster = any(_as_int(name, os.environ.get(name), default=1) > 1 for name in _CLUSTER_SIZES)
  if not os.environ.get(COORDINATOR) and not in_cluster:
    if any(counts.values()):
      raise RunError(f'{NUM_PROCESSES} / {PROCESS_ID} are set but {COORDINATOR} is not: set it '
                     'to host:port of process 0 on every process (see the README, Several '
                     'hosts).')
    return
  kwargs = {'num_processes': _as_int(NUM_PROCESSES, counts[NUM_PROCESSES]),
            'process_id': _as_int(PROCESS_ID, counts[PROCESS_ID])}
  try:
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  except RuntimeError as error:
    if 'before' in str(error):  # JAX's "must be called before any JAX computations".
      raise RunError(f'{COORDINATOR} asks for a job of several processes, but JAX already '
                     'ran on its devices: call mlae_jax.training.parallel.'
                     'maybe_initialize_distributed() (or jax.distributed.initialize()) before '
                     'any JAX computation.') from error
    raise
  except ValueError as error:  # e.g. "Number of processes must be defined."
    where = os.environ.get(COORDINATOR) or 'this cluster job'
    raise RunError(f'Cannot join the job of {where}: {error} Set {COORDINATOR}, {NUM_PROCESSES} '
                   f'and {PROCESS_ID} on every process (see the README, Several hosts).') from error


def _as_int(name: str, text: str | None, default: int | None = None) -> int | None:
  if text is None or text == '':
    return default
  try:
    return int(text)
  except ValueError:
    raise RunError(f'Environment variable {name}={text!r} is not a whole number.') from None


def on_primary(fn: Callable[[], T]) -> T:
  """fn(), run by process 0 alone and its JSON-able result handed to every process. An
  error there is raised there and, naming it, on the others (rather than leaving them
  waiting for process 0). One process: just fn()."""
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      value = fn()
      message = json.dumps({'value': value})
    except BaseException as error:
      _share(json.dumps({'error': f'{type(error).__name__}: {error}'}))
      raise
    _share(message)
    return value
  message = json.loads(_share(None))
  if 'error' in message:
    raise RunError(f'Process 0 stopped the run: {message["error"]}')
  return message['value']


def on_every(fn: Callable[[], T]) -> T:
  """fn(), run by every process, for a step that can fail on one host alone (its data,
  its copy of the checkpoint): if it fails anywhere, every process raises, naming the
  process and its error, instead of the others waiting for it at the next collective."""
  if jax.process_count() == 1:
    return fn()
  try:
    value, failure = fn(), ''
  except BaseException as error:  # Raised below, once every process knows.
    value, failure, own = None, f'{type(error).__name__}: {error}', error
  failures = _gather(failure)
  if failure:
    raise own
  for index, text in enumerate(failures):
    if text:
      raise RunError(f'Process {index} stopped the run: {text}')
  return value


def _share(text: str | None) -> str:
  """Process 0's text on every process (two broadcasts: its length, its bytes)."""
  data = np.frombuffer(text.encode(), np.uint8) if text is not None else None
  length = int(multihost_utils.broadcast_one_to_all(
      np.int32(len(data) if data is not None else 0)))
  buffer = data if data is not None else np.zeros(length, np.uint8)
  received = multihost_utils.broadcast_one_to_all(buffer)
  return np.asarray(received, np.uint8).tobytes().decode()


def _gather(text: str) -> list[str]:
  """Every process's text, in process order (two all-gathers: lengths, padded bytes)."""
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(max(1, int(lengths.max())), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [row[:n].tobytes().decode() for row, n in zip(rows, lengths)]


def from_primary(tree: T) -> T:
  """Process 0's values of the arrays in `tree` on every process (each passes a tree of
  the same structure, shapes and dtypes), as numpy arrays. One process: `tree`."""
  if jax.process_count() == 1:
    return tree
  local = jax.device_get(tree)
  shared = multihost_utils.broadcast_one_to_all(local)
  return jax.tree.map(lambda value, like: np.asarray(value, np.asarray(like).dtype), shared,
                      local)


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
