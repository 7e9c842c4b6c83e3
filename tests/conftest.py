import os

# Tests run on the CPU and must not grab every core's worth of threads per process twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
