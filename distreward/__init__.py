"""distreward: RLHF with a distributional reward model (the math: docs/math.md)."""
import os

# OpenMP threads that wait for work sleep instead of spinning, so two runs sharing the cores do not spin against
# each other (docs/training.md, "Threads"); set before torch loads its OpenMP runtime; OMP_WAIT_POLICY=ACTIVE
# in the environment keeps spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: E402

from distreward import ops  # noqa: E402
from distreward.modeling_distreward import DistRewardConfig, DistRewardForSequenceClassification  # noqa: E402
from distreward.sequence import sequence_logprobs  # noqa: E402

# The reward model computes its moments with the fused ops (its own file, which imports only torch and transformers,
# falls back to plain softmax moments), and the Auto classes know it without trust_remote_code.
DistRewardForSequenceClassification.moments = staticmethod(ops.dist_moments)
AutoConfig.register(DistRewardConfig.model_type, DistRewardConfig, exist_ok=True)
AutoModelForSequenceClassification.register(DistRewardConfig, DistRewardForSequenceClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = ["DistRewardConfig", "DistRewardForSequenceClassification", "ops", "sequence_logprobs", "__version__"]
