"""Faults a long run meets, and what each must end in: a clear error that names what is
wrong with nothing lost, or a recovery that says what it did. Never a result from a
broken state, two runs mixed in one workdir, or a raw traceback from the CLI."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fake_checkpoint import write_original_npz
from mlae_jax.adapters import Mlae
from mlae_jax.checkpoints import CheckpointError, load_pretrained, read_npz
from mlae_jax.export import load_adapter_export
from mlae_jax.files import write_json
from mlae_jax.model import create_model
from mlae_jax.sweeps import layout
from mlae_jax.training import workdir as run_files
from mlae_jax.training.errors import (CheckpointsDamaged, OutputWriteError, TrainingDiverged,
                                      WorkdirLocked)
from mlae_jax.training.metrics import read_metrics
from mlae_jax.training.train import train_and_evaluate
from mlae_jax.training.workdir import WorkdirConflict
from tiny import tiny_model
from training_setup import tiny_config, tiny_config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(workdir, *extra, config='configs/vtab.py:svhn', limit_file_kb=None, flags=None):
  """The real CLI on the tiny config; returns the finished process. `limit_file_kb`
  caps the size of every file it writes (a disk that fills: larger writes fail)."""
  command = [sys.executable, '-m', 'mlae_jax.main', f'--config={config}',
             f'--workdir={workdir}', *(tiny_config_flags() if flags is None else flags), *extra]
  if limit_file_kb is not None:
    command = ['bash', '-c', f'ulimit -f {limit_file_kb} && exec "$@"', 'cli', *command]
  return subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)


def one_line_error(process):
  """The CLI's failure: exit status 1 and one line, no traceback."""
  assert process.returncode == 1, process.stderr[-2000:]
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert 'Traceback' not in process.stderr, process.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('mlae_jax: '), lines
  return lines[0]


# 1. Non-finite training stops; non-finite values are refused up front.

def test_a_diverging_run_stops_at_once_and_leaves_no_result(tmp_path):
  config = tiny_config(learning_rate=1e30, min_lr=0.0, warmup_lr=0.0)
  with pytest.raises(TrainingDiverged) as error:
    train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert 'diverged: the loss became nan at epoch 1, step ' in message
  assert 'no checkpoint was written before it' in message
  assert not (tmp_path / 'results.json').exists() and not (tmp_path / 'export').exists()
  assert all(np.isfinite(r['loss']) for r in read_metrics(str(tmp_path)))


def test_divergence_names_the_last_good_checkpoint(tmp_path):
  # Two warm-up epochs at lr 0 (SPT stepping), then an absurd rate from epoch 3 on.
  config = tiny_config(epochs=4, learning_rate=1e30, warmup_epochs=2, warmup_lr=0.0,
                       min_lr=0.0)
  with pytest.raises(TrainingDiverged, match=r'at epoch 3, step [789]\b.* the last good checkpoint '
                                             r'is .*checkpoints/2 \(after epoch 2\)'):
    train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # No diverged state.
  assert not (tmp_path / 'results.json').exists()


@pytest.mark.parametrize('field, value, message', [
    ('learning_rate', float('nan'), 'config.learning_rate = nan: must be a finite number > 0'),
    ('learning_rate', float('inf'), 'config.learning_rate = inf'),
    ('weight_decay', float('nan'), 'config.weight_decay = nan: must be a finite number >= 0'),
    ('weight_decay', -1e-4, 'config.weight_decay = -0.0001'),
    ('grad_clip_norm', float('inf'), 'config.grad_clip_norm = inf'),
    ('min_lr', 1.0, 'config.min_lr = 1.0: must be a finite number in [0, learning_rate=0.003]'),
    ('warmup_lr', 0.01, 'config.warmup_lr = 0.01: must be a finite number in [0, learning_rate'),
    ('min_lr', float('nan'), 'config.min_lr = nan: must be a finite number'),
    ('model.drop_path_rate', float('nan'), 'config.model.drop_path_rate = nan'),
    ('adapter.mlae.coeff_init', float('inf'), 'coeff_init must be a finite number, got inf'),
    ('adapter.mlae.drop_rate', float('nan'), 'drop_rate must lie in [0, 1)'),
    ('adapter.mlae.input_dropout', float('nan'), 'input_dropout must lie in [0, 1), got nan'),
])
def test_float_config_values_are_checked_before_anything_is_built(field, value, message,
                                                                   tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError) as error:
    train_and_evaluate(tiny_config(**{field: value}), str(workdir))
  assert message in str(error.value)
  assert not workdir.exists()


