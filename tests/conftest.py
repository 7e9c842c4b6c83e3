import contextlib
import os

# Tests run on the CPU and must not grab every core's worth of threads per process twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# torchvision (pulled in by timm) segfaults when it is first imported after TensorFlow: load it
# before any test module imports the tfds pipelines, whatever order the tests are collected in.
with contextlib.suppress(ImportError):
    import timm  # noqa: F401
