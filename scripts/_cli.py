"""What every script shares: the ``--config`` flag, one-line errors, and quiet logs.

Scripts import it as ``import _cli`` (Python puts the script's own folder first on ``sys.path``) and
run ``app.run(main, flags_parser=_cli.parse_flags)``.

``--config=configs/omniglot.py:5w1s`` loads a protocol from ``configs/`` (each file's ``get_config``
returns an ``ml_collections.ConfigDict`` holding every field of ``gajax.config.TrainConfig``);
``--config.aggregator=mean`` overrides one field, type-checked. Unknown fields, ill-typed values,
missing files and unknown protocols end the script with one ``error:`` line and a non-zero status.
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from gajax.config import TrainConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS, "sinusoid.py")


def define_config(default: str = DEFAULT_CONFIG, help_text: str = "") -> None:
  """Defines ``--config`` (a file under ``configs/``, ``:protocol`` optional) and its overrides."""
  try:
    config_flags.DEFINE_config_file(
        "config", default,
        help_text or "A protocol under configs/ (path[:protocol]); override one field with "
        "--config.<field>=<value>. Default: configs/sinusoid.py, the default job.",
        lock_config=True)
  except (AttributeError, KeyError) as e:  # an override naming no field is resolved at definition
    sys.exit(f"error: --config override: no such config field {str(e).strip(chr(34) + chr(39))}; "
             f"the fields are {', '.join(TrainConfig.__dataclass_fields__)}.")


def load_config() -> TrainConfig:
  """The validated ``TrainConfig`` of ``--config`` and its overrides; exits with one line if invalid."""
  try:
    values = flags.FLAGS.config.to_dict()
  except (OSError, ValueError, AttributeError, KeyError) as e:
    sys.exit(f"error: --config: {_first_line(e)}")
  try:
    return TrainConfig.from_dict(values).validate()
  except ValueError as e:
    sys.exit(f"error: config: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a flag error (unknown flag, bad value) reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {_first_line(e)}")
  except (OSError, ValueError) as e:  # a config file that fails to load or a protocol it refuses
    sys.exit(f"error: --config: {_first_line(e)}")


def start(argv: list[str]) -> None:
  """Exits with one line on positional arguments; logs WARNING and above unless --verbosity is given."""
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # quiet by default: progress, warnings, the result
    logging.set_verbosity(logging.WARNING)


def _first_line(error: BaseException) -> str:
  """One line from an error: a wrapped traceback's last line, else the message's first lines joined."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    return lines[-1]
  if any("No such file" in line for line in lines):
    return f"no such config file {lines[-2].split(':', 1)[-1].strip() if len(lines) > 1 else ''}"
  return " ".join(lines[:3]) if lines else type(error).__name__
