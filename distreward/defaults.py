"""The package's default settings, one home each: the stage configs, :func:`distreward.rewards.shape_rewards`, the
label and metric functions, the serving and TRL adapters read them here.

``distreward/modeling_distreward.py`` keeps its defaults literal (it is shipped with saved models and imports only
torch and transformers); ``tests/test_structure.py`` checks that they equal these.
"""

SIGMA = 0.1  # width sigma0 of the Gaussian score label on [0, 1] (docs/math.md §2)
NUM_BINS = 10  # bins K of the reward distribution over [0, 1]
# weight of the KL to the reference in the shaped reward: the rl stage's tuned value (validation prompts), also the
# default of shape_rewards (which defaulted to 0.05 before; every caller passes beta explicitly)
BETA = 0.1
ALPHA = 0.5  # weight of the std penalty (shaping std_penalty)
QUANTILE_LEVEL = 0.25  # level of the quantile shaping: a lower quantile of the reward distribution
