"""Where the tests put the Triton kernels' inputs: CPU tensors under TRITON_INTERPRET=1 (how CI runs them),
CUDA tensors when the kernels run compiled on a GPU. tests/conftest.py sets TRITON_INTERPRET before this imports."""
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
# Bin-op gradients are compared in the input dtype: a few units in its last place, relative to the largest entry.
BIN_GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-9}
