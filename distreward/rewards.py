"""Total reward and baselines of docs/math.md §5: uncertainty shaping and the REINFORCE baseline.

Shaping turns the reward model's mean ``r``, its std ``sd`` and the per-sequence KL to the
reference into the total reward ``R``; a baseline ``b`` turns ``R`` into the advantage ``R - b``.
Baselines are small stateful objects (``state_dict`` / ``load_state_dict``) so a checkpoint
restores them, and take the batch mean as an argument so that, under data parallelism, the
trainer can pass the mean over all ranks and the EMA stays identical on every rank.
"""
import torch

from distreward.ops.validation import check_choice, check_positive

SHAPINGS = ("none", "std_penalty", "std_scale")
BASELINES = ("ema", "rloo", "batch")


def shape_rewards(reward: torch.Tensor, std: torch.Tensor, kl: torch.Tensor, shaping: str = "std_scale",
                  beta: float = 0.05, alpha: float = 0.5) -> torch.Tensor:
    """Total reward R [N] from reward-model mean ``reward`` [N], std ``std`` [N] and KL ``kl`` [N].

    - ``none``:        ``R = r - beta * kl``
    - ``std_penalty``: ``R = r - beta * kl - alpha * sd``   (hypothesis 2.1)
    - ``std_scale``:   ``R = (r - beta * kl) / (sd + 1)``   (hypothesis 2.2)
    """
    check_shaping(shaping, beta, alpha)
    if not reward.shape == std.shape == kl.shape or reward.dim() != 1:
        raise ValueError(f"reward, std and kl must be 1-D of the same length, got {tuple(reward.shape)}, "
                         f"{tuple(std.shape)} and {tuple(kl.shape)}")
    penalised = reward - beta * kl
    if shaping == "std_penalty":
        return penalised - alpha * std
    if shaping == "std_scale":
        return penalised / (std + 1.0)
    return penalised


def check_shaping(shaping: str, beta: float, alpha: float, prefix: str = "") -> None:
    """Raise ValueError unless ``shaping`` is one of :data:`SHAPINGS` and ``beta``, ``alpha`` are >= 0
    (``prefix`` goes before each name in the message, e.g. ``--`` for command-line flags)."""
    check_choice(f"{prefix}shaping", shaping, SHAPINGS)
    check_positive(f"{prefix}beta", beta, allow_zero=True)
    check_positive(f"{prefix}alpha", alpha, allow_zero=True)


class Baseline:
    """``b [N] = baseline(rewards [N], batch_mean)``; ``batch_mean`` is the mean of R over the global batch."""

    def __call__(self, rewards: torch.Tensor, batch_mean: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EMABaseline(Baseline):
    """Exponential moving average of the batch-mean reward, ``b_t = decay * b_{t-1} + (1 - decay) * mean_t``.

    A batch is compared with the average *before* it is folded in; the first batch starts the
    average at its own mean (so its advantages are ``R - mean``, not ``R - 0``).
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.value = None

    def __call__(self, rewards: torch.Tensor, batch_mean: torch.Tensor) -> torch.Tensor:
        batch_mean = float(batch_mean)
        baseline = batch_mean if self.value is None else self.value
        self.value = self.decay * baseline + (1.0 - self.decay) * batch_mean
        return torch.full_like(rewards, baseline)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class RLOOBaseline(Baseline):
    """Leave-one-out mean over the k samples of each prompt: ``b_i = (sum_j R_j - R_i) / (k - 1)``.

    ``rewards`` [P * k] holds the k samples of a prompt next to each other.
    """

    def __init__(self, samples_per_prompt: int):
        if samples_per_prompt < 2:
            raise ValueError(f"the rloo baseline needs samples_per_prompt >= 2, got {samples_per_prompt}")
        self.k = samples_per_prompt

    def __call__(self, rewards: torch.Tensor, batch_mean: torch.Tensor) -> torch.Tensor:
        if rewards.numel() % self.k:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {self.k} samples per prompt")
        groups = rewards.view(-1, self.k)
        return ((groups.sum(-1, keepdim=True) - groups) / (self.k - 1)).view(-1)


class BatchMeanBaseline(Baseline):
    """The mean reward of the (global) batch."""

    def __call__(self, rewards: torch.Tensor, batch_mean: torch.Tensor) -> torch.Tensor:
        return torch.full_like(rewards, float(batch_mean))


def make_baseline(kind: str, samples_per_prompt: int = 1, ema_decay: float = 0.9) -> Baseline:
    """The baseline ``kind`` ("ema", "rloo" or "batch"); ValueError on a kind or setting that cannot work."""
    check_choice("baseline", kind, BASELINES)
    if kind == "ema":
        return EMABaseline(ema_decay)
    if kind == "rloo":
        return RLOOBaseline(samples_per_prompt)
    return BatchMeanBaseline()
