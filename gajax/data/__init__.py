"""Data sets as NumPy arrays: locating, decoding, caching, downloading and splitting them.

Nothing here imports JAX; the on-device samplers and ``Task`` objects built on these arrays live in
``gajax.tasks``. One module per data set: :mod:`~gajax.data.omniglot`, :mod:`~gajax.data.mini_imagenet`
(Ravi & Larochelle's images + csv, or the pickled caches), :mod:`~gajax.data.tiered_imagenet` (Ren et
al.'s PNG pickles, into a memory-mapped cache), :mod:`~gajax.data.cifar_fs` (CIFAR-FS and
FC100 from CIFAR-100's pickles, split lists in ``splits/``); :mod:`~gajax.data.cache` holds the atomic,
verified uint8 cache they share and :mod:`~gajax.data.base` the ``ClassImages`` result and a pickle
reader that refuses anything but arrays and plain containers.
"""
