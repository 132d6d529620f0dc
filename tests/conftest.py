"""Shared test helpers."""

import os

# Tests must not grab every core of a shared CI machine for intra-op threads.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
