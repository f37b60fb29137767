"""Rollouts for REINFORCE (docs/math.md §5): sample responses, take their log-probs, score them.

A :class:`Rollout` is stored *right-padded*: each row is its prompt tokens, then its response
tokens, then padding. ``generate`` needs left padding; the rows are re-packed afterwards so later
forward passes see contiguous positions ``0..n-1``. Prompts are rendered with the tokenizer's chat
template exactly as the SFT and reward-model data are (:func:`distreward.data.render`), and the
reward model re-reads each (prompt, response) as the conversation it was trained on, with its own
tokenizer (as TRL's GRPO trainer does for reward models).
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from distreward.data import conversation_ids, padded_batch, render, to_messages
from distreward.ops.validation import check_positive
from distreward.rewards import check_level, distribution_quantile
from distreward.sequence import sequence_logprobs
from distreward.shared_prefix import cache_argument, prefill, trunk_hidden_states
from distreward.timing import PhaseTimer, timed


@dataclass
class Rollout:
    """B sampled sequences.

    input_ids [B, T] int64, attention_mask [B, T] int64 (1 on prompt and response tokens),
    response_mask [B, T] bool (True on response tokens, up to and including the EOS that ended
    the response), prompts: the B user prompts, responses: the B decoded response strings, group_size: the
    samples per prompt (a prompt's samples are adjacent rows; forward passes run each prompt once).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompts: list
    responses: list
    group_size: int = 1

    def to(self, device) -> "Rollout":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       response_mask=self.response_mask.to(device))


@dataclass
class RolloutScores:
    """Per-sequence scores [B] fp32: reward-model mean ``reward`` and ``std``, ``kl`` to the reference
    (sum over response tokens of log pi - log pi_ref), the task's ``ground_truth`` score (or None) and a
    ``quantile`` of the reward model's distribution (or None: only when the scorer was asked for one)."""

    reward: torch.Tensor
    std: torch.Tensor
    kl: torch.Tensor
    ground_truth: Optional[torch.Tensor] = None
    quantile: Optional[torch.Tensor] = None

    def records(self, rollout: Rollout) -> list:
        """One JSON-ready dict per sequence: prompt, response and its scores."""
        columns = {"reward": self.reward, "std": self.std, "kl": self.kl}
        for name in ("ground_truth", "quantile"):
            if getattr(self, name) is not None:
                columns[name] = getattr(self, name)
        values = {name: column.tolist() for name, column in columns.items()}
        return [{"prompt": prompt, "response": response, **{name: values[name][i] for name in values}}
                for i, (prompt, response) in enumerate(zip(rollout.prompts, rollout.responses))]


def mask_through_eos(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """tokens [B, N] -> bool [B, N]: True up to and including each row's first ``eos_token_id``."""
    is_eos = (tokens == eos_token_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def left_align(keep: torch.Tensor) -> torch.Tensor:
    """keep [B, T] bool -> gather index [B, T] that moves each row's kept positions to the front, in order."""
    return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)


def prompt_text(tokenizer, prompt) -> str:
    """The chat-templated text the policy continues for a user ``prompt`` (a string or chat messages)."""
    return render(tokenizer, to_messages(prompt, ""))[0]


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: list, samples_per_prompt: int = 1, max_new_tokens: int = 32,
                      temperature: float = 1.0, top_p: float = 1.0) -> Rollout:
    """Sample ``samples_per_prompt`` responses for each prompt (a prompt's samples are adjacent rows).

    ``temperature == 0`` decodes greedily. Generation stops at ``tokenizer.eos_token_id`` or after
    ``max_new_tokens`` tokens; the response mask covers the tokens up to and including that EOS.
    """
    if not prompts:
        raise ValueError("generate_rollouts needs at least one prompt")
    if samples_per_prompt < 1 or max_new_tokens < 1:
        raise ValueError(f"samples_per_prompt and max_new_tokens must be >= 1, got {samples_per_prompt} "
                         f"and {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    device = next(model.parameters()).device
    encoded = tokenizer([prompt_text(tokenizer, prompt) for prompt in prompts], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False).to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None) if temperature > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    cache = prompt_cache(model, encoded, samples_per_prompt)
    prompts = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    encoded = {name: tensor.repeat_interleave(samples_per_prompt, 0) for name, tensor in encoded.items()}
    sequences = model.generate(**encoded, **cache, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **sampling)
    model.train(was_training)
    width = encoded["input_ids"].shape[1]
    in_response = mask_through_eos(sequences[:, width:], tokenizer.eos_token_id)
    keep = torch.cat([encoded["attention_mask"].bool(), in_response], dim=1)
    response_mask = torch.cat([torch.zeros_like(encoded["attention_mask"], dtype=torch.bool), in_response], dim=1)
    order = left_align(keep)
    keep, response_mask = keep.gather(1, order), response_mask.gather(1, order)
    input_ids = sequences.gather(1, order).masked_fill(~keep, tokenizer.pad_token_id)
    last = int(keep.sum(-1).max())  # drop the columns that are padding in every row
    input_ids, keep, response_mask = input_ids[:, :last], keep[:, :last], response_mask[:, :last]
    responses = tokenizer.batch_decode([row[mask] for row, mask in zip(input_ids, response_mask)],
                                       skip_special_tokens=True)
    return Rollout(input_ids, keep.long(), response_mask, prompts, responses, samples_per_prompt)


