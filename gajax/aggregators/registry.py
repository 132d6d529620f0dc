"""Aggregators by name, for configs and command lines: ``get("pcgrad")``, ``get("trimmed_mean", trim=1)``.

The registry maps each name to a (module, factory) pair and resolves it with ``importlib`` when
asked, but ``gajax.aggregators`` (the package that holds this module) already imports every
aggregator module eagerly, so importing the registry imports every method too.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import jax
import optax

# name -> (module under gajax.aggregators, factory function in it).
_FACTORIES: dict[str, tuple[str, str]] = {
    "sum": ("mean", "sum"),
    "mean": ("mean", "mean"),
    "gradient_agreement": ("gradient_agreement", "gradient_agreement"),
    "cosine_agreement": ("gradient_agreement", "cosine_agreement"),
    "random": ("random", "random"),
    "pcgrad": ("pcgrad", "pcgrad"),
    "mgda": ("mgda", "mgda"),
    "cagrad": ("cagrad", "cagrad"),
    "upgrad": ("upgrad", "upgrad"),
    "dualproj": ("dualproj", "dualproj"),
    "imtl_g": ("imtl_g", "imtl_g"),
    "aligned_mtl": ("aligned_mtl", "aligned_mtl"),
    "nash_mtl": ("nash_mtl", "nash_mtl"),
    "graddrop": ("graddrop", "graddrop"),
    "and_mask": ("and_mask", "and_mask"),
    "gradvac": ("gradvac", "gradvac"),
    "trimmed_mean": ("trimmed_mean", "trimmed_mean"),
    "krum": ("krum", "krum"),
}

_ALIASES: dict[str, str] = {"agreement": "gradient_agreement"}

# Hints added to the error when a required argument is missing.
_HINTS: dict[str, str] = {
    "num_tasks": "the task count T, which sizes the aggregator's state",
    "trim": "the count cut at each end per coordinate; needs T > 2 * trim",
}


def names() -> tuple[str, ...]:
  """The canonical registered names (aliases such as ``"agreement"`` are accepted by :func:`get`)."""
  return tuple(_FACTORIES)


def canonical_name(name: str) -> str:
  """Resolves an alias; raises ``ValueError`` listing the valid names for an unknown one."""
  if name in _FACTORIES:
    return name
  if name in _ALIASES:
    return _ALIASES[name]
  valid = ", ".join(sorted(list(_FACTORIES) + list(_ALIASES)))
  raise ValueError(f"Unknown aggregator {name!r}; valid names: {valid}.")


def factory(name: str):
  """The factory function registered under ``name`` (imports its module)."""
  module_name, attr = _FACTORIES[canonical_name(name)]
  module = importlib.import_module(f"gajax.aggregators.{module_name}")
  return getattr(module, attr)


def get(name: str, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """Builds the aggregator registered under ``name`` with keyword arguments ``kwargs``.

  A factory whose ``key`` argument is required (``random``, ``graddrop``) gets
  ``key=jax.random.PRNGKey(0)`` when none is given; ``pcgrad`` and ``gradvac``, whose key is optional,
  keep their deterministic order unless a key is passed. Other required arguments must be given, e.g.
  ``get("gradvac", num_tasks=4)`` and ``get("trimmed_mean", trim=1)``.

  Raises:
    ValueError: for an unknown name (listing the valid ones), for a keyword the factory does not take
      (listing the ones it does), or for a missing required argument.
  """
  canonical = canonical_name(name)
  fn = factory(canonical)
  params = inspect.signature(fn).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  accepted = [n for n, p in params.items()
              if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
  if not takes_any:
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
      raise ValueError(
          f"Aggregator {canonical!r} does not take {', '.join(unknown)}; it takes: "
          f"{', '.join(accepted) or '(no arguments)'}.")
  kwargs = dict(kwargs)
  key_param = params.get("key")
  if key_param is not None and key_param.default is inspect.Parameter.empty and "key" not in kwargs:
    kwargs["key"] = jax.random.PRNGKey(0)
  missing = [n for n in accepted
             if params[n].default is inspect.Parameter.empty and n not in kwargs]
  if missing:
    detail = "; ".join(f"{n} ({_HINTS[n]})" if n in _HINTS else n for n in missing)
    raise ValueError(
        f"Aggregator {canonical!r} needs {detail}: pass it as get({canonical!r}, "
        f"{missing[0]}=...).")
  return fn(**kwargs)