def test_lora_alpha_must_be_a_positive_finite_number(tmp_path):
  for alpha in (float('nan'), 0.0, -2.0):
    config = tiny_config(**{'adapter.method': 'lora', 'adapter.lora.alpha': alpha})
    with pytest.raises(ValueError, match=r'Bad lora config: alpha must be a finite number > 0.*'
                                         r'\(config.adapter.lora\)'):
      train_and_evaluate(config, str(tmp_path))


def test_checkpoint_files_with_nan_are_refused_by_key(tmp_path):
  arrays = write_original_npz(tmp_path / 'ok.npz', hidden=32, mlp=64, heads=4, layers=3,
                              patch=8, image_size=32)
  arrays['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'][0, 0] = np.nan
  arrays['embedding/bias'][3] = np.inf
  np.savez(tmp_path / 'bad.npz', **arrays)
  model = tiny_model()
  with pytest.raises(CheckpointError, match=r'bad.npz holds NaN or infinite values in 2 '
                                            r'arrays: Transformer/encoderblock_1/MlpBlock_0/'
                                            r'Dense_0/kernel, embedding/bias'):
    load_pretrained(tmp_path / 'bad.npz', model, rng=jax.random.key(0), image_size=32)


def test_adapter_exports_with_nan_are_refused(tmp_path):
  pretrained = tmp_path / 'in21k.npz'
  write_original_npz(pretrained, hidden=32, mlp=64, heads=4, layers=2, patch=8, image_size=32)
  train_and_evaluate(tiny_config(pretrained=str(pretrained), epochs=1), str(tmp_path / 'run'))
  export = tmp_path / 'run' / 'export'
  arrays = read_npz(export / 'adapter.npz')
  arrays['head/bias'][:] = np.nan
  np.savez(export / 'adapter.npz', **arrays)
  with pytest.raises(CheckpointError, match='adapter.npz holds NaN or infinite values in 1 '
                                            'arrays: head/bias'):
    load_adapter_export(str(export), str(pretrained))


# 2. One workdir, one run.