def prompt_cache(model, encoded, samples_per_prompt: int) -> dict:
    """``generate``'s cache argument holding the left-padded prompts' keys and values but the last column's, each
    prompt run once and repeated ``samples_per_prompt`` times ({} when there is nothing to share or ``model`` takes
    no cache). Positions as ``generate`` gives left-padded rows: the count of real tokens before."""
    trunk, name = model.base_model, cache_argument(model)
    trunk_name = cache_argument(trunk)
    if samples_per_prompt == 1 or trunk is model or name is None or trunk_name is None:
        return {}
    input_ids, attention_mask = encoded["input_ids"][:, :-1], encoded["attention_mask"][:, :-1]
    if input_ids.shape[1] == 0:
        return {}
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    _, cache = prefill(trunk, trunk_name, input_ids, attention_mask, positions, samples_per_prompt)
    return {} if cache is None else {name: cache}


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [B, T] fp32 of ``rollout.input_ids`` under ``model`` sampled at ``temperature``
    (:func:`distreward.sequence_logprobs`): ``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` on
    response tokens, 0 elsewhere. Differentiable when grad is enabled."""
    return sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_mask,
                             temperature=temperature, group_size=rollout.group_size)


class RolloutScorer:
    """Scores rollouts with a frozen reference policy, a distributional reward model and, optionally,
    a ground-truth ``scorer(prompt, response) -> float``. The reference's log-probs are those of its
    distribution at the sampling ``temperature``, so the KL compares the two distributions that sample.

    ``reward_model(input_ids, attention_mask)`` returns an object with ``bin_logits`` [B, K], ``mean`` and
    ``std`` [B] (:class:`distreward.modeling.RewardOutput`); ``reward_tokenizer`` renders its input. With a
    ``quantile_level`` in (0, 1), the scores also hold that quantile of each predicted distribution
    (:func:`distreward.rewards.distribution_quantile` over the model's ``low`` / ``high`` range).
    """

    def __init__(self, reference, reward_model, reward_tokenizer, ground_truth: Optional[Callable] = None,
                 quantile_level: Optional[float] = None, temperature: float = 1.0):
        if quantile_level is not None:
            check_level("quantile_level", quantile_level)
        check_positive("temperature", temperature)
        self.reference = reference.eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.reward_tokenizer = reward_tokenizer
        self.ground_truth = ground_truth
        self.quantile_level = quantile_level
        self.temperature = temperature

    @torch.no_grad()
    def reward(self, rollout: Rollout):
        """The reward model's output (``bin_logits`` [B, K], ``mean`` and ``std`` [B]) on each (prompt, response)
        conversation."""
        sequences = [conversation_ids(self.reward_tokenizer, to_messages(prompt, response))
                     for prompt, response in zip(rollout.prompts, rollout.responses)]
        input_ids, attention_mask = padded_batch(sequences, self.reward_tokenizer.pad_token_id)
        device = rollout.input_ids.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if not hasattr(self.reward_model, "reward_from_hidden"):
            return self.reward_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = trunk_hidden_states(self.reward_model.backbone, input_ids, attention_mask, rollout.group_size)
        return self.reward_model.reward_from_hidden(hidden, attention_mask)

    @torch.no_grad()
    def score(self, rollout: Rollout, policy_logprobs: torch.Tensor,
              timer: Optional[PhaseTimer] = None) -> RolloutScores:
        """Scores of ``rollout`` given the policy's per-token log-probs [B, T] (from :func:`token_logprobs`, at
        the temperature it sampled at); ``timer`` times the phases ``reference_logprobs`` and ``reward``."""
        with timed(timer, "reference_logprobs"):
            reference_logprobs = token_logprobs(self.reference, rollout, self.temperature)
        kl = (policy_logprobs.detach() - reference_logprobs).sum(-1)
        with timed(timer, "reward"):
            output = self.reward(rollout)
        ground_truth = quantile = None
        if self.ground_truth is not None:
            ground_truth = torch.tensor([self.ground_truth(prompt, response) for prompt, response
                                         in zip(rollout.prompts, rollout.responses)], dtype=torch.float32,
                                        device=output.mean.device)
        if self.quantile_level is not None:
            quantile = distribution_quantile(output.bin_logits, self.quantile_level, self.reward_model.low,
                                             self.reward_model.high)
        return RolloutScores(output.mean.float(), output.std.float(), kl, ground_truth, quantile)
