"""Several hosts, for real: two processes on localhost joined by `jax.distributed` (CPU
collectives over gloo), each with its own two devices, train the tiny config through the
CLI. They must give the losses of one process holding all four devices; process 0 alone
writes (process 1 gets a workdir path of its own, as on a host with its own disk, and it
must stay untouched); both killed and re-run, they resume; a refusal on process 0 stops
process 1 too, with process 0's reason, instead of leaving it waiting. And how the
environment decides whether a process joins a job at all."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mlae_jax.checkpoints import read_npz
from mlae_jax.training import parallel
from mlae_jax.training.errors import RunError
from mlae_jax.training.metrics import read_metrics
from fake_checkpoint import write_original_npz
from training_setup import tiny_config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = '--config.epochs=6'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _command(workdir, *extra):
  return [sys.executable, '-m', 'mlae_jax.main',
          f'--config={os.path.join(REPO, "configs", "vtab.py")}:svhn', f'--workdir={workdir}',
          *tiny_config_flags(), *extra]


def _env(devices, **extra):
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **extra)


def _launch(workdirs, *extra, cwds=(REPO, REPO), file_limit_kb=(None, None)):
  """One process per workdir, process i writing into workdirs[i] if it writes at all,
  working in cwds[i], its files capped at file_limit_kb[i] (a full disk) if set."""
  port = _free_port()
  processes = []
  for index, (workdir, cwd, limit) in enumerate(zip(workdirs, cwds, file_limit_kb)):
    command = _command(workdir, *extra)
    if limit is not None:
      command = ['bash', '-c', f'ulimit -f {limit} && exec "$@"', 'launch', *command]
    processes.append(subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                 JAX_PROCESS_ID=str(index), JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')))
  return processes


def _finish(processes, timeout=600):
  outputs = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      raise
    outputs.append((process.returncode, stdout, stderr))
  return outputs


def test_two_processes_train_like_one_write_once_and_resume(tmp_path):
  single = tmp_path / 'single'
  one = subprocess.run(_command(single, EPOCHS), cwd=REPO, env=_env(4), capture_output=True,
                       text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]

  primary, other = tmp_path / 'host0', tmp_path / 'host1'
  processes = _launch([primary, other], EPOCHS)
  checkpoints = primary / 'checkpoints'
  deadline = time.time() + 400
  while time.time() < deadline and all(p.poll() is None for p in processes):
    if checkpoints.exists() and any(name.isdigit() for name in os.listdir(checkpoints)):
      break
    time.sleep(0.05)
  for process in processes:
    process.send_signal(signal.SIGKILL)
  outputs = _finish(processes)
  assert [code for code, _, _ in outputs] == [-signal.SIGKILL] * 2, [o[2][-2000:] for o in outputs]
  assert not (primary / 'results.json').exists()

  outputs = _finish(_launch([primary, other], EPOCHS))
  for code, stdout, stderr in outputs:
    assert code == 0, stderr[-3000:]
    assert 'Resuming from the checkpoint after epoch' in stderr
    assert 'final epoch' in stdout  # Both print the results.

  # Process 0 wrote everything; process 1 not even its workdir.
  assert not other.exists()
  assert {'config.json', 'metrics.jsonl', 'results.json', 'checkpoints', 'export'} <= set(
      os.listdir(primary))
  records = read_metrics(str(primary))
  assert len(records) == len({(r['kind'], r['epoch']) for r in records})  # Each once.
  expected = read_metrics(str(single))
  assert [(r['kind'], r['epoch']) for r in records] == [(r['kind'], r['epoch']) for r in expected]
  np.testing.assert_allclose([r['loss'] for r in records], [r['loss'] for r in expected],
                             rtol=1e-5)
  a, b = read_npz(single / 'export' / 'adapter.npz'), read_npz(primary / 'export' / 'adapter.npz')
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
  with open(primary / 'results.json') as f:
    results = f.read()
  assert '"processes": 2' in results and '"device": "4 x cpu"' in results

  # A refusal on process 0 (another config in its workdir) ends both, each saying why.
  refused = _finish(_launch([primary, other], EPOCHS, '--config.learning_rate=0.1'), timeout=300)
  assert [code for code, _, _ in refused] == [1, 1], [o[2][-2000:] for o in refused]
  assert 'holds a run with another config' in refused[0][2]
  assert 'Process 0 stopped the run: WorkdirConflict' in refused[1][2]
  assert 'holds a run with another config' in refused[1][2]
  assert not other.exists()


def test_a_failure_on_one_host_ends_every_process_with_its_reason(tmp_path):
  """Not a wait for JAX's heartbeat timeout: a write that fails on process 0 mid-training
  (its disk is full) and a checkpoint file that process 1's host lacks both end the two
  processes promptly, each naming the cause."""
  full = _finish(_launch([tmp_path / 'full0', tmp_path / 'full1'], '--config.epochs=3',
                         file_limit_kb=(8, None)), timeout=300)  # Not a checkpoint.
  assert [code for code, _, _ in full] == [1, 1], [o[2][-2000:] for o in full]
  assert 'Cannot write the checkpoint after epoch 1' in full[0][2]
  assert 'Process 0 stopped the run: OutputWriteError: Cannot write the checkpoint' in full[1][2]

  hosts = [tmp_path / 'host0', tmp_path / 'host1']
  for host in hosts:
    host.mkdir()
  write_original_npz(hosts[0] / 'vit.npz', hidden=32, mlp=64, heads=4, layers=2, patch=8,
                     image_size=32)  # Only host 0 has the file; the path is relative.
  missing = _finish(_launch([h / 'run' for h in hosts], '--config.pretrained=vit.npz',
                            cwds=hosts), timeout=300)
  assert [code for code, _, _ in missing] == [1, 1], [o[2][-2000:] for o in missing]
  assert 'Process 1 stopped the run: FileNotFoundError: Checkpoint not found: vit.npz' in (
      missing[0][2])
  assert 'Checkpoint not found: vit.npz' in missing[1][2]
  assert not (hosts[1] / 'run').exists()


# --------------------------------------------- joining a job, from the environment alone

JOB_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE')


@pytest.fixture
def joins(monkeypatch):
  """The calls maybe_initialize_distributed makes to jax.distributed.initialize (faked)."""
  calls = []
  for name in JOB_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  return calls


@pytest.mark.parametrize('env,expected', [
    ({}, []),
    ({'SLURM_STEP_NUM_TASKS': '1'}, []),  # A one-task srun step is one process.
    ({'SLURM_NTASKS': '4'}, []),  # An sbatch -n 4 shell that starts python without srun.
    ({'JAX_COORDINATOR_ADDRESS': 'h0:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'},
     [{'num_processes': 4, 'process_id': 3}]),
    ({'SLURM_STEP_NUM_TASKS': '8'}, [{}]),  # srun: JAX reads SLURM's own variables.
    ({'OMPI_COMM_WORLD_SIZE': '2'}, [{}]),
])
def test_the_environment_decides_whether_to_join_a_job(joins, monkeypatch, env, expected):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  parallel.maybe_initialize_distributed()
  assert joins == expected


@pytest.mark.parametrize('env,message', [
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'}, 'JAX_COORDINATOR_ADDRESS is not'),
    ({'JAX_COORDINATOR_ADDRESS': 'h0:1', 'JAX_NUM_PROCESSES': 'two'},
     "JAX_NUM_PROCESSES='two' is not a whole number"),
])
def test_a_half_described_job_is_a_clear_error(joins, monkeypatch, env, message):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(RunError, match=message):
    parallel.maybe_initialize_distributed()
  assert joins == []


def test_joining_after_jax_ran_says_to_join_first(joins, monkeypatch):
  def too_late(**kwargs):
    raise RuntimeError('jax.distributed.initialize() must be called before any JAX '
                       'computations are executed.')

  monkeypatch.setattr(jax.distributed, 'initialize', too_late)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'h0:1')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  with pytest.raises(RunError, match='maybe_initialize_distributed.. .or jax.distributed'):
    parallel.maybe_initialize_distributed()


def test_one_process_runs_primary_steps_itself():
  assert parallel.on_primary(lambda: {'a': (1, 2)}) == {'a': (1, 2)}  # No JSON round trip.
  tree = {'x': np.arange(3)}
  assert parallel.from_primary(tree) is tree
