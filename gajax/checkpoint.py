"""Checkpoints of a whole training run with orbax: the :class:`~gajax.meta.MetaState` plus run metadata.

A checkpoint holds the meta-parameters, the full optax state (aggregator and optimiser), the PRNG key,
the step, and where ``metrics.jsonl`` ended when it was taken. Orbax writes each step into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous checkpoint
intact; the last ``max_to_keep`` are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """Saves and restores ``(state, metadata)`` pairs under ``<workdir>/checkpoints/<step>``.

  Saves are synchronous: when :meth:`save` returns, the checkpoint is complete on disk.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, metadata: dict) -> None:
    state = jax.tree_util.tree_map(np.asarray, state)
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(metadata)), force=True)
    self._manager.wait_until_finished()

  def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
    """Restores the checkpoint at ``step`` (default: latest) into the structure of ``like``."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree_util.tree_map(np.asarray, like)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for a structure or shape mismatch
      raise ValueError(f"{self.directory}: the checkpoint at step {step} does not match this run's "
                       f"state ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self._manager.close()
