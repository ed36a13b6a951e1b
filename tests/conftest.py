"""Every test process sees 8 CPU devices, so sharding is tested for real."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import cpu_env  # noqa: E402  pylint: disable=wrong-import-position

os.environ.setdefault("XLA_FLAGS", cpu_env.xla_flags(8, fast_compile=True))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
