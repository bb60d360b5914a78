"""The run-time estimate times the run's own steps and counts what the run really does:
its training steps and its evaluation batches (checked against a real run)."""

from mlae_jax.data.build import build_task_data
from mlae_jax.training.estimate import estimate_training
from mlae_jax.training.train import train_on_task
from training_setup import tiny_config


def test_estimate_counts_the_steps_and_evaluations_a_run_makes(tmp_path):
  config = tiny_config(epochs=5)  # 40 examples, batch 16: 3 steps an epoch; eval batch 16.
  data = build_task_data(config.data)
  estimate = estimate_training(config, data, repeats=2)
  results = train_on_task(config, str(tmp_path), data)
  assert estimate.train_steps == 5 * 3
  assert estimate.eval_batches == len(results['evaluated_epochs']) * 3  # 37 images: 3 batches.
  assert estimate.train_step_seconds > 0 and estimate.eval_batch_seconds > 0
  text = estimate.describe()
  assert text.startswith('about ') and 'for 5 epochs on 1 x cpu' in text
  assert f'x {estimate.train_steps:,} training steps' in text
