"""A run's working directory: its settings guard, its lock, and files written whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

from gajax.config import TrainConfig

# Settings that may change when a run is resumed: they do not change what the meta-steps compute.
RESUMABLE_CHANGES = ("num_iterations", "eval_tasks", "eval_every", "eval_queries", "eval_inner_steps",
                     "log_every", "data_dir", "num_devices", "conv_impl")


def prepare_workdir(config: TrainConfig, workdir: str, overwrite: bool = False) -> None:
  """Creates ``workdir`` or checks that the run it holds used compatible settings.

  Raises:
    ValueError: the workdir holds a run whose settings differ in anything but
      :data:`RESUMABLE_CHANGES` (and ``overwrite`` is false).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if overwrite:
    for name in ("metrics.jsonl", "eval.json", "config.json"):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = config.to_dict()
    # A setting added after the run was written (absent from its config.json) had its default then.
    defaults = TrainConfig().to_dict()
    diff = [k for k in sorted(set(old) | set(new))
            if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new.get(k)]
    if diff:
      detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
      raise ValueError(f"{workdir} holds a run with other settings ({detail}); use another "
                       "workdir or overwrite it.")
  atomic_write(path, json.dumps(config.to_dict(), indent=2))


def load_config(workdir: str) -> TrainConfig:
  """The config of the run in ``workdir`` (its ``config.json``), not yet validated.

  Raises:
    FileNotFoundError: there is no ``config.json``.
    ValueError: it holds an unknown field or a value of the wrong type.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; is {workdir} a training workdir?")
  with open(path) as f:
    return TrainConfig.from_dict(json.load(f))


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on ``workdir`` for one run; a second run on it is refused at once.

  An ``flock`` on ``<workdir>/lock``: the operating system drops it when the holding process ends,
  however it ends, so a run killed with SIGKILL leaves nothing that blocks the resume that follows.

  Raises:
    ValueError: another live process holds the workdir (its pid is in the message).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "lock")
  handle = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      raise ValueError(f"{workdir} is in use by another run (pid {holder}); wait for it to finish or "
                       "use another workdir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    yield
  finally:
    handle.close()  # releases the lock


def atomic_write(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename: an interrupted write leaves
  the old file (or none), never half of the new one."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
