"""Shared-prefix forward passes (``distreward.shared_prefix``): groups of rows that share their leading tokens give
the log-probs, gradients and rewards of running every row whole, while the trunk runs each prefix once; generation
reuses the prompts' cache and samples what it samples without it."""
from dataclasses import replace

import pytest
import torch
from test_sequence_logprobs import VOCAB, full_forward_logprobs, parameter_grads, tiny_gemma2, tiny_gpt2, tiny_llama

from distreward import rollout as rollout_module
from distreward import sequence_logprobs
from distreward.modeling import DistRewardForSequenceClassification
from distreward.rollout import RolloutScorer, generate_rollouts, token_logprobs
from distreward.shared_prefix import common_prefix_lengths, trunk_hidden_states
from distreward.tiny import build_tiny_policy, build_tiny_tokenizer

GROUPS, GROUP_SIZE, STEPS = 3, 3, 30


def grouped_batch(seed=0):
    """GROUPS x GROUP_SIZE rows: each group one prompt (lengths 6, 9, 12; the second group left-padded by 2), then
    responses of different lengths (right padding); the last group's first two rows are identical."""
    g = torch.Generator().manual_seed(seed)
    rows = GROUPS * GROUP_SIZE
    input_ids = torch.randint(0, VOCAB, (rows, STEPS), generator=g)
    attention_mask = torch.ones(rows, STEPS, dtype=torch.long)
    response_mask = torch.zeros(rows, STEPS, dtype=torch.bool)
    for group in range(GROUPS):
        prompt_end = 6 + 3 * group
        first = group * GROUP_SIZE
        input_ids[first:first + GROUP_SIZE, :prompt_end] = input_ids[first, :prompt_end]
        for b in range(first, first + GROUP_SIZE):
            end = STEPS - 4 * (b % GROUP_SIZE) - group
            attention_mask[b, end:] = 0
            response_mask[b, prompt_end:end] = True
        if group == 1:
            attention_mask[first:first + GROUP_SIZE, :2] = 0
    last = (GROUPS - 1) * GROUP_SIZE
    input_ids[last + 1], attention_mask[last + 1], response_mask[last + 1] = (
        input_ids[last], attention_mask[last], response_mask[last])
    return input_ids, attention_mask, response_mask


def test_common_prefix_lengths_stop_at_the_first_difference():
    input_ids, attention_mask, _ = grouped_batch()
    lengths = common_prefix_lengths(input_ids, attention_mask, GROUP_SIZE)
    assert lengths == [6, 9, 12]  # random responses differ at their first token
    same = input_ids[:2].clone(), attention_mask[:2].clone()
    assert common_prefix_lengths(*same, 1) == [STEPS - 1, STEPS - 1]  # a row alone: all but the last column
    with pytest.raises(ValueError, match="does not divide"):
        common_prefix_lengths(input_ids[:4], attention_mask[:4], GROUP_SIZE)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_gemma2])
def test_grouped_log_probs_and_gradients_match_whole_rows(build):
    model = build()
    input_ids, attention_mask, response_mask = grouped_batch()
    grouped = sequence_logprobs(model, input_ids, attention_mask, response_mask, group_size=GROUP_SIZE)
    whole = sequence_logprobs(model, input_ids, attention_mask, response_mask)
    with torch.no_grad():
        reference = full_forward_logprobs(model, input_ids, attention_mask, response_mask)
    torch.testing.assert_close(grouped, reference, atol=2e-5, rtol=1e-5)
    upstream = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(3))
    grouped_grads, whole_grads = parameter_grads(model, grouped, upstream), parameter_grads(model, whole, upstream)
    assert grouped_grads.keys() == whole_grads.keys() and grouped_grads
    for name in whole_grads:
        torch.testing.assert_close(grouped_grads[name], whole_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_trunk_runs_each_prefix_once():
    model = tiny_llama()
    input_ids, attention_mask, _ = grouped_batch()
    shapes = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                          with_kwargs=True)
    with torch.no_grad():
        grouped = trunk_hidden_states(model.model, input_ids, attention_mask, GROUP_SIZE)
        whole = trunk_hidden_states(model.model, input_ids, attention_mask)
    assert shapes == [(GROUPS, 12), (GROUPS * GROUP_SIZE, STEPS - 6), (GROUPS * GROUP_SIZE, STEPS)]
    real = attention_mask.bool()
    torch.testing.assert_close(grouped[real], whole[real], atol=2e-5, rtol=1e-5)


