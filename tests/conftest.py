import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# PyTorch and timm (the cross-checks' reference; timm loads triton) segfault when they
# are first loaded after TensorFlow (which TFDS runs on) or jaxlib have done work in
# the same process; loaded first, all coexist. So load them before any test module.
try:
  import timm  # noqa: F401
  import torch  # noqa: F401
except ImportError:
  pass
