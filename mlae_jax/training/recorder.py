"""Everything a run reads from and writes into its workdir while it trains, in one place:
the config record, metrics, checkpoints, exports and results.

Only the process that owns the workdir uses a recorder (process 0 of a job of several
processes, through `parallel.on_primary`; the only process otherwise), so each file is
written once, by one process, and a workdir on a host's own disk works as well as one on
a shared disk. Creating one touches nothing: the files are opened on first use.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from mlae_jax.data.task_data import TaskData
from mlae_jax.export import export_adapters, export_merged
from mlae_jax.files import write_json
from mlae_jax.model.vit import VisionTransformer
from mlae_jax.training import workdir as run_files
from mlae_jax.training.checkpointing import RunCheckpoints
from mlae_jax.training.errors import OutputWriteError
from mlae_jax.training.metrics import MetricsLog
from mlae_jax.training.steps import TrainState


class RunRecorder:
  """The files of one workdir."""

  def __init__(self, workdir: str, keep_checkpoints: int):
    self.workdir = workdir
    self.checkpoint_dir = os.path.join(workdir, run_files.CHECKPOINT_DIR)
    self._keep = keep_checkpoints
    self._checkpoints: RunCheckpoints | None = None
    self._log: MetricsLog | None = None

  @property
  def checkpoints(self) -> RunCheckpoints:
    if self._checkpoints is None:
      self._checkpoints = RunCheckpoints(self.checkpoint_dir, self._keep)
    return self._checkpoints

  def restore_latest(self, template: TrainState) -> tuple[int, TrainState, dict] | None:
    """The newest intact checkpoint, restored like `template` (see RunCheckpoints)."""
    return self.checkpoints.restore_latest(template)

  def begin(self, config: ml_collections.ConfigDict, changes: Mapping[str, Any],
            records: Iterable[dict[str, Any]]) -> None:
    """Records the config (and allowed changes) and rewrites metrics.jsonl from the
    restored history, once the run has resumed."""
    try:
      run_files.record_config(self.workdir, config, changes)
      self._log = MetricsLog(self.workdir)
      self._log.reset(records)
    except OSError as error:
      raise OutputWriteError(
          f'Cannot write the run\'s records ({run_files.CONFIG_FILE}, metrics) in '
          f'{self.workdir} ({error.strerror or error}). Free disk space or fix the folder, '
          'then re-run the same command.') from error

  def log(self, record: dict[str, Any]) -> None:
    """Appends a train or eval record to metrics.jsonl and TensorBoard."""
    if self._log is None:
      raise RuntimeError('RunRecorder.begin comes before log.')
    self._log.write(record)

  def save(self, epoch: int, state: TrainState, history: dict[str, list]) -> None:
    """Checkpoints the state and history after `epoch` completed epochs."""
    self.checkpoints.save(epoch, state, history)

  def finish(self, config: ml_collections.ConfigDict, record: dict[str, Any],
             model: VisionTransformer, params: Any, data: TaskData,
             image_size: int) -> list[dict[str, Any]]:
    """Writes the exports, then results.json (the mark of a finished run), with the
    config changes recorded in the workdir added to `record`; returns those changes."""
    record['config_changes'] = run_files.recorded_changes(self.workdir)
    self._export(config, model, params, data, image_size)
    _write_output(os.path.join(self.workdir, run_files.RESULTS_FILE),
                  lambda path: write_json(path, record))
    return record['config_changes']

  def _export(self, config: ml_collections.ConfigDict, model: VisionTransformer, params: Any,
              data: TaskData, image_size: int) -> None:
    """Writes the exports into a partial folder, then puts it in place of export/: never
    a mix of two runs' files."""
    final = os.path.join(self.workdir, run_files.EXPORT_DIR)
    partial = final + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    extra = {'task': data.name, 'image_size': image_size, 'mean': list(data.mean),
             'std': list(data.std), 'pretrained': config.pretrained}
    _write_output(partial, lambda path: export_adapters(path, model, params, extra))
    if config.export_merged and model.adapter.MERGEABLE:
      _write_output(os.path.join(partial, 'merged.npz'),
                    lambda path: export_merged(path, model, params))
    if not os.path.isdir(partial):
      return
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)

  def close(self) -> None:
    for handle in (self._log, self._checkpoints):
      if handle is not None:
        handle.close()


def _write_output(path: str, write: Callable[[str], None]) -> None:
  """Writes one output file; a failure is an OutputWriteError naming it."""
  try:
    write(path)
  except OSError as error:
    raise OutputWriteError(
        f'Cannot write {path} ({error.strerror or error}). Free disk space or fix the folder, '
        'then re-run the same command: training is checkpointed and is not repeated.') from error
