"""Meta-learning algorithms: each maps ``(params, support, query)`` of ONE task to that task's update.

Every algorithm returns a :class:`MetaLearner`, a frozen dataclass that is itself the pure function
``(params, support, query) -> update``. An *update* is gradient-like: the outer loop descends along
it (``optax.sgd``, ``optax.adam``, ...), so MAML's update is the query meta-gradient and Reptile's is
the displacement ``theta - theta_i``. Batch over tasks with :func:`per_task`. One algorithm per
module: :mod:`~gajax.algorithms.maml` (MAML, FOMAML, Meta-SGD), :mod:`~gajax.algorithms.reptile`,
:mod:`~gajax.algorithms.anil` (ANIL: only the head adapts), :mod:`~gajax.algorithms.imaml` (implicit
gradients), :mod:`~gajax.algorithms.maml_plus_plus` (MAML++'s LSLR, multi-step loss, derivative-order
annealing).

``support`` and ``query`` are arbitrary pytrees handed unchanged to ``loss_fn(params, batch)``.
Every algorithm takes ``fast_ops=True`` (the default): ``loss_fn`` is wrapped in
:func:`gajax.fast_ops.batchable`, which computes its convolutions as patch matrix products and its
non-overlapping max-pools as reshapes, the forms that stay fast when ``per_task`` batches per-task
parameters (any Flax ``linen.Conv`` / ``nnx.Conv`` model; same function to float rounding);
``fast_ops=False`` keeps the program as written.
"""

from gajax.algorithms.anil import anil
from gajax.algorithms.core import LossFn, MetaLearner, TaskAux, per_task
from gajax.algorithms.maml import MetaSGDParams, fomaml, maml, meta_sgd, meta_sgd_init
from gajax.algorithms.imaml import imaml
from gajax.algorithms.maml_plus_plus import (MAMLPlusPlusParams, maml_plus_plus, maml_plus_plus_init,
                                            msl_importance)
from gajax.algorithms.reptile import reptile
