"""Shaping, baselines and the policy loss of docs/math.md §5 against hand computations."""
import pytest
import torch

from distreward.rewards import (BASELINES, SHAPINGS, BatchMeanBaseline, EMABaseline, RLOOBaseline, make_baseline,
                                shape_rewards)
from distreward.rl_trainer import policy_loss

REWARD = torch.tensor([0.8, 0.2, 0.5])
STD = torch.tensor([0.1, 0.3, 0.0])
KL = torch.tensor([2.0, -1.0, 0.0])


@pytest.mark.parametrize("shaping, expected", [
    # r - beta * kl with beta = 0.1: 0.8 - 0.2, 0.2 + 0.1, 0.5 - 0
    ("none", [0.6, 0.3, 0.5]),
    # ... - alpha * sd with alpha = 0.5
    ("std_penalty", [0.6 - 0.05, 0.3 - 0.15, 0.5]),
    # (r - beta * kl) / (sd + 1)
    ("std_scale", [0.6 / 1.1, 0.3 / 1.3, 0.5]),
])
def test_shaping_matches_hand_computation(shaping, expected):
    shaped = shape_rewards(REWARD, STD, KL, shaping=shaping, beta=0.1, alpha=0.5)
    torch.testing.assert_close(shaped, torch.tensor(expected))


@pytest.mark.parametrize("shaping", SHAPINGS)
def test_a_larger_beta_lowers_the_total_reward_where_the_log_ratio_is_positive(shaping):
    """R falls with beta where kl > 0, rises where kl < 0, and ignores beta where kl = 0 (fails on a flipped sign)."""
    low, high = (shape_rewards(REWARD, STD, KL, shaping=shaping, beta=beta, alpha=0.5) for beta in (0.01, 0.5))
    assert high[0] < low[0] and high[1] > low[1] and high[2] == low[2]
    torch.testing.assert_close(low - high, (0.5 - 0.01) * KL / (STD + 1 if shaping == "std_scale" else 1))


def test_shapings_differ_only_where_std_is_nonzero():
    shaped = {name: shape_rewards(REWARD, STD, KL, shaping=name, beta=0.1, alpha=0.5) for name in SHAPINGS}
    assert shaped["none"][2] == shaped["std_penalty"][2] == shaped["std_scale"][2]
    assert (shaped["std_penalty"][:2] < shaped["none"][:2]).all()
    assert (shaped["std_scale"][:2] < shaped["none"][:2]).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"shaping": "scale"}, "shaping"),
    ({"beta": -0.1}, "beta"),
])
def test_shaping_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shape_rewards(REWARD, STD, KL, **kwargs)


def test_shaping_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        shape_rewards(REWARD, STD[:2], KL)


def test_ema_baseline_by_hand():
    ema = EMABaseline(decay=0.5)
    first = torch.tensor([1.0, 3.0])
    # First batch: the average starts at its own mean 2.0 and stays there.
    torch.testing.assert_close(ema(first, first.mean()), torch.tensor([2.0, 2.0]))
    second = torch.tensor([6.0, 8.0])
    # Second batch is compared with 2.0, then the average moves to 0.5 * 2 + 0.5 * 7 = 4.5.
    torch.testing.assert_close(ema(second, second.mean()), torch.tensor([2.0, 2.0]))
    assert ema.value == pytest.approx(4.5)
    # The batch mean passed in (e.g. over all ranks) is what the average follows, not the local rewards.
    torch.testing.assert_close(ema(second, torch.tensor(0.5)), torch.tensor([4.5, 4.5]))
    assert ema.value == pytest.approx(2.5)


def test_ema_baseline_state_round_trip():
    ema = EMABaseline(decay=0.9)
    ema(torch.tensor([1.0]), torch.tensor(1.0))
    ema(torch.tensor([3.0]), torch.tensor(3.0))
    restored = EMABaseline(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    rewards = torch.tensor([5.0])
    torch.testing.assert_close(restored(rewards, rewards.mean()), ema(rewards, rewards.mean()))


def test_rloo_baseline_by_hand():
    rloo = RLOOBaseline(samples_per_prompt=3)
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three samples each
    expected = torch.tensor([(2 + 6) / 2, (1 + 6) / 2, (1 + 2) / 2, (0 + 3) / 2, (0 + 3) / 2, 0.0])
    torch.testing.assert_close(rloo(rewards, rewards.mean()), expected)


def test_rloo_rejects_bad_groups():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        RLOOBaseline(samples_per_prompt=1)
    with pytest.raises(ValueError, match="groups of 3"):
        RLOOBaseline(samples_per_prompt=3)(torch.zeros(4), torch.tensor(0.0))


def test_batch_baseline_is_the_given_mean():
    rewards = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(BatchMeanBaseline()(rewards, rewards.mean()), torch.full((3,), 3.0))


def test_make_baseline_covers_every_kind():
    kinds = {type(make_baseline(kind, samples_per_prompt=2)) for kind in BASELINES}
    assert kinds == {EMABaseline, RLOOBaseline, BatchMeanBaseline}
    with pytest.raises(ValueError, match="baseline"):
        make_baseline("median")


def test_policy_loss_value_and_gradient():
    advantages = torch.tensor([1.0, -2.0], requires_grad=True)
    logprobs = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss = policy_loss(advantages, logprobs)
    # mean(-(A * logp)) = -(1 * -3 + -2 * -1) / 2 = 0.5
    torch.testing.assert_close(loss, torch.tensor(0.5))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([-0.5, 1.0]))
    assert advantages.grad is None  # the advantage is a constant
