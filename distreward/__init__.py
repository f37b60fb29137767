"""distreward: RLHF with a distributional reward model (SPEC: ../shared/SPEC.md)."""
from distreward import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
