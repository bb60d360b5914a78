"""Run metrics: JSON lines and TensorBoard events in the workdir."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Iterable

# TensorBoard's record format written with its pure-Python record writer on a plain
# file: training never loads TensorFlow (its EventFileWriter would, via tf.io.gfile).
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from mlae_jax.training.workdir import METRICS_FILE


class MetricsLog:
  """Appends one JSON object per line to `metrics.jsonl` and mirrors the scalars to
  TensorBoard. `reset` rewrites the file from a restored history, so a resumed run
  has no records from epochs it repeats."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, METRICS_FILE)
    directory = os.path.join(workdir, 'tensorboard')
    os.makedirs(directory, exist_ok=True)
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}'
    self._tensorboard = RecordWriter(open(os.path.join(directory, name), 'wb'))
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def reset(self, records: Iterable[dict[str, Any]]) -> None:
    with open(self.path, 'w') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    values = [summary_pb2.Summary.Value(tag=f'{record["kind"]}/{name}', simple_value=value)
              for name, value in record.items()
              if name not in ('step', 'epoch', 'kind') and isinstance(value, (int, float))]
    self._write_event(event_pb2.Event(wall_time=time.time(), step=record['step'],
                                      summary=summary_pb2.Summary(value=values)))

  def _write_event(self, event: event_pb2.Event) -> None:
    self._tensorboard.write(event.SerializeToString())
    self._tensorboard.flush()

  def close(self) -> None:
    self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def logged_evaluations(workdir: str, up_to_epoch: int) -> list[dict[str, Any]]:
  """The evaluation records of `metrics.jsonl` up to `up_to_epoch` (lines cut short by a
  crash skipped): a checkpoint is written before its epoch's evaluation, so the log
  holds evaluations its history cannot."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if (isinstance(record, dict) and record.get('kind') == 'eval'
          and isinstance(record.get('epoch'), int) and record['epoch'] <= up_to_epoch):
        records.append(record)
  return records
