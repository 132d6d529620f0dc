"""Few-shot image classification beyond Omniglot: mini-ImageNet, tiered-ImageNet, CIFAR-FS and FC100
(your own copy).

    python scripts/train.py --config=configs/images.py:mini_imagenet_5w1s \
        --config.data_dir=/data/mini-imagenet --config.aggregator=mean

The data sets are not redistributable and gajax does not download them: ``--config.data_dir`` is
required and names the file or folder the reader takes (``gajax.data.mini_imagenet``: Ravi &
Larochelle's ``images/`` + CSVs, or the ``mini-imagenet-cache-*.pkl`` pickles;
``gajax.data.tiered_imagenet``: the folder of Ren et al.'s ``*_images_png.pkl`` + ``*_labels.pkl``;
``gajax.data.cifar_fs``: CIFAR-100's python pickles, for both CIFAR-FS and FC100). The first run decodes each split into the
cache (``$GAJAX_CACHE_DIR`` or ``~/.cache/gajax``).

MAML's mini-ImageNet settings (Finn et al., 2017, sec. 5.2 and their code): Conv-4 with 32 filters,
stride-1 convolutions, batch norm (batch statistics), ReLU and 2x2 max-pooling, the last feature map
flattened into the head; 5 inner steps at 0.01 (10 at evaluation); 15 query images per class; Adam
1e-3; 60,000 meta-steps; meta-batch 4 (1-shot) or 2 (5-shot); 600 evaluation tasks from the test
classes. Protocols (the part after the colon):

  mini_imagenet_5w1s, mini_imagenet_5w5s   84x84x3, 64 / 16 / 20 classes (MAML: 48.70 +- 1.84 and
                                           63.11 +- 0.92; the gradient-agreement paper: 54.80 +- 1.48
                                           and 73.27 +- 0.69).
  tiered_imagenet_5w1s, _5w5s              84x84x3, Ren et al.'s 351 / 97 / 160 classes, drawn on the
                                           host from the memory-mapped cache (MAML did not report
                                           tiered-ImageNet; these are its mini-ImageNet settings).
  cifar_fs_5w1s, cifar_fs_5w5s             32x32x3, Bertinetto et al.'s 64 / 16 / 20 classes.
  fc100_5w1s, fc100_5w5s                   32x32x3, Oreshkin et al.'s 12 / 4 / 4 superclasses.

CIFAR-FS and FC100 take mini-ImageNet's MAML settings unchanged (MAML did not report them); the papers
that introduced them used other backbones.
"""

import ml_collections
from ml_collections import config_dict

from gajax.config import TrainConfig

_MAML = {"ways": 5, "queries": 15, "inner_steps": 5, "inner_lr": 0.01, "eval_inner_steps": 10,
         "conv_downsample": "pool", "conv_head_input": "flatten", "conv_filters": 32,
         "num_iterations": 60_000, "eval_tasks": 600, "eval_every": 2500, "log_every": 500}
_SHOTS = {"5w1s": {"shots": 1, "meta_batch_size": 4}, "5w5s": {"shots": 5, "meta_batch_size": 2}}
PROTOCOLS = {f"{task}_{name}": {"task": task, **_MAML, **shots}
             for task in ("mini_imagenet", "tiered_imagenet", "cifar_fs", "fc100")
             for name, shots in _SHOTS.items()}


def get_config(protocol: str = "mini_imagenet_5w1s") -> ml_collections.ConfigDict:
  """The settings of ``protocol`` (see the module docstring), every field of ``TrainConfig``."""
  protocol = protocol or "mini_imagenet_5w1s"
  if protocol not in PROTOCOLS:
    raise ValueError(f"configs/images.py has no protocol {protocol!r}; choose one of "
                     f"{', '.join(PROTOCOLS)}.")
  config = ml_collections.ConfigDict(TrainConfig(**PROTOCOLS[protocol]).to_dict())
  if config.eval_queries is None:  # None: the task's default; typed, so that it can be overridden
    config.eval_queries = config_dict.placeholder(int)
  return config
