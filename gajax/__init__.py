"""gajax: gradient-based meta-learning in JAX, with gradient agreement as an optax transformation.

    tx = optax.chain(gajax.aggregators.gradient_agreement(), optax.adam(1e-3))
    learner = gajax.algorithms.maml(loss_fn, inner_steps=5, inner_lr=0.01)
    updates = gajax.per_task(learner)(params, supports, queries)      # leading task axis T
    u, opt_state = tx.update(updates, opt_state, params)
"""

from gajax import aggregators, algorithms, diagnostics, meta, models, tasks
from gajax.adaptation import adapt
from gajax.fast_ops import batchable
from gajax.config import TrainConfig
from gajax.algorithms import MetaLearner, MetaSGDParams, TaskAux, fomaml, maml, meta_sgd, per_task, reptile
from gajax.meta import MetaState, init_state, make_block, make_evaluate, make_meta_step, mean_ci95

__version__ = "0.1.0"
