"""The book's binary toy: logistic regression on 50-dimensional linearly separable tasks.

    python scripts/train.py --config=configs/binary.py --config.aggregator=mean

K = 10 support and 10 query points per task (100 at evaluation), MAML's inner loop with 5 steps at
0.01, meta-batch 25, Adam 1e-3, 10,000 meta-steps; metric: query accuracy after adaptation.
"""

import ml_collections
from ml_collections import config_dict

from gajax.config import TrainConfig


def get_config(protocol: str = "") -> ml_collections.ConfigDict:
  """The toy's settings (it has one protocol)."""
  if protocol:
    raise ValueError(f"configs/binary.py has no protocols; got {protocol!r}.")
  config = ml_collections.ConfigDict(TrainConfig(task="binary").to_dict())
  for name in ("eval_queries", "eval_inner_steps"):
    if config[name] is None:  # None: the task's default; typed, so that it can be overridden
      config[name] = config_dict.placeholder(int)
  return config
