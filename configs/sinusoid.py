"""Sinusoid regression (Finn et al., 2017, sec. 5.1), the gradient-agreement paper's first benchmark.

    python scripts/train.py --config=configs/sinusoid.py               # the default job (no --config)
    python scripts/train.py --config=configs/sinusoid.py:paper --config.aggregator=mean

Tasks ``a sin(x + phi)``, ``a ~ U[0.1, 5]``, ``phi ~ U[0, 2 pi]``, ``x ~ U[-5, 5]``; K = 10 support and
10 query points; MLP 1-64-64-1 from PyTorch's default initialisation (README, "Initialisation");
MAML's inner loop, 5 steps at 0.01 (evaluation adapts the same way); meta-batch 25; Adam 1e-3;
gradient agreement on the updates themselves. Protocols (the part after the colon):

  default     10,000 meta-steps, 1,000 evaluation tasks: the README's main table and the default job
              (``gajax.config.TrainConfig``'s defaults, field for field).
  paper       70,000 meta-steps, MAML's schedule (the paper gives none), progress every 1,000.
  corruption  meta-batch 10, 2,000 meta-steps, 500 evaluation tasks: the corrupted-batch grid
              (``scripts/corruption_benchmark.py``).
"""

import ml_collections
from ml_collections import config_dict

from gajax.config import TrainConfig

PROTOCOLS = {
    "default": {},
    "paper": {"num_iterations": 70_000, "log_every": 1000},
    "corruption": {"meta_batch_size": 10, "num_iterations": 2000, "eval_tasks": 500},
}


def get_config(protocol: str = "default") -> ml_collections.ConfigDict:
  """The settings of ``protocol`` (see the module docstring), every field of ``TrainConfig``."""
  protocol = protocol or "default"
  if protocol not in PROTOCOLS:
    raise ValueError(f"configs/sinusoid.py has no protocol {protocol!r}; choose one of "
                     f"{', '.join(PROTOCOLS)}.")
  config = ml_collections.ConfigDict(TrainConfig(task="sinusoid", **PROTOCOLS[protocol]).to_dict())
  for name in ("eval_queries", "eval_inner_steps"):
    if config[name] is None:  # None: the task's default; typed, so that it can be overridden
      config[name] = config_dict.placeholder(int)
  return config
