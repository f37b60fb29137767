"""distreward: RLHF with a distributional reward model (the math: docs/math.md)."""
import os

# OpenMP threads that wait for work sleep instead of spinning, so two runs sharing the cores do not spin against
# each other (docs/training.md, "Threads"); set before torch loads its OpenMP runtime; OMP_WAIT_POLICY=ACTIVE
# in the environment keeps spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from distreward import ops  # noqa: E402
from distreward.sequence import sequence_logprobs  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "sequence_logprobs", "__version__"]