def test_a_workdir_of_another_config_is_refused_before_anything_changes(tmp_path):
  train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  saved = (tmp_path / 'config.json').read_text()
  with pytest.raises(WorkdirConflict, match=r'another config \(adapter.mlae.rank: 4 there, 2 '
                                            r'now; learning_rate: 0.003 there, 0.001 now\)'):
    train_and_evaluate(tiny_config(epochs=2, learning_rate=1e-3, **{'adapter.mlae.rank': 2}),
                       str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == saved


def test_a_config_of_another_version_counts_as_different(tmp_path):
  train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['model']['drop_path_rate']  # As a version without stochastic depth wrote it.
  write_json(tmp_path / 'config.json', saved)
  with pytest.raises(WorkdirConflict, match=r"model.drop_path_rate: '<absent>' there, 0.1 now"):
    train_and_evaluate(tiny_config(epochs=1), str(tmp_path))


def test_more_epochs_on_resume_only_when_allowed_and_then_recorded(tmp_path):
  first = train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  with pytest.raises(WorkdirConflict, match=r'epochs: 2 there, 3 now.*--allow_changes=epochs'):
    train_and_evaluate(tiny_config(epochs=3), str(tmp_path))
  assert layout.status(str(tmp_path)) == layout.FINISHED
  with pytest.raises(WorkdirConflict, match='cannot be shortened to 1'):
    train_and_evaluate(tiny_config(epochs=1), str(tmp_path), allow_changes=('epochs',))
  assert layout.status(str(tmp_path)) == layout.FINISHED  # Refused before anything changed.
  longer = train_and_evaluate(tiny_config(epochs=3), str(tmp_path), allow_changes=('epochs',))
  assert [r['epoch'] for r in read_metrics(str(tmp_path)) if r['kind'] == 'train'] == [1, 2, 3]
  # The evaluation after epoch 2 (due under the old schedule) is kept, not redone or lost.
  assert longer['evaluated_epochs'] == [1, 2, 3] and first['evaluated_epochs'] == [1, 2]
  assert longer['epochs'] == 3 and first['epochs'] == 2
  [change] = longer['config_changes']
  assert change['changes'] == {'epochs': {'from': 2, 'to': 3}}
  assert run_files.recorded_changes(str(tmp_path)) == [change]
  with pytest.raises(WorkdirConflict, match=r'config.learning_rate cannot change within a run; '
                                            r'fields that can: epochs, '):
    train_and_evaluate(tiny_config(epochs=3), str(tmp_path), allow_changes=('learning_rate',))
  with pytest.raises(WorkdirConflict, match=r'config.epoch cannot .* \(did you mean epochs\?\)'):
    train_and_evaluate(tiny_config(epochs=3), str(tmp_path), allow_changes=('epoch',))
  with pytest.raises(WorkdirConflict, match='learning_rate: 0.003 there, 0.001 now'):
    train_and_evaluate(tiny_config(epochs=3, learning_rate=1e-3), str(tmp_path),
                       allow_changes=('epochs',))


def test_a_workdir_with_a_run_but_no_config_is_refused(tmp_path):
  train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  os.remove(tmp_path / 'config.json')
  with pytest.raises(WorkdirConflict, match=r'holds checkpoints and results.json but no '
                                            r'config.json'):
    train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  with pytest.raises(WorkdirConflict, match=r'config.epoch cannot change .*did you mean epochs'):
    train_and_evaluate(tiny_config(epochs=1), str(tmp_path / 'fresh'), allow_changes=('epoch',))


def test_a_diverging_point_of_a_group_trains_apart_from_the_others(tmp_path):
  from mlae_jax.sweeps import runner
  runs = [runner.Run('vtab', 'svhn', 0, str(tmp_path / name), tiny_config(
      epochs=2, **{'adapter.mlae.coeff_init': coeff})) for name, coeff in (('sane', 1.0), ('wild', 3e38))]
  summary = runner.execute_at_once(runs, configs_at_once=2, keep_going=True)
  outcomes = {run.workdir: outcome for run, outcome, _ in summary.outcomes}
  assert outcomes[str(tmp_path / 'wild')] == runner.FAILED
  assert outcomes[str(tmp_path / 'sane')] in (runner.TRAINED, runner.RESUMED)  # Not FAILED.
  assert 'diverged' in summary.failed[0][1]
  assert layout.status(str(tmp_path / 'sane')) == layout.FINISHED
  assert not (tmp_path / 'wild' / 'results.json').exists()


def test_a_checkpoint_holding_nan_is_set_aside(tmp_path, capsys):
  import jax.numpy as jnp
  import optax
  from mlae_jax.training.checkpointing import RunCheckpoints
  from mlae_jax.training.steps import TrainState
  tx = optax.adam(1e-3)
  checkpoints = RunCheckpoints(str(tmp_path))
  for epoch, value in ((1, 1.0), (2, np.nan)):
    trainable = {'head': {'kernel': jnp.full((2, 3), value)}}
    checkpoints.save(epoch, TrainState(jnp.int32(epoch), trainable, tx.init(trainable)),
                     {'train': [], 'eval': []})
  zeros = {'head': {'kernel': jnp.zeros((2, 3))}}
  epoch, state, _ = checkpoints.restore_latest(TrainState(jnp.int32(0), zeros, tx.init(zeros)))
  assert epoch == 1 and float(state.trainable['head']['kernel'][0, 0]) == 1.0
  assert "NaN or infinite values in ['head']['kernel']" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['1', '2.damaged']
  checkpoints.close()


def test_a_second_process_is_refused_while_the_first_trains(tmp_path):
  with run_files.locked(str(tmp_path)):  # As a training process holds it.
    with pytest.raises(WorkdirLocked, match=rf'Workdir {tmp_path} is in use by process '
                                            rf'{os.getpid()} on '):
      train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  assert not (tmp_path / 'config.json').exists()


def test_a_killed_process_leaves_no_stuck_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from mlae_jax.training.workdir import locked\n'
       'with locked(sys.argv[1]):\n  print("held", flush=True); time.sleep(600)', str(tmp_path)],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  second = cli(tmp_path)
  assert 'is in use by process' in one_line_error(second)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert cli(tmp_path).returncode == 0  # The lock died with its holder.


