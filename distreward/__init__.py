"""distreward: RLHF with a distributional reward model (the math: docs/math.md)."""
from transformers import AutoConfig, AutoModelForSequenceClassification

from distreward import ops
from distreward.modeling_distreward import DistRewardConfig, DistRewardForSequenceClassification
from distreward.sequence import sequence_logprobs

# The reward model computes its moments with the fused ops (its own file, which imports only torch and transformers,
# falls back to plain softmax moments), and the Auto classes know it without trust_remote_code.
DistRewardForSequenceClassification.moments = staticmethod(ops.dist_moments)
AutoConfig.register(DistRewardConfig.model_type, DistRewardConfig, exist_ok=True)
AutoModelForSequenceClassification.register(DistRewardConfig, DistRewardForSequenceClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = ["DistRewardConfig", "DistRewardForSequenceClassification", "ops", "sequence_logprobs", "__version__"]
