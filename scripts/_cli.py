"""What every script does first: refuse stray arguments, and keep absl's and orbax's INFO logs quiet.

Scripts import it as ``import _cli`` (Python puts the script's own folder first on ``sys.path``).
"""

import sys

from absl import flags, logging


def start(argv: list[str]) -> None:
  """Exits with one line on positional arguments; logs WARNING and above unless --verbosity is given."""
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # quiet by default: progress, warnings, the result
    logging.set_verbosity(logging.WARNING)
