"""The one table of the reward model's loss kinds (docs/math.md §3), read by the reference, the kernel launchers,
``ops.pair_loss`` and ``RewardConfig``: which head a kind trains, whether its score term reads the targets
(label means or distributions), and whether it has a Bradley-Terry margin that a temperature divides.
"""
from typing import NamedTuple


class LossKind(NamedTuple):
    scalar: bool  # trains a scalar head (rewards [N, 1]) rather than a distributional one (logits [N, K])
    reads_targets: bool  # its score term reads the targets (each side's labels)
    margin: bool  # its preference term is Bradley-Terry on a margin (temperature divides it); dpl has none


TABLE = {
    "bt_mean": LossKind(scalar=False, reads_targets=False, margin=True),  # Bradley-Terry on the means only
    "bt_kl": LossKind(scalar=False, reads_targets=True, margin=True),  # ... plus the KL to the labels
    "dpl": LossKind(scalar=False, reads_targets=True, margin=False),  # distributional preference + KL
    "scalar_bt": LossKind(scalar=True, reads_targets=False, margin=True),  # TRL RewardTrainer's loss
    "scalar_reg": LossKind(scalar=True, reads_targets=True, margin=True),  # ... plus regression on the labels
}
LOSS_KINDS = tuple(kind for kind, row in TABLE.items() if not row.scalar)  # distributional heads: logits [N, K]
SCALAR_LOSS_KINDS = tuple(kind for kind, row in TABLE.items() if row.scalar)  # scalar heads: logits [N, 1]
REWARD_LOSS_KINDS = tuple(TABLE)


def row(kind: str, choices: tuple = REWARD_LOSS_KINDS) -> LossKind:
    """``kind``'s row of the table; ValueError unless ``kind`` is one of ``choices``."""
    if kind not in choices:
        raise ValueError(f"kind must be one of {choices}, got {kind!r}")
    return TABLE[kind]


def check_temperature(kind: str, temperature: float, name: str = "temperature") -> None:
    """ValueError when ``kind`` has no margin and ``temperature`` (named ``name``) is not 1."""
    if not TABLE[kind].margin and temperature != 1:
        raise ValueError(f"kind {kind!r} has no Bradley-Terry margin: {name} must be 1, got {temperature}")
