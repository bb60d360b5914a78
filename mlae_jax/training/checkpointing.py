"""Orbax checkpoints of a run: the trained subtree, optimizer state and history.

The frozen backbone is not saved (it is the pre-trained file), so a ViT-B/16
checkpoint holds about 1 MB of adapters and head instead of 330 MB.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mlae_jax.training.steps import TrainState


class RunCheckpoints:
  """Saves after whole epochs (the checkpoint's number is the epochs completed) and
  restores the latest one."""

  def __init__(self, directory: str, keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def save(self, epoch: int, state: TrainState, history: dict[str, Any]) -> None:
    self._manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_as_tree(state)), history=ocp.args.JsonSave(history)))
    self._manager.wait_until_finished()

  def restore(self, epoch: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The state saved after `epoch`, shaped and placed like `template`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(template))
    restored = self._manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
    tree = restored['state']
    return TrainState(tree['step'], tree['trainable'], tree['opt_state']), restored['history']

  def close(self) -> None:
    self._manager.close()


def _as_tree(state: TrainState) -> dict[str, Any]:
  return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}
