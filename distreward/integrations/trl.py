"""Reward functions for TRL's ``RLOOTrainer`` and ``GRPOTrainer`` from a distributional reward model
(docs/integrations.md, "Reward functions for TRL"; the shapings: docs/math.md §5).

TRL calls each of its ``reward_funcs`` as ``f(prompts=..., completions=..., **kwargs) -> list[float]`` on one
batch, names it by ``f.__name__`` (its metrics ``rewards/<name>/mean`` and ``/std``) and sums the columns with
``reward_weights``; RLOO then subtracts ``beta * kl``. A :class:`DistributionalReward` holds one reward model and
hands out such functions (``.mean``, ``.std``, ``.quantile(level)``, ``.shaped(shaping)``) that share one
reward-model forward per batch through a small cache keyed by the batch's prompts and completions. Each call
also logs the batch's mean of the RM's ``E`` and of its ``std`` through TRL's ``log_metric`` hook
(``rm/mean``, ``rm/std``).

For ``trl rloo --reward_funcs <dotted path>`` (TRL imports the attribute and passes no arguments) the module
holds :func:`rm_mean`, :func:`rm_std`, :func:`rm_quantile` and :func:`rm_std_scale`, which load the reward
model in ``$DISTREWARD_RM_PATH`` on first use (``$DISTREWARD_QUANTILE_LEVEL``, default 0.25, for the quantile).

This module does not import TRL: its functions are plain callables.
"""
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distreward.data import conversation_ids, padded_batch, to_messages
from distreward.defaults import ALPHA, QUANTILE_LEVEL
from distreward.modeling import load_reward_model
from distreward.rewards import check_level, check_shaping, distribution_quantile, shape_rewards

RM_PATH_ENV = "DISTREWARD_RM_PATH"
QUANTILE_LEVEL_ENV = "DISTREWARD_QUANTILE_LEVEL"


@dataclass
class RewardScores:
    """The reward model's output on one batch of N (prompt, completion) pairs: ``mean`` (the reward E) and
    ``std`` [N] fp32, ``bin_logits`` [N, K] fp32."""

    mean: torch.Tensor
    std: torch.Tensor
    bin_logits: torch.Tensor


def conversation(prompt, completion) -> list:
    """A TRL (prompt, completion) as the chat messages the reward model reads: standard (strings) or
    conversational (message lists, the completion's ending with the assistant's answer)."""
    if isinstance(completion, str):
        return to_messages(prompt, completion)
    history = to_messages(prompt, "")[:-1]
    return to_messages(history, history + list(completion))


