"""gajax.tasks.images: on-device few-shot tasks from a reader's ClassImages, end to end through the
config, on a generated mini-ImageNet in the pickled layout (this machine has none of the real sets).

The generated images carry a class signal (each class its own colour pattern plus noise), so a short
MAML run must get far above chance; the samplers must draw distinct classes and images, keep the splits
apart, scale uint8 to [0, 1] and reproduce from their keys.
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gajax.config import TrainConfig
from gajax.tasks import images as image_tasks
from gajax.train import train_and_evaluate

SIZE, PER_CLASS = 16, 20
CLASSES = {"train": 8, "validation": 5, "test": 6}


def _split(rng, name, classes):
  patterns = rng.integers(40, 216, (classes, 1, SIZE, SIZE, 3))
  noise = rng.integers(-40, 41, (classes, PER_CLASS, SIZE, SIZE, 3))
  data = (patterns + noise).astype(np.uint8).reshape(-1, SIZE, SIZE, 3)
  order = rng.permutation(len(data))  # rows of the pickle in a shuffled order, as the real ones
  inverse = np.argsort(order)
  class_dict = {f"n{name[:2]}{c:05d}": [int(i) for i in inverse[c * PER_CLASS:(c + 1) * PER_CLASS]]
                for c in range(classes)}
  return {"image_data": data[order], "class_dict": class_dict}


@pytest.fixture(scope="module")
def mini_imagenet(tmp_path_factory):
  root = tmp_path_factory.mktemp("mini")
  rng = np.random.default_rng(0)
  for name, classes in CLASSES.items():
    with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
      pickle.dump(_split(rng, name, classes), f, protocol=4)
  return root


def _task(root, tmp_path, **kw):
  loader = {"image_size": SIZE, "expected_classes": None, "expected_images": PER_CLASS}
  return image_tasks.make_task("mini_imagenet", data_dir=str(root), cache_dir=tmp_path / "cache",
                               loader_kwargs=loader, **kw)


def test_sampled_tasks_have_distinct_classes_and_images_and_reproduce(mini_imagenet, tmp_path):
  task = _task(mini_imagenet, tmp_path, ways=3, shots=2, queries=4)
  key = jax.random.PRNGKey(0)
  support, query = task.sample(key, 7, task.train_data)
  assert support["x"].shape == (7, 6, SIZE, SIZE, 3) and query["x"].shape == (7, 12, SIZE, SIZE, 3)
  assert support["x"].dtype == jnp.float32 and 0 <= float(support["x"].min()) <= float(support["x"].max()) <= 1
  np.testing.assert_array_equal(support["y"][0], [0, 0, 1, 1, 2, 2])
  again = task.sample(key, 7, task.train_data)
  np.testing.assert_array_equal(support["x"], again[0]["x"])
  # uint8 / 255 exactly, and every image of a task is a distinct image of the split.
  train = np.asarray(task.train_data).reshape(-1, SIZE, SIZE, 3)
  lookup = {im.tobytes(): i for i, im in enumerate(train)}
  for t in range(7):
    drawn = np.concatenate([support["x"][t], query["x"][t]]) * 255.0
    assert np.allclose(drawn, np.round(drawn), atol=1e-3)
    ids = [lookup[np.round(im).astype(np.uint8).tobytes()] for im in drawn]
    assert len(set(ids)) == len(ids)
    # Support and query of one label come from one class; the labels' classes are distinct.
    classes = [{i // PER_CLASS for i, y in zip(ids, np.concatenate([support["y"][t], query["y"][t]]))
                if y == label} for label in range(3)]
    assert all(len(c) == 1 for c in classes) and len(set.union(*classes)) == 3


def test_train_and_test_splits_are_disjoint_and_shapes_checked(mini_imagenet, tmp_path):
  task = _task(mini_imagenet, tmp_path, ways=3, shots=1, queries=2)
  train = {im.tobytes() for im in np.asarray(task.train_data).reshape(-1, SIZE, SIZE, 3)}
  test = {im.tobytes() for im in np.asarray(task.eval_data).reshape(-1, SIZE, SIZE, 3)}
  assert task.eval_data.shape[0] == CLASSES["test"] and not train & test
  with pytest.raises(ValueError, match="ways=9 exceeds the 8 classes of the mini_imagenet train split"):
    _task(mini_imagenet, tmp_path, ways=9)
  with pytest.raises(ValueError, match="shots \\+ queries = 21 exceeds the 20 images per class"):
    _task(mini_imagenet, tmp_path, ways=2, shots=1, queries=20)
  with pytest.raises(ValueError, match="data_dir is required"):
    image_tasks.make_task("mini_imagenet", data_dir="")


def test_short_maml_run_learns_the_class_signal(mini_imagenet, tmp_path, monkeypatch):
  # Through the config and the one training loop, as scripts/train.py runs it (tiny Conv-4).
  real = image_tasks.make_task
  monkeypatch.setattr(image_tasks, "make_task", lambda *a, **kw: real(
      *a, **kw, cache_dir=tmp_path / "cache",
      loader_kwargs={"image_size": SIZE, "expected_classes": None, "expected_images": PER_CLASS}))
  config = TrainConfig(task="mini_imagenet", data_dir=str(mini_imagenet), ways=3, shots=1, queries=3,
                       meta_batch_size=4, inner_steps=1, inner_lr=0.1, conv_filters=8,
                       conv_downsample="pool", aggregator="mean", outer_lr=3e-3, num_iterations=40,
                       eval_tasks=40, log_every=40).validate()
  out = train_and_evaluate(config, str(tmp_path / "run"), print_fn=lambda *a, **k: None)
  # Chance is 1/3; the classes' colour patterns make the unseen test classes easy after adaptation.
  assert out["metric"] == "accuracy" and out["mean"] > 0.65, out


def test_maml_plus_plus_bnwb_runs_and_learns_one_batch_norm_per_step(mini_imagenet, tmp_path,
                                                                     monkeypatch):
  from gajax import meta  # pylint: disable=import-outside-toplevel
  from gajax.train import make_experiment, seed_keys  # pylint: disable=import-outside-toplevel
  real = image_tasks.make_task
  monkeypatch.setattr(image_tasks, "make_task", lambda *a, **kw: real(
      *a, **kw, cache_dir=tmp_path / "cache",
      loader_kwargs={"image_size": SIZE, "expected_classes": None, "expected_images": PER_CLASS}))
  config = TrainConfig(task="mini_imagenet", data_dir=str(mini_imagenet), ways=2, shots=1, queries=2,
                       meta_batch_size=2, inner_steps=2, inner_lr=0.1, conv_filters=4,
                       conv_downsample="pool", algorithm="maml++", bnwb=True, lslr=True,
                       aggregator="mean", eval_tasks=4, num_devices=1).validate()
  exp = make_experiment(config)
  state = exp.init(seed_keys(0)[0])
  scale = state.params.per_step["params"]["BatchStatNorm_0"]["scale"]
  assert scale.shape == (2, 4) and np.allclose(scale[0], scale[1])
  assert state.params.params["params"]["BatchStatNorm_0"]["scale"] is None
  new, metrics = jax.jit(meta.make_block(exp.step, 2))(state, exp.task.train_data)
  assert np.all(np.isfinite(metrics["query_loss"]))
  scale = np.asarray(new.params.per_step["params"]["BatchStatNorm_0"]["scale"])
  assert not np.allclose(scale[0], scale[1])  # each step's copy learns its own values
  values = jax.jit(exp.evaluate)(new.params, seed_keys(0)[1], exp.task.eval_data)
  assert values.shape == (4,) and np.all(np.isfinite(values))
