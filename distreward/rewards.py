"""Total reward and baselines of docs/math.md §5: uncertainty shaping and the REINFORCE baseline.

Shaping turns the reward model's mean ``r``, its std ``sd`` (or a lower quantile of its distribution)
and the per-sequence KL to the reference into the total reward ``R``; :func:`replace_std` gives the
controls of the std shapings (the std replaced by a constant or shuffled across the batch); a
baseline ``b`` turns ``R`` into the advantage ``R - b``.
Baselines are small stateful objects (``state_dict`` / ``load_state_dict``) so a checkpoint
restores them, and take the batch mean as an argument so that, under data parallelism, the
trainer can pass the mean over all ranks and the EMA stays identical on every rank.
"""
import math
from typing import Optional

import torch

from distreward.defaults import ALPHA, BETA, QUANTILE_LEVEL
from distreward.ops import bin_edges
from distreward.ops.validation import check_choice, check_logits, check_positive

SHAPINGS = ("none", "std_penalty", "std_scale", "quantile")
STD_SHAPINGS = ("std_penalty", "std_scale")  # the shapings that read the std, so the only ones its controls change
STD_SOURCES = ("model", "constant", "shuffled", "shuffled_within_prompt")
BASELINES = ("ema", "rloo", "batch")


def shape_rewards(reward: torch.Tensor, std: torch.Tensor, kl: torch.Tensor, shaping: str = "std_scale",
                  beta: float = BETA, alpha: float = ALPHA, quantile: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Total reward R [N] from reward-model mean ``reward`` [N], std ``std`` [N] and KL ``kl`` [N].

    - ``none``:        ``R = r - beta * kl``
    - ``std_penalty``: ``R = r - beta * kl - alpha * sd``   (hypothesis 2.1)
    - ``std_scale``:   ``R = (r - beta * kl) / (sd + 1)``   (hypothesis 2.2)
    - ``quantile``:    ``R = q - beta * kl``, ``q`` [N] = ``quantile``, a lower quantile of the RM's distribution
      (:func:`distribution_quantile`; a risk-averse reward, as distributional preference learning suggests)
    """
    check_shaping(shaping, beta, alpha)
    if shaping == "quantile":
        if quantile is None:
            raise ValueError("shaping 'quantile' needs the quantile of each reward distribution")
        reward = quantile
    if not reward.shape == std.shape == kl.shape or reward.dim() != 1:
        raise ValueError(f"reward, std and kl must be 1-D of the same length, got {tuple(reward.shape)}, "
                         f"{tuple(std.shape)} and {tuple(kl.shape)}")
    penalised = reward - beta * kl
    if shaping == "std_penalty":
        return penalised - alpha * std
    if shaping == "std_scale":
        return penalised / (std + 1.0)
    return penalised


def check_shaping(shaping: str, beta: float, alpha: float, prefix: str = "", std_source: str = "model",
                  quantile_level: float = QUANTILE_LEVEL) -> None:
    """Raise ValueError unless ``shaping`` is one of :data:`SHAPINGS`, ``beta``, ``alpha`` are >= 0,
    ``std_source`` is one of :data:`STD_SOURCES` (other than ``model`` only for a shaping that reads the std)
    and ``quantile_level`` lies in (0, 1) (``prefix`` goes before each name in the message, e.g. ``--``)."""
    check_choice(f"{prefix}shaping", shaping, SHAPINGS)
    check_positive(f"{prefix}beta", beta, allow_zero=True)
    check_positive(f"{prefix}alpha", alpha, allow_zero=True)
    check_choice(f"{prefix}std_source", std_source, STD_SOURCES)
    if std_source != "model" and shaping not in STD_SHAPINGS:
        raise ValueError(f"{prefix}std_source {std_source!r} is a control of the std shapings "
                         f"({', '.join(STD_SHAPINGS)}); shaping {shaping!r} does not read the std")
    check_level(f"{prefix}quantile_level", quantile_level)


def check_level(name: str, level: float) -> None:
    """A quantile level: a number strictly between 0 and 1."""
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0.0 < level < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {level!r}")


def distribution_quantile(logits: torch.Tensor, level: float, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """The ``level``-quantile [N] fp32 of each row's K-bin distribution ``softmax(logits)``, logits [N, K].

    ``low``, ``high`` are the first and last bin centers; bin k is the interval ``[e_k, e_k + w)`` centred on
    its center (:func:`distreward.ops.bin_edges`, ``w = (high - low) / (K - 1)``), with its mass spread
    uniformly, so the CDF is piecewise linear and the quantile is its inverse: with ``C_k = p_0 + ... + p_k``
    and k the first bin with ``C_k >= level``, ``e_k + w (level - C_{k-1}) / p_k`` (``C_{-1} = 0``).
    Not differentiable (a reward, read without gradient).
    """
    check_logits("logits", logits)
    check_level("level", level)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"low must be below high, both finite, got low={low}, high={high}")
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("logits hold NaN or +inf, or a row whose logits are all -inf")
    cdf = probs.cumsum(-1)
    cdf[:, -1] = 1.0  # the rounding of the sum must not leave a level above the last bin
    below = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=-1)  # C_{k-1}
    k = (cdf < level).sum(-1, keepdim=True)  # the first bin whose C_k >= level (<= K - 1 as C_{K-1} = 1)
    before, upto = below.gather(-1, k), cdf.gather(-1, k)
    inside = ((level - before) / (upto - before)).clamp(0.0, 1.0)  # upto > level > before
    edges = bin_edges(logits.shape[-1], low, high)
    width = float(edges[1] - edges[0])
    return (float(edges[0]) + width * (k + inside)).squeeze(-1).float()


def replace_std(std: torch.Tensor, source: str = "model", generator: Optional[torch.Generator] = None,
                samples_per_prompt: int = 1) -> torch.Tensor:
    """The std [N] a std shaping reads, as its control ``source`` asks: ``model`` keeps ``std``; ``constant``
    gives every entry the batch mean (detached); ``shuffled`` a random permutation of the batch's stds;
    ``shuffled_within_prompt`` a random permutation inside each prompt's ``samples_per_prompt`` adjacent samples
    (the control that stays meaningful under a leave-one-out baseline, where a constant std plus
    ``std_penalty`` is the same as ``none``). Permutations are drawn on the CPU from ``generator`` (the global
    RNG when None, which checkpoints save and ``--resume`` restores)."""
    check_choice("std_source", source, STD_SOURCES)
    if std.dim() != 1:
        raise ValueError(f"std must be 1-D, got shape {tuple(std.shape)}")
    if source == "constant":
        return std.detach().mean().expand_as(std).clone()
    if source == "shuffled":
        return std[torch.randperm(std.shape[0], generator=generator).to(std.device)]
    if source == "shuffled_within_prompt":
        if samples_per_prompt < 1 or std.shape[0] % samples_per_prompt:
            raise ValueError(f"{std.shape[0]} stds do not split into groups of {samples_per_prompt} samples per prompt")
        groups = std.shape[0] // samples_per_prompt
        order = torch.rand(groups, samples_per_prompt, generator=generator).argsort(-1)
        order += torch.arange(groups).unsqueeze(-1) * samples_per_prompt
        return std[order.view(-1).to(std.device)]
    return std


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