def test_groups_that_share_no_column_run_whole_rows():
    model = tiny_llama()
    input_ids, attention_mask, _ = grouped_batch()
    input_ids[:, 0] = torch.arange(len(input_ids))  # every row's first id its own
    with torch.no_grad():
        grouped = trunk_hidden_states(model.model, input_ids, attention_mask, GROUP_SIZE)
        whole = trunk_hidden_states(model.model, input_ids, attention_mask)
    torch.testing.assert_close(grouped, whole, rtol=0, atol=0)


def test_activation_checkpointing_falls_back_to_whole_rows():
    model = tiny_llama().train()  # no dropout in the tiny config: train mode only turns the checkpointing on
    model.gradient_checkpointing_enable()
    input_ids, attention_mask, response_mask = grouped_batch()
    grouped = sequence_logprobs(model, input_ids, attention_mask, response_mask, group_size=GROUP_SIZE)
    with torch.no_grad():
        reference = full_forward_logprobs(model, input_ids, attention_mask, response_mask)
    torch.testing.assert_close(grouped, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("group_size", [0, 2, True, 1.0])
def test_a_bad_group_size_raises_value_error(group_size):
    input_ids, attention_mask, response_mask = grouped_batch()
    with pytest.raises(ValueError, match="group_size must be a positive integer that divides the batch of 9"):
        sequence_logprobs(tiny_llama(), input_ids, attention_mask, response_mask, group_size=group_size)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_policy(tokenizer, seed=0), tokenizer


PROMPTS = [f"What is {a} + {37 * a + 3}?" for a in range(4)]  # prompts of different lengths: left padding


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_reuses_the_prompts_cache_and_samples_the_same(tiny, temperature, monkeypatch):
    policy, tokenizer = tiny
    widths = []
    policy.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    torch.manual_seed(0)
    shared = generate_rollouts(policy, tokenizer, PROMPTS, 3, 12, temperature=temperature)
    assert widths[0][0] == len(PROMPTS) and widths[1] == (3 * len(PROMPTS), 1)  # the prompts once, then one column
    monkeypatch.setattr(rollout_module, "prompt_cache", lambda *args: {})
    torch.manual_seed(0)
    plain = generate_rollouts(policy, tokenizer, PROMPTS, 3, 12, temperature=temperature)
    assert shared.group_size == plain.group_size == 3
    assert torch.equal(shared.input_ids, plain.input_ids) and shared.responses == plain.responses


def test_rewards_and_reference_log_probs_of_a_group_match_whole_rows(tiny):
    policy, tokenizer = tiny
    torch.manual_seed(1)
    reward_model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=1))
    scorer = RolloutScorer(build_tiny_policy(tokenizer, seed=2), reward_model, tokenizer)
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, PROMPTS, 3, 12)
    whole = replace(rollout, group_size=1)
    with torch.no_grad():
        policy_logprobs = token_logprobs(policy, rollout)
        torch.testing.assert_close(policy_logprobs, token_logprobs(policy, whole), atol=2e-5, rtol=1e-5)
    grouped_scores, whole_scores = scorer.score(rollout, policy_logprobs), scorer.score(whole, policy_logprobs)
    for name in ("reward", "std", "kl"):
        torch.testing.assert_close(getattr(grouped_scores, name), getattr(whole_scores, name), atol=2e-5, rtol=1e-5)
