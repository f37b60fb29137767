"""Where the tests put the Triton kernels' inputs: CPU tensors under TRITON_INTERPRET=1 (how CI runs them),
CUDA tensors when the kernels run compiled on a GPU. tests/conftest.py sets TRITON_INTERPRET before this imports."""
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
