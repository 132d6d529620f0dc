"""Data sets as NumPy arrays: locating, decoding, caching, downloading and splitting them.

Nothing here imports JAX; the on-device samplers and ``Task`` objects built on these arrays live in
``gajax.tasks``.
"""
