"""Seed s of a run vmapped over seeds is the single run with seed=s, random aggregators included.

Both go through the one training loop (gajax.train.train): ``run_seeds`` with seeds [0, 1] and
``train_and_evaluate`` with seed 1, each writing metrics.jsonl; every logged step of seed 1 must
agree. Seed 1 is the telling one: a stream built from the config's seed (0) would match seed 0 only.
"""

import dataclasses
import json

import numpy as np
import pytest

from gajax.train import TrainConfig, run_seeds, train_and_evaluate


def logged(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("aggregator", ["random", "graddrop"])
def test_vmapped_seed_equals_the_single_run_with_that_seed(aggregator, tmp_path):
  config = TrainConfig(aggregator=aggregator, meta_batch_size=4, inner_steps=1, num_devices=1,
                       num_iterations=4, log_every=4, eval_tasks=10)
  quiet = lambda *a, **k: None
  many = run_seeds(config, [0, 1], workdir=str(tmp_path / "seeds"), print_fn=quiet)
  single = train_and_evaluate(dataclasses.replace(config, seed=1), str(tmp_path / "one"),
                              print_fn=quiet)
  stacked_rows = logged(tmp_path / "seeds" / "metrics.jsonl")
  single_rows = logged(tmp_path / "one" / "metrics.jsonl")
  assert [r["step"] for r in stacked_rows] == [r["step"] for r in single_rows] == [1, 2, 3, 4]
  for s_row, row in zip(stacked_rows, single_rows):
    for name in ("query_loss", "support_loss", "update_norm"):
      np.testing.assert_allclose(s_row[name][1], row[name], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(many["per_seed"][1], single["mean"], rtol=1e-5)
  # and the two seeds' streams differ (they are not shared)
  assert stacked_rows[0]["query_loss"][0] != stacked_rows[0]["query_loss"][1]
