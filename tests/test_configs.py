"""configs/ as code: every protocol loads, validates and says what the papers say; the library knows
nothing of the command line."""

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from gajax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_of(name, protocol=None):
  module = load(name)
  values = (module.get_config() if protocol is None else module.get_config(protocol)).to_dict()
  return TrainConfig.from_dict(values).validate()


@pytest.mark.parametrize("name", ["sinusoid", "omniglot", "binary"])
def test_every_protocol_loads_and_validates(name):
  module = load(name)
  for protocol in getattr(module, "PROTOCOLS", {"": None}):
    config = config_of(name, protocol)
    assert config.task == name


def test_the_default_job_is_the_dataclass_defaults():
  # `python scripts/train.py` (no --config) must run exactly what it ran before configs existed.
  assert config_of("sinusoid") == TrainConfig()
  assert config_of("sinusoid", "paper").num_iterations == 70_000


@pytest.mark.parametrize("protocol, ways, shots, batch, steps, lr, eval_steps", [
    # MAML (Finn et al., 2017, appendix A.1 and its code), as ../shared/REFERENCE.md states it.
    ("5w1s", 5, 1, 32, 1, 0.4, 3), ("5w5s", 5, 5, 32, 1, 0.4, 3),
    ("20w1s", 20, 1, 16, 5, 0.1, None), ("20w5s", 20, 5, 16, 5, 0.1, None),
])
def test_omniglot_protocols_are_maml_s(protocol, ways, shots, batch, steps, lr, eval_steps):
  c = config_of("omniglot", protocol)
  assert (c.ways, c.shots, c.queries, c.meta_batch_size) == (ways, shots, shots, batch)
  assert (c.inner_steps, c.inner_lr, c.eval_inner_steps) == (steps, lr, eval_steps)
  assert (c.outer_lr, c.optimizer, c.num_iterations, c.eval_tasks) == (1e-3, "adam", 60_000, 600)
  assert (c.conv_downsample, c.split) == ("stride", "maml")
  assert c.conv_head_input == "mean"  # MAML's code averages the last 2x2 map before the head


def test_unknown_protocol_and_fields_are_refused():
  with pytest.raises(ValueError, match="no protocol 'nope'"):
    load("omniglot").get_config("nope")
  with pytest.raises(ValueError, match="unknown config field"):
    TrainConfig.from_dict({"task": "sinusoid", "learning_rate": 1.0})
  with pytest.raises(ValueError, match="inner_steps must be of type int"):
    TrainConfig.from_dict({"inner_steps": 1.5})
  with pytest.raises(ValueError, match="skip_nonfinite must be of type bool"):
    TrainConfig.from_dict({"skip_nonfinite": 1})
  assert TrainConfig.from_dict({"outer_lr": 1}).outer_lr == 1  # an int is a float


def test_overrides_are_typed_even_where_the_default_is_none():
  config = load("omniglot").get_config("5w1s")
  config.eval_queries = 4  # a None default must still take an int
  with pytest.raises(TypeError):
    config.eval_queries = "four"
  assert TrainConfig.from_dict(config.to_dict()).eval_queries == 4


def test_validation_messages_name_fields_not_flags():
  for change in ({"shots": 0}, {"task": "x"}, {"corrupt_fraction": 2.0}, {"signal": "displacement",
                                                                          "algorithm": "reptile"}):
    with pytest.raises(ValueError) as e:
      dataclasses.replace(TrainConfig(), **change).validate()
    assert "--" not in str(e.value)


def test_no_module_of_the_library_imports_absl_or_names_a_flag():
  fields = [f.name for f in dataclasses.fields(TrainConfig)]
  for path in sorted((ROOT / "gajax").rglob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      else:
        names = []
      assert not any(n.split(".")[0] in ("absl", "ml_collections") for n in names), (path, names)
      if isinstance(node, ast.Constant) and isinstance(node.value, str):
        assert not any(f"--{f}" in node.value for f in fields), (path, node.value[:80])


@pytest.mark.parametrize("protocol, shots, batch", [
    (f"{task}_{name}", shots, batch) for task in ("mini_imagenet", "cifar_fs", "fc100")
    for name, shots, batch in (("5w1s", 1, 4), ("5w5s", 5, 2))])
def test_image_protocols_are_maml_s_mini_imagenet_settings(protocol, shots, batch):
  values = load("images").get_config(protocol).to_dict()
  # Without your copy of the data set the config is refused with one line that says so.
  with pytest.raises(ValueError, match="data_dir is required for task="):
    TrainConfig.from_dict(values).validate()
  c = TrainConfig.from_dict({**values, "data_dir": "/your/copy"}).validate()
  assert protocol.startswith(c.task)
  # MAML (Finn et al., 2017, sec. 5.2 and code): 5 steps at 0.01 (10 at test), 15 queries,
  # meta-batch 4 / 2, Conv-4 with 32 filters and max-pooling, flattened head, 600 test tasks.
  assert (c.ways, c.shots, c.queries, c.meta_batch_size) == (5, shots, 15, batch)
  assert (c.inner_steps, c.inner_lr, c.eval_inner_steps) == (5, 0.01, 10)
  assert (c.conv_filters, c.conv_downsample, c.conv_head_input) == (32, "pool", "flatten")
  assert (c.outer_lr, c.optimizer, c.num_iterations, c.eval_tasks) == (1e-3, "adam", 60_000, 600)


def test_bnwb_is_for_maml_plus_plus_on_a_batch_norm_model():
  with pytest.raises(ValueError, match="apply to algorithm='maml\\+\\+' only"):
    TrainConfig(task="omniglot", bnwb=True).validate()
  with pytest.raises(ValueError, match="bnwb needs a model with batch norm"):
    TrainConfig(algorithm="maml++", bnwb=True).validate()
  with pytest.raises(ValueError, match="bnwb learns one copy of batch norm per inner step"):
    TrainConfig(task="omniglot", algorithm="maml++", bnwb=True, eval_inner_steps=3).validate()
  TrainConfig(task="omniglot", algorithm="maml++", bnwb=True).validate()
