"""distreward: RLHF with a distributional reward model (the math: docs/math.md)."""
from distreward import ops
from distreward.sequence import sequence_logprobs

__version__ = "0.1.0"

__all__ = ["ops", "sequence_logprobs", "__version__"]
