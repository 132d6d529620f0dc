"""Every setting of a training run, in one typed, validated dataclass.

:class:`TrainConfig` is what the library runs (``gajax.train.make_experiment(config)``); the
benchmark protocols that fill it in live as code under ``configs/`` at the top of the repository
(``configs/omniglot.py:5w1s``, MAML's published settings, and so on), and the scripts load them with
``--config=...`` and override single fields with ``--config.<field>=...``. This module knows nothing of
the command line: its errors name the config's fields.

Validation lives here and only here (:meth:`TrainConfig.validate`); the library functions a config
is turned into check their own arguments, in their own terms.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from gajax import aggregators
from gajax.models import CONV_IMPLS, HEAD_INPUTS, INITS
from gajax.tasks import corruption

# Few-shot image classification read from a researcher's own files (gajax.tasks.images).
IMAGE_TASKS = ("mini_imagenet", "cifar_fs", "fc100", "tiered_imagenet")
CLASSIFICATION_TASKS = ("omniglot",) + IMAGE_TASKS
TASKS = ("sinusoid", "binary") + CLASSIFICATION_TASKS
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "imaml", "maml++")
# Algorithms with an inner displacement theta - theta_i that is not already their update.
DISPLACEMENT_ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "imaml", "maml++")
OUTER_LR_SCHEDULES = ("constant", "cosine")
# MAML++ switches (Antoniou et al., 2019): they apply to algorithm="maml++" only.
MAMLPP_FIELDS = ("lslr", "multi_step_loss", "msl_anneal_steps", "first_order_steps", "bnwb")
# iMAML's settings (Rajeswaran et al., 2019): they apply to algorithm="imaml" only.
IMAML_FIELDS = ("imaml_lambda", "cg_steps", "cg_damping", "imaml_inner_optimizer", "imaml_inner_loop")
IMAML_INNER_OPTIMIZERS = ("sgd", "adam")
IMAML_INNER_LOOPS = ("proximal", "pull_back")  # gajax.algorithms.imaml's inner_loop
SIGNALS = ("self", "displacement")
OPTIMIZERS = ("adam", "sgd")
SPLITS = ("maml", "lake")
DOWNSAMPLES = ("stride", "pool")


def aggregator_names() -> tuple[str, ...]:
  """Names accepted by ``TrainConfig.aggregator``: the registry's, and ``agreement`` for short."""
  return aggregators.names() + ("agreement",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a run. Defaults: the paper's sinusoid setting, sized for ~2 minutes on 2 CPU cores.

  ``configs/sinusoid.py`` is exactly these defaults; ``configs/omniglot.py`` and ``configs/binary.py``
  set the other protocols.
  """
  task: str = "sinusoid"
  algorithm: str = "maml"
  aggregator: str = "agreement"
  signal: str = "self"
  optimizer: str = "adam"
  meta_batch_size: int = 25
  inner_steps: int = 5
  inner_lr: float = 0.01
  outer_lr: float = 1e-3
  adam_eps: float = 1e-8  # optimizer="adam" only: Adam's epsilon (optax's default)
  num_iterations: int = 10_000
  shots: int = 10
  queries: int = 10
  eval_queries: int | None = None  # None: 100 points for sinusoid/binary, `queries` for the others.
  ways: int = 5  # classification tasks only
  data_dir: str = ""  # omniglot: "" means $GAJAX_DATA_DIR; image tasks: required (your copy)
  split: str = "maml"  # omniglot only (image tasks train on train, evaluate on test)
  conv_downsample: str = "stride"  # classification tasks only
  conv_impl: str = "auto"  # classification tasks only: how Conv-4 computes (gajax.models.Conv4.conv)
  conv_head_input: str = "flatten"  # classification only: "mean" is MAML's on Omniglot
  conv_filters: int = 0  # Conv-4's width; 0: the task's (64 on Omniglot, 32 on the image tasks)
  init: str = ""  # the model's initialisation (gajax.models.INITS); "": the task's default
  corrupt_fraction: float = 0.0  # share of every training meta-batch's tasks that is corrupted
  corruption: str = ""  # how (gajax.tasks.corruption.CORRUPTIONS); needed when corrupt_fraction > 0
  eval_tasks: int = 1000
  eval_inner_steps: int | None = None  # None: the training value.
  eval_every: int = 0  # 0: evaluate only at the end.
  log_every: int = 500
  num_devices: int = 0  # shard the task axis over this many devices; 0: all local devices
  skip_nonfinite: bool = True  # drop tasks whose update has NaN/Inf (and log how many)
  seed: int = 0
  imaml_lambda: float = 1.0  # imaml only: the regulariser lam/2 |phi - theta|^2 of the inner problem
  cg_steps: int = 5  # imaml only: conjugate-gradient steps for the implicit meta-gradient
  cg_damping: float = 0.0  # imaml only: mu, CG solves (I + (H + mu I) / lam) u = g; 0: undamped
  imaml_inner_optimizer: str = "sgd"  # imaml only: "sgd" or "adam" at inner_lr on the inner problem
  imaml_inner_loop: str = "proximal"  # imaml only: or "pull_back", the authors' code (imaml's docstring)
  lslr: bool = False  # maml++ only: learned per-layer per-step inner learning rates
  multi_step_loss: bool = False  # maml++ only: query losses after every inner step, annealed weights
  msl_anneal_steps: int = 0  # maml++ only: outer steps over which those weights anneal to the last
  first_order_steps: int = 0  # maml++ only: first order before this outer step, second order after
  bnwb: bool = False  # maml++ only: per-step batch-norm weights and biases (Conv-4 tasks)
  outer_lr_schedule: str = "constant"  # or "cosine": from outer_lr to outer_lr / 100 (MAML++'s CA)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
    """A config from plain values (a ``ConfigDict.to_dict()``, a run's ``config.json``).

    Fields missing from ``values`` take their defaults (a run written before the field existed had
    the default then). Not validated: call :meth:`validate`.

    Raises:
      ValueError: an unknown field, or a value of the wrong type (one line naming the field).
    """
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
      raise ValueError(f"unknown config field(s) {', '.join(unknown)}; the fields are "
                       f"{', '.join(hints)}.")
    for name, value in values.items():
      if not _has_type(value, hints[name]):
        raise ValueError(f"config field {name} must be of type {_type_name(hints[name])}; "
                         f"got {value!r}.")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self) -> "TrainConfig":
    """Returns ``self`` or raises ``ValueError`` with a one-line message naming the bad field."""
    def need(ok, msg):
      if not ok:
        raise ValueError(msg)

    def one_of(name, choices):
      value = getattr(self, name)
      need(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}.")

    one_of("task", TASKS)
    one_of("algorithm", ALGORITHMS)
    one_of("aggregator", aggregator_names())
    one_of("signal", SIGNALS)
    need(self.signal == "self" or self.algorithm in DISPLACEMENT_ALGORITHMS,
         f"signal='displacement' needs one of {', '.join(DISPLACEMENT_ALGORITHMS)} as algorithm (for "
         "reptile the update already is the displacement).")
    one_of("optimizer", OPTIMIZERS)
    one_of("split", SPLITS)
    one_of("conv_downsample", DOWNSAMPLES)
    one_of("conv_impl", CONV_IMPLS)
    one_of("conv_head_input", HEAD_INPUTS)
    need(self.init in INITS + ("",),
         f"init must be one of {', '.join(INITS)} (or empty for the task's default); "
         f"got {self.init!r}.")
    need(math.isfinite(self.corrupt_fraction) and 0 <= self.corrupt_fraction <= 1,
         f"corrupt_fraction must be in [0, 1]; got {self.corrupt_fraction}.")
    kinds = (corruption.REGRESSION_CORRUPTIONS if self.task == "sinusoid"
             else corruption.LABEL_CORRUPTIONS)
    need(self.corrupt_fraction == 0 or self.corruption in kinds,
         f"corruption must be one of {', '.join(kinds)} for task={self.task} when "
         f"corrupt_fraction > 0; got {self.corruption!r}.")
    need(self.corruption in corruption.CORRUPTIONS + ("",),
         f"corruption must be one of {', '.join(corruption.CORRUPTIONS)}; got {self.corruption!r}.")
    need(not (self.init and self.task == "binary"),
         "init applies to the sinusoid MLP and the Conv-4 of the image tasks, not to binary's logistic "
         "regression.")
    need(self.eval_queries is None or self.eval_queries >= 1,
         f"eval_queries must be >= 1; got {self.eval_queries}.")
    need(self.task not in CLASSIFICATION_TASKS or self.ways >= 2, f"ways must be >= 2; got {self.ways}.")
    need(self.task not in IMAGE_TASKS or bool(self.data_dir),
         f"data_dir is required for task={self.task}: point it at your copy of the data set "
         "(README, 'Beyond Omniglot').")
    need(self.conv_filters >= 0, f"conv_filters must be >= 0; got {self.conv_filters}.")
    for name in ("meta_batch_size", "shots", "queries", "eval_tasks", "num_iterations", "log_every"):
      need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}.")
    need(self.aggregator not in ("trimmed_mean", "krum") or self.meta_batch_size >= 3,
         f"aggregator={self.aggregator} needs meta_batch_size >= 3.")
    need(self.inner_steps >= 0, f"inner_steps must be >= 0; got {self.inner_steps}.")
    need(self.algorithm not in ("reptile", "imaml") or self.inner_steps >= 1,
         f"inner_steps must be >= 1 for {self.algorithm}.")
    need(math.isfinite(self.imaml_lambda) and self.imaml_lambda > 0,
         f"imaml_lambda must be a finite number > 0; got {self.imaml_lambda}.")
    need(self.cg_steps >= 1, f"cg_steps must be >= 1; got {self.cg_steps}.")
    need(math.isfinite(self.cg_damping) and self.cg_damping >= 0,
         f"cg_damping must be a finite number >= 0; got {self.cg_damping}.")
    one_of("imaml_inner_optimizer", IMAML_INNER_OPTIMIZERS)
    one_of("imaml_inner_loop", IMAML_INNER_LOOPS)
    need(math.isfinite(self.adam_eps) and self.adam_eps > 0,
         f"adam_eps must be a finite number > 0; got {self.adam_eps}.")
    need(self.optimizer == "adam" or self.adam_eps == TrainConfig.adam_eps,
         f"adam_eps applies to optimizer='adam' only; got optimizer={self.optimizer!r}.")
    one_of("outer_lr_schedule", OUTER_LR_SCHEDULES)
    defaults = TrainConfig()
    for algorithm, fields in (("maml++", MAMLPP_FIELDS), ("imaml", IMAML_FIELDS)):
      changed = [f for f in fields if getattr(self, f) != getattr(defaults, f)]
      need(self.algorithm == algorithm or not changed,
           f"{', '.join(changed)} apply to algorithm={algorithm!r} only; got "
           f"algorithm={self.algorithm!r}.")
    need(not self.bnwb or self.task in CLASSIFICATION_TASKS,
         f"bnwb needs a model with batch norm (a classification task's Conv-4); got task={self.task!r}.")
    need(not self.bnwb or self.inner_steps >= 1, "bnwb needs inner_steps >= 1.")
    for name in ("msl_anneal_steps", "first_order_steps"):
      need(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}.")
    need(not self.multi_step_loss or (self.msl_anneal_steps >= 1 and self.inner_steps >= 1),
         "multi_step_loss needs msl_anneal_steps >= 1 and inner_steps >= 1.")
    need(not self.lslr or self.eval_inner_steps in (None, self.inner_steps),
         "lslr learns one rate per inner step: eval_inner_steps must equal inner_steps (or be unset).")
    need(not self.bnwb or self.eval_inner_steps in (None, self.inner_steps),
         "bnwb learns one copy of batch norm per inner step: eval_inner_steps must equal inner_steps "
         "(or be unset).")
    need(not (self.algorithm == "anil" and self.task == "binary"),
         "algorithm=anil adapts the model's head; binary's logistic regression has no body to share.")
    need(self.eval_inner_steps is None or self.eval_inner_steps >= 0,
         f"eval_inner_steps must be >= 0; got {self.eval_inner_steps}.")
    need(self.num_devices >= 0, f"num_devices must be >= 0; got {self.num_devices}.")
    need(self.eval_every >= 0, f"eval_every must be >= 0; got {self.eval_every}.")
    for name in ("inner_lr", "outer_lr"):
      value = getattr(self, name)
      need(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0; got {value}.")
    need(self.outer_lr > 0, f"outer_lr must be > 0; got {self.outer_lr}.")
    need(self.algorithm != "imaml" or self.imaml_inner_loop != "pull_back"
         or self.inner_lr * self.imaml_lambda <= 1,
         "imaml_inner_loop='pull_back' moves phi a fraction inner_lr * imaml_lambda back towards theta: "
         f"it must be <= 1; got {self.inner_lr} * {self.imaml_lambda}.")
    return self


def _has_type(value: Any, hint: Any) -> bool:
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return any(_has_type(value, h) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is float:  # an int is a float; a bool is neither
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, hint)


def _type_name(hint: Any) -> str:
  args = typing.get_args(hint)
  if args:
    return " or ".join(_type_name(a) for a in args)
  return "None" if hint is type(None) else hint.__name__
