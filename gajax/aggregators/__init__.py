"""Aggregators: optax transformations that turn stacked per-task updates ``[T, ...]`` into one update.

Use them first in an ``optax.chain``::

    tx = optax.chain(gajax.aggregators.gradient_agreement(), optax.adam(1e-3))

Every aggregator takes a pytree whose leaves share a leading task axis ``T >= 1`` and returns a
parameter-shaped update. Methods that only need the ``T x T`` Gramian also expose their *weighting*
(``<name>_weights(gramian) -> [T]``). ``get(name, **kwargs)`` and ``names()`` give them by name.
"""

from gajax.aggregators._base import gramian, num_tasks, weighted_sum
from gajax.aggregators.aligned_mtl import aligned_mtl, aligned_mtl_weights
from gajax.aggregators.and_mask import and_mask
from gajax.aggregators.cagrad import cagrad, cagrad_weights
from gajax.aggregators.dualproj import dualproj, dualproj_weights
from gajax.aggregators.graddrop import GradDropState, graddrop
from gajax.aggregators.gradient_agreement import (AgreementState, agreement_weights, cosine_agreement,
                                                 cosine_agreement_weights, gradient_agreement)
from gajax.aggregators.gradvac import GradVacState, gradvac
from gajax.aggregators.imtl_g import imtl_g, imtl_g_weights
from gajax.aggregators.krum import krum, krum_weights
from gajax.aggregators.mean import mean, sum  # pylint: disable=redefined-builtin
from gajax.aggregators.mgda import mgda, mgda_weights
from gajax.aggregators.nash_mtl import nash_mtl, nash_mtl_weights
from gajax.aggregators.pcgrad import PCGradState, pcgrad, pcgrad_weights
from gajax.aggregators.random import random, random_weights  # pylint: disable=redefined-builtin
from gajax.aggregators.registry import get, names
from gajax.aggregators.skip_nonfinite import SkipNonfiniteState, finite_tasks, skip_nonfinite_tasks
from gajax.aggregators.state import skipped_tasks, task_weights, with_key
from gajax.aggregators.trimmed_mean import trimmed_mean
from gajax.aggregators.upgrad import upgrad, upgrad_weights