# 3. Checkpoints survive damage.

def _run_with_damage(tmp_path, damage):
  """A straight run, and a run whose newest checkpoint is damaged before re-running it;
  returns both workdirs and the re-run's results."""
  config = tiny_config(epochs=4)
  train_and_evaluate(config, str(tmp_path / 'straight'))
  damaged = tmp_path / 'damaged'
  train_and_evaluate(config, str(damaged))
  os.remove(damaged / 'results.json')  # As if it had stopped after its last checkpoint.
  damage(damaged / 'checkpoints' / '4')
  return tmp_path / 'straight', damaged


@pytest.mark.parametrize('damage', [
    lambda step: [os.remove(os.path.join(root, name)) for root, _, names in os.walk(step / 'state')
                  for name in names if name not in ('_METADATA', '_sharding')],
    lambda step: (step / 'history' / 'metadata').write_text('{"train": ['),
    lambda step: shutil.rmtree(step / 'state'),
], ids=['state files lost', 'history truncated', 'state folder lost'])
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage, capsys):
  straight, damaged = _run_with_damage(tmp_path, damage)
  train_and_evaluate(tiny_config(epochs=4), str(damaged))
  warning = capsys.readouterr().err
  assert f'Checkpoint {damaged}/checkpoints/4 is damaged' in warning
  assert 'set aside as' in warning and 'resuming from an older one' in warning
  assert (damaged / 'checkpoints' / '4.damaged').is_dir()
  # Resumed from the checkpoint after epoch 3: the same run as one never damaged.
  a, b = read_npz(straight / 'export' / 'adapter.npz'), read_npz(damaged / 'export' /
                                                                 'adapter.npz')
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_no_intact_checkpoint_is_an_error_naming_the_directory(tmp_path):
  train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  os.remove(tmp_path / 'results.json')
  for step in ('1', '2'):
    shutil.rmtree(tmp_path / 'checkpoints' / step / 'state')
  with pytest.raises(CheckpointsDamaged, match=rf'No checkpoint in {tmp_path}/checkpoints can be '
                                               rf'restored .* Delete {tmp_path}/checkpoints'):
    train_and_evaluate(tiny_config(epochs=2), str(tmp_path))


