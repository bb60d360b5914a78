r"""Fine-tunes a ViT with a PEFT method (MLAE by default) on one task.

  python -m mlae_jax.main --config=configs/vtab.py:svhn --workdir=runs/svhn \
      --config.adapter.mlae.drop_rate=0.3
  python -m mlae_jax.main --config=configs/vtab.py:svhn --workdir=runs/svhn_lora \
      --config.adapter.method=lora --config.adapter.lora.targets="('query','value')"

Each method trains with its paper's epochs, learning rate and weight decay unless the
command line sets them (--config.epochs=..., --config.learning_rate=...).

Re-running the same command resumes from the latest intact checkpoint in the workdir.
A problem (bad config, missing file, full disk, diverged training, a workdir holding
another run or in use) ends the command with one line saying what to do.

On several hosts, run the same command on each, with JAX_COORDINATOR_ADDRESS (host:port
of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM / Open MPI):
process 0 writes the workdir; the batch is split over every device of every host.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mlae_jax import cli
from mlae_jax.checkpoints.download import CheckpointDownloadError
from mlae_jax.training import parallel
from mlae_jax.training.errors import RunError
from mlae_jax.training.precision import choose_compute_dtype
from mlae_jax.training.train import train_with_baselines

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
_ALLOW_CHANGES = flags.DEFINE_list(
    'allow_changes', [], 'Config fields a resumed run may change (e.g. epochs, to train a '
    'finished run longer); the change is recorded in the workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Libraries' INFO chatter; --verbosity=0 shows it.
  config = cli.config_value(lambda: _CONFIG.value)
  try:
    parallel.maybe_initialize_distributed()  # Before anything runs on a device.
    precision = choose_compute_dtype(config.model.dtype)
    print(f'Compute dtype {precision.name} ({precision.reason}).', flush=True)
    runs = train_with_baselines(config, _WORKDIR.value, _ALLOW_CHANGES.value)
  except (ValueError, OSError, RunError, CheckpointDownloadError) as error:
    cli.exit_with(error)  # Bad input or a fault (disk, data, divergence): what to do.
  first = next(iter(runs.values()))
  print(f'{first["task"]}: {config.data.eval_split} accuracy on {first["num_eval"]} '
        f'images; results in {_WORKDIR.value}')
  print(f'{"method":14s}{"trained params":>16s}{"final epoch":>13s}{"best of evals":>15s}')
  for name, results in runs.items():
    print(f'{name:14s}{results["trainable_params"]:16,d}{results["final_epoch_accuracy"]:13.4f}'
          f'{results["best_of_evaluations_accuracy"]:15.4f}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
