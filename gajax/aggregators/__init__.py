"""Aggregators: optax transformations that turn stacked per-task updates ``[T, ...]`` into one update.

Use them first in an ``optax.chain``::

    tx = optax.chain(gajax.aggregators.gradient_agreement(), optax.adam(1e-3))
"""

from gajax.aggregators._base import gramian, num_tasks, weighted_sum
from gajax.aggregators.gradient_agreement import AgreementState, agreement_weights, gradient_agreement
from gajax.aggregators.mean import mean, sum  # pylint: disable=redefined-builtin
from gajax.aggregators.skip_nonfinite import SkipNonfiniteState, finite_tasks, skip_nonfinite_tasks