def reward_model_inputs(tokenizer, prompts: list, completions: list) -> tuple:
    """(input_ids [N, L] int64 right-padded with ``tokenizer.pad_token_id``, attention_mask [N, L] int64): each
    pair rendered with the tokenizer's chat template as distreward's RL stage renders it
    (:func:`distreward.data.conversation_ids`)."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many prompts as completions, at least one, got {len(prompts)} and "
                         f"{len(completions)}")
    sequences = [conversation_ids(tokenizer, conversation(prompt, completion))
                 for prompt, completion in zip(prompts, completions)]
    return padded_batch(sequences, tokenizer.pad_token_id)


def named(name: str, function: Callable) -> Callable:
    """``function`` with ``__name__`` ``name`` (TRL names a reward function's metrics by it)."""
    function.__name__ = function.__qualname__ = name
    return function


class DistributionalReward:
    """One reward model shared by TRL reward functions: every function reads the same cached forward per batch.

    ``model(input_ids [N, L], attention_mask [N, L])`` returns ``mean``, ``std`` [N] and ``bin_logits`` [N, K]
    (a :class:`distreward.modeling.DistRewardForSequenceClassification`); ``tokenizer`` renders its input.
    ``prefix`` starts every function's name and logged metric; ``cache_size`` is how many batches' outputs are
    kept.
    """

    def __init__(self, model, tokenizer, prefix: str = "rm", cache_size: int = 4):
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ValueError("the reward model needs a tokenizer with a pad token")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.cache_size = cache_size
        self._cache = OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, device=None, **kwargs) -> "DistributionalReward":
        """Load the reward model saved in ``path`` (its own tokenizer, else ``tokenizer``) onto ``device`` (default:
        this process's accelerator device, as TRL places its models); ``kwargs`` go to the constructor."""
        model, tokenizer = load_reward_model(os.fspath(path), tokenizer)
        if device is None:
            from accelerate import PartialState

            device = PartialState().device
        return cls(model.to(device), tokenizer, **kwargs)

    @torch.no_grad()
    def scores(self, prompts: list, completions: list) -> RewardScores:
        """The reward model's :class:`RewardScores` on the N pairs: one forward, reused by every later call on the
        same prompts and completions while the batch is among the last ``cache_size``."""
        key = json.dumps([prompts, completions], sort_keys=True, default=str)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        input_ids, attention_mask = reward_model_inputs(self.tokenizer, prompts, completions)
        device = next(self.model.parameters()).device
        output = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        scores = RewardScores(output.mean.float(), output.std.float(), output.bin_logits.float())
        self._cache[key] = scores
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return scores

    def _reward_func(self, name: str, values: Callable[[RewardScores], torch.Tensor]) -> Callable:
        """A TRL reward function named ``<prefix>_<name>`` returning ``values(scores)`` [N] as floats."""

        def reward_func(prompts, completions, log_metric: Optional[Callable] = None, **kwargs) -> list:
            scores = self.scores(prompts, completions)
            if log_metric is not None:  # every function of a batch logs the same values; TRL averages them
                log_metric(f"{self.prefix}/mean", scores.mean.mean().item())
                log_metric(f"{self.prefix}/std", scores.std.mean().item())
            return values(scores).tolist()

        return named(f"{self.prefix}_{name}", reward_func)

    def _check_distribution(self, what: str) -> None:
        if getattr(self.model, "is_scalar", False):
            raise ValueError(f"{what} needs a distributional reward model; this one has a scalar head")

    @property
    def mean(self) -> Callable:
        """Reward function: the RM's mean E of each pair (``shaping="none"`` before the KL)."""
        return self._reward_func("mean", lambda scores: scores.mean)

    @property
    def std(self) -> Callable:
        """Reward function: the RM's std sd of each pair (weight it ``-alpha`` beside :attr:`mean` for
        ``std_penalty``)."""
        self._check_distribution("the std reward")
        return self._reward_func("std", lambda scores: scores.std)

    def quantile(self, level: float = QUANTILE_LEVEL) -> Callable:
        """Reward function: the ``level``-quantile Q(level) of each pair's predicted distribution
        (:func:`distreward.rewards.distribution_quantile`), named ``<prefix>_quantile_<level>``."""
        check_level("level", level)
        self._check_distribution("the quantile reward")
        low, high = self.model.low, self.model.high
        return self._reward_func(f"quantile_{level:g}",
                                 lambda scores: distribution_quantile(scores.bin_logits, level, low, high))

    def shaped(self, shaping: str, alpha: float = ALPHA, quantile_level: float = QUANTILE_LEVEL) -> Callable:
        """Reward function: :func:`distreward.rewards.shape_rewards` of docs/math.md §5 with ``kl = 0`` (TRL adds
        its own KL term), named ``<prefix>_<shaping>``. Exact under RLOO for ``none``, ``std_penalty`` and
        ``quantile``; ``std_scale`` divides the RM's reward only, not RLOO's KL (docs/integrations.md)."""
        check_shaping(shaping, 0.0, alpha, quantile_level=quantile_level)
        if shaping != "none":
            self._check_distribution(f"shaping {shaping!r}")
        low, high = self.model.low, self.model.high

        def values(scores: RewardScores) -> torch.Tensor:
            quantile = (distribution_quantile(scores.bin_logits, quantile_level, low, high)
                        if shaping == "quantile" else None)
            return shape_rewards(scores.mean, scores.std, torch.zeros_like(scores.mean), shaping, beta=0.0,
                                 alpha=alpha, quantile=quantile)

        return self._reward_func(shaping, values)


_shared: Optional[DistributionalReward] = None


def shared_reward() -> DistributionalReward:
    """The :class:`DistributionalReward` of the directory in ``$DISTREWARD_RM_PATH``, loaded once per process."""
    global _shared
    if _shared is None:
        path = os.environ.get(RM_PATH_ENV)
        if not path:
            raise ValueError(f"set {RM_PATH_ENV} to a distreward reward model's directory (the rm stage's output) "
                             f"to use distreward's reward functions from TRL's command line")
        _shared = DistributionalReward.from_pretrained(path)
    return _shared


def quantile_level_from_env() -> float:
    """``$DISTREWARD_QUANTILE_LEVEL`` as a level in (0, 1) (default 0.25)."""
    text = os.environ.get(QUANTILE_LEVEL_ENV, str(QUANTILE_LEVEL))
    try:
        level = float(text)
    except ValueError:
        raise ValueError(f"{QUANTILE_LEVEL_ENV} must be a number in (0, 1), got {text!r}") from None
    check_level(QUANTILE_LEVEL_ENV, level)
    return level


def from_env(name: str, make: Callable[[DistributionalReward], Callable]) -> Callable:
    """A module-level reward function ``name`` for TRL's ``--reward_funcs``: ``make(shared_reward())`` on call."""
    return named(name, lambda prompts, completions, **kwargs: make(shared_reward())(prompts, completions, **kwargs))


rm_mean = from_env("rm_mean", lambda reward: reward.mean)
rm_std = from_env("rm_std", lambda reward: reward.std)
rm_quantile = from_env("rm_quantile", lambda reward: reward.quantile(quantile_level_from_env()))
rm_std_scale = from_env("rm_std_scale", lambda reward: reward.shaped("std_scale"))
