r"""Fine-tunes a ViT with MLAE on one task.

  python -m mlae_jax.main --config=configs/vtab.py:svhn --workdir=runs/svhn \
      --config.mlae.drop_rate=0.3

Re-running the same command resumes from the latest checkpoint in the workdir.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mlae_jax.checkpoints.download import CheckpointDownloadError
from mlae_jax.training.train import train_with_baselines

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Libraries' INFO chatter; --verbosity=0 shows it.
  try:
    runs = train_with_baselines(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, CheckpointDownloadError) as error:
    sys.exit(f'mlae_jax: {error}')  # Bad input: the message says what to fix.
  first = next(iter(runs.values()))
  print(f'{first["task"]}: {_CONFIG.value.data.eval_split} accuracy on {first["num_eval"]} '
        f'images; results in {_WORKDIR.value}')
  print(f'{"method":14s}{"trained params":>16s}{"final epoch":>13s}{"best of evals":>15s}')
  for name, results in runs.items():
    print(f'{name:14s}{results["trainable_params"]:16,d}{results["final_epoch_accuracy"]:13.4f}'
          f'{results["best_of_evaluations_accuracy"]:15.4f}')


if __name__ == '__main__':
  app.run(main)