def test_a_half_written_checkpoint_is_ignored(tmp_path):
  train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  os.remove(tmp_path / 'results.json')
  os.makedirs(tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234' / 'state')
  results = train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  assert results['evaluated_epochs'] == [1, 2]


def test_a_disk_too_full_for_the_config_record_is_one_line_naming_the_workdir(tmp_path):
  line = one_line_error(cli(tmp_path, limit_file_kb=1))  # config.json holds ~5 KB.
  assert line.startswith(f"mlae_jax: Cannot write the run's records (config.json, metrics) in "
                         f'{tmp_path} (File too large). Free disk space')


def test_a_full_disk_at_checkpoint_time_is_one_line_and_the_rerun_resumes(tmp_path):
  full = cli(tmp_path, '--config.epochs=3', limit_file_kb=8)  # Not a checkpoint.
  line = one_line_error(full)
  assert line.startswith(f'mlae_jax: Cannot write the checkpoint after epoch 1 to {tmp_path}/'
                         'checkpoints: File too large. Free disk space')
  assert not (tmp_path / 'results.json').exists()
  again = cli(tmp_path, '--config.epochs=3')
  assert again.returncode == 0, again.stderr[-2000:]
  assert run_files.results_complete(str(tmp_path))


def test_a_write_error_at_export_time_is_named_and_the_rerun_finishes(tmp_path, monkeypatch):
  import mlae_jax.training.recorder as recorder_module

  def no_space(path, model, params):
    raise OSError(errno.ENOSPC, 'No space left on device', path)

  with monkeypatch.context() as patched:
    patched.setattr(recorder_module, 'export_merged', no_space)
    with pytest.raises(OutputWriteError, match=r'Cannot write .*export.partial/merged.npz '
                                               r'\(No space left on device\).*training is '
                                               r'checkpointed'):
      train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  assert not (tmp_path / 'results.json').exists()
  started = time.time()
  results = train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  assert (tmp_path / 'export' / 'merged.npz').exists() and results['evaluated_epochs'] == [1, 2]
  assert [r['epoch'] for r in read_metrics(str(tmp_path)) if r['kind'] == 'train'] == [1, 2]
  assert time.time() - started < 60


# 4. Data faults surface before training; an evaluation failure loses no training.

def test_an_evaluation_failure_loses_no_training(tmp_path, monkeypatch):
  from mlae_jax.data.build import build_task_data
  from mlae_jax.training.train import train_on_task
  config = tiny_config(epochs=3, eval_every_epochs=2, checkpoint_every_epochs=1)
  data = build_task_data(config.data)
  calls = []

  def failing_second_time(batch_size):
    calls.append(batch_size)
    if len(calls) == 2:
      raise OSError(errno.EIO, 'Input/output error', 'test.txt')
    return data.eval_batches(batch_size)

  import dataclasses
  broken = dataclasses.replace(data, eval_batches=failing_second_time)
  with pytest.raises(OSError, match='Input/output error'):
    train_on_task(config, str(tmp_path / 'run'), broken)  # Fails evaluating after epoch 3.
  assert (tmp_path / 'run' / 'checkpoints' / '3').is_dir()  # Epoch 3's training is kept.
  results = train_on_task(config, str(tmp_path / 'run'), data)
  straight = train_on_task(config, str(tmp_path / 'straight'), data)
  assert results['evaluated_epochs'] == straight['evaluated_epochs'] == [1, 3]
  assert results['final_epoch_accuracy'] == straight['final_epoch_accuracy']
  assert ([r['loss'] for r in read_metrics(str(tmp_path / 'run'))]
          == [r['loss'] for r in read_metrics(str(tmp_path / 'straight'))])


# 5. Atomic outputs: a broken results.json is not a finished run.

def test_a_truncated_results_file_is_not_a_finished_run(tmp_path):
  results = train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  text = (tmp_path / 'results.json').read_text()
  (tmp_path / 'results.json').write_text(text[:len(text) // 2])
  assert layout.status(str(tmp_path)) == layout.UNFINISHED
  again = train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  assert again['final_epoch_accuracy'] == results['final_epoch_accuracy']
  assert layout.status(str(tmp_path)) == layout.FINISHED


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  write_json(tmp_path / 'results.json', {'a': 1})
  with pytest.raises(ValueError):
    write_json(tmp_path / 'results.json', {'a': float('nan')})  # Not JSON: refused.
  with pytest.raises(TypeError):
    write_json(tmp_path / 'results.json', {'a': object()})
  assert json.loads((tmp_path / 'results.json').read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['results.json']


# 6. Shape and type faults up front; OS faults and misspellings at the CLI in one line.

@pytest.mark.parametrize('field, value, message', [
    ('model.num_heads', 5, 'config.model.num_heads = 5: must divide the hidden size 32'),
    ('model.patch_size', 0, 'config.model.patch_size = 0: must be an integer >= 1'),
    ('data.image_size', 30, 'config.data.image_size = 30: must be a multiple of the patch size 8'),
    ('data.num_classes', 1, 'config.data.num_classes = 1: must be an integer >= 2'),
    ('progress_bar', None, 'config.progress_bar = None: must be True or False'),
])
def test_shapes_that_cannot_work_fail_before_anything_is_built(field, value, message, tmp_path):
  config = tiny_config(**{field: value}, epochs=1)
  with pytest.raises(ValueError) as error:
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert message in str(error.value)
  assert not (tmp_path / 'run').exists()


def test_api_arguments_of_the_wrong_type_are_named():
  with pytest.raises(ValueError, match="rank must be an integer >= 1 .*got '8'"):
    Mlae(rank='8')
  with pytest.raises(ValueError, match="adaptive_coeff must be True or False, got 'yes'"):
    Mlae(adaptive_coeff='yes')
  with pytest.raises(ValueError, match="coeff_init must be a finite number, got '1'"):
    Mlae(coeff_init='1')
  with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got '10'"):
    create_model('ViT-B_16', '10')
  with pytest.raises(ValueError, match='num_heads 5 does not divide hidden_size 768'):
    create_model('ViT-B_16', 10, num_heads=5)
  with pytest.raises(ValueError, match='image_size 30 is not a multiple of the patch size 8'):
    from mlae_jax.checkpoints import init_params
    init_params(tiny_model(), jax.random.key(0), image_size=30)
  with pytest.raises(TypeError, match='must be an ml_collections.ConfigDict'):
    train_and_evaluate({'epochs': 1}, '/tmp/never')
  with pytest.raises(TypeError, match='A workdir must be a path, got None'):
    train_and_evaluate(tiny_config(), None)


def test_the_cli_turns_os_faults_into_one_line(tmp_path):
  (tmp_path / 'file').write_text('')
  cases = {
      str(tmp_path / 'file'): f'Workdir {tmp_path}/file is a file, not a folder',
      str(tmp_path / 'file' / 'run'): f'Cannot create workdir {tmp_path}/file/run: Not a '
                                      'directory',
      '/proc/mlae_jax/run': 'Cannot create workdir /proc/mlae_jax/run: No such file or directory',
  }
  for workdir, message in cases.items():
    assert message in one_line_error(cli(workdir)), workdir


def test_the_cli_names_missing_config_files_and_the_nearest_field(tmp_path):
  assert "Cannot load config file 'configs/vtabb.py': no such file" in one_line_error(
      cli(tmp_path, config='configs/vtabb.py:svhn'))
  assert ('Unknown config field config.adapter.mlae.drop_rat (in '
          '--config.adapter.mlae.drop_rat=0.3); did you mean config.adapter.mlae.drop_rate?'
          ) in one_line_error(cli(tmp_path, '--config.adapter.mlae.drop_rat=0.3'))
  assert 'did you mean config.adapter.mlae.rank?' in one_line_error(
      cli(tmp_path, '--config.adapter.mlea.rank=2'))
  assert "config.adapter.method = 'dora': use one of ('mlae', 'lora'" in one_line_error(
      cli(tmp_path, '--config.adapter.method=dora'))
  assert "flag --config.learning_rate=fast: could not convert string to float: 'fast'" in (
      one_line_error(cli(tmp_path, '--config.learning_rate=fast')))
  assert "Unknown VTAB-1k task 'svhm'" in one_line_error(
      cli(tmp_path, config='configs/vtab.py:svhm'))
  assert not os.listdir(tmp_path)


# 7. The README's commands work after the README's install.

def test_the_results_command_needs_nothing_beyond_the_install():
  import ast
  with open(os.path.join(REPO, 'setup.py')) as f:
    tree = ast.parse(f.read())
  call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, 'id', '') == 'setup')
  required = next(k.value for k in call.keywords if k.arg == 'install_requires')
  names = {ast.literal_eval(item).split('>')[0].split('=')[0] for item in required.elts}
  assert 'matplotlib' in names  # mlae_jax.sweeps.report draws the README's results plot.
