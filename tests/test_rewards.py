"""Shaping, the quantile, the std controls, baselines and the policy loss of docs/math.md §5 against hand
computations."""
import numpy as np
import pytest
import torch

from distreward.rewards import (BASELINES, SHAPINGS, BatchMeanBaseline, EMABaseline, RLOOBaseline, check_shaping,
                                distribution_quantile, make_baseline, replace_std, shape_rewards)
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


def test_quantile_shaping_is_the_quantile_minus_beta_kl():
    quantile = torch.tensor([0.3, 0.1, 0.9])
    shaped = shape_rewards(REWARD, STD, KL, shaping="quantile", beta=0.1, alpha=0.5, quantile=quantile)
    torch.testing.assert_close(shaped, torch.tensor([0.3 - 0.2, 0.1 + 0.1, 0.9]))
    with pytest.raises(ValueError, match="needs the quantile"):
        shape_rewards(REWARD, STD, KL, shaping="quantile")


@pytest.mark.parametrize("shaping", SHAPINGS)
def test_a_larger_beta_lowers_the_total_reward_where_the_log_ratio_is_positive(shaping):
    """R falls with beta where kl > 0, rises where kl < 0, and ignores beta where kl = 0 (fails on a flipped sign)."""
    low, high = (shape_rewards(REWARD, STD, KL, shaping=shaping, beta=beta, alpha=0.5, quantile=REWARD)
                 for beta in (0.01, 0.5))
    assert high[0] < low[0] and high[1] > low[1] and high[2] == low[2]
    torch.testing.assert_close(low - high, (0.5 - 0.01) * KL / (STD + 1 if shaping == "std_scale" else 1))


def test_shapings_differ_only_where_std_is_nonzero():
    shaped = {name: shape_rewards(REWARD, STD, KL, shaping=name, beta=0.1, alpha=0.5) for name in SHAPINGS
              if name != "quantile"}
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


@pytest.mark.parametrize("settings, match", [
    ({"shaping": "none", "std_source": "constant"}, "std_source 'constant' is a control of the std shapings"),
    ({"shaping": "quantile", "std_source": "shuffled"}, "std_source"),
    ({"shaping": "std_scale", "std_source": "random"}, "std_source must be one of model, constant, shuffled"),
    ({"shaping": "quantile", "quantile_level": 0.0}, r"quantile_level must lie in \(0, 1\)"),
    ({"shaping": "quantile", "quantile_level": 1.0}, "quantile_level"),
    ({"shaping": "quantile", "quantile_level": float("nan")}, "quantile_level"),
])
def test_check_shaping_rejects_controls_and_levels_that_cannot_work(settings, match):
    with pytest.raises(ValueError, match=match):
        check_shaping(beta=0.1, alpha=0.5, **settings)


def quantile_of(probs, level, low=0.0, high=1.0) -> float:
    """distribution_quantile of one row given by its probabilities."""
    logits = torch.tensor([probs], dtype=torch.float64).log()
    return distribution_quantile(logits, level, low, high).item()


@pytest.mark.parametrize("probs, level, low, high, expected", [
    # centers 0.25, 0.75: bins [0, 0.5), [0.5, 1); C = (0.2, 1); 0.25 lies in bin 1, (0.25 - 0.2) / 0.8 of the
    # way: 0.5 + 0.5 * 0.0625
    ([0.2, 0.8], 0.25, 0.25, 0.75, 0.53125),
    ([0.2, 0.8], 0.1, 0.25, 0.75, 0.25),  # bin 0, half way: 0.5 * 0.5
    ([0.2, 0.8], 0.1, 0.0, 1.0, 0.0),  # centers 0, 1: bins [-0.5, 0.5), [0.5, 1.5); half of bin 0 is its center
    # centers 0.5, 1.5, 2.5: bins of width 1 on [0, 3); C = (0.5, 0.75, 1)
    ([0.5, 0.25, 0.25], 0.25, 0.5, 2.5, 0.5),   # bin 0: 0.25 / 0.5 of it
    ([0.5, 0.25, 0.25], 0.6, 0.5, 2.5, 1.4),    # bin 1: 1 + (0.6 - 0.5) / 0.25
    ([0.5, 0.25, 0.25], 0.9, 0.5, 2.5, 2.6),    # bin 2: 2 + (0.9 - 0.75) / 0.25
    ([0.5, 0.25, 0.25], 0.5, -2.5, -0.5, -2.0),  # the right edge of bin 0, shifted range
])
def test_distribution_quantile_by_hand(probs, level, low, high, expected):
    assert quantile_of(probs, level, low, high) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("level", [0.01, 0.25, 0.5, 0.9])
def test_quantile_of_a_uniform_distribution_is_linear_in_the_level(level):
    logits = torch.zeros(3, 10)  # centers -0.8, -0.4, ..., 2.8: bins of width 0.4 tile [-1, 3)
    torch.testing.assert_close(distribution_quantile(logits, level, -0.8, 2.8), torch.full((3,), -1.0 + 4.0 * level))


def test_quantile_is_the_inverse_of_the_piecewise_linear_cdf_and_increases_with_the_level():
    torch.manual_seed(0)
    logits = 3 * torch.randn(16, 10)
    levels = np.linspace(0.02, 0.98, 25)
    quantiles = torch.stack([distribution_quantile(logits, float(level), 0.05, 0.95) for level in levels], -1)
    assert (quantiles.diff(dim=-1) > 0).all()  # every bin holds mass, so strictly increasing
    for row, probs in enumerate(torch.softmax(logits.double(), -1).numpy()):
        cdf = np.concatenate([[0.0], np.cumsum(probs)])
        expected = np.interp(levels, cdf, np.linspace(0.0, 1.0, 11))  # invert the CDF through the bin edges
        np.testing.assert_allclose(quantiles[row].numpy(), expected, atol=1e-5)


def test_quantile_is_stable_for_extreme_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, -float("inf")], [-1e30, 1e30, 0.0]])
    torch.testing.assert_close(distribution_quantile(logits, 0.5, 0.5, 2.5), torch.tensor([0.5, 1.0, 1.5]))


@pytest.mark.parametrize("logits, level, low, high, match", [
    (torch.zeros(4), 0.5, 0.0, 1.0, "logits must have 2 dimensions"),
    (torch.zeros(2, 1), 0.5, 0.0, 1.0, "at least 2 bins"),
    (torch.zeros(2, 3), 0.0, 0.0, 1.0, r"level must lie in \(0, 1\)"),
    (torch.zeros(2, 3), 1.5, 0.0, 1.0, "level"),
    (torch.zeros(2, 3), 0.5, 1.0, 1.0, "low must be below high"),
    (torch.tensor([[0.0, float("nan")]]), 0.5, 0.0, 1.0, "NaN or"),
    (torch.tensor([[0.0, float("inf")]]), 0.5, 0.0, 1.0, r"\+inf"),
    (torch.full((1, 2), -float("inf")), 0.5, 0.0, 1.0, "all -inf"),
])
def test_quantile_rejects_bad_input(logits, level, low, high, match):
    with pytest.raises(ValueError, match=match):
        distribution_quantile(logits, level, low, high)


STDS = torch.tensor([0.1, 0.4, 0.2, 0.8, 0.3, 0.5, 0.7, 0.6])


def test_constant_std_control_is_the_batch_mean_without_gradient():
    std = STDS.clone().requires_grad_(True)
    constant = replace_std(std, "constant")
    torch.testing.assert_close(constant, torch.full_like(STDS, STDS.mean().item()))
    assert not constant.requires_grad
    assert replace_std(STDS, "model") is STDS


def test_shuffled_std_control_permutes_the_batch_reproducibly():
    first = replace_std(STDS, "shuffled", torch.Generator().manual_seed(3))
    assert torch.equal(first.sort().values, STDS.sort().values) and not torch.equal(first, STDS)
    assert torch.equal(replace_std(STDS, "shuffled", torch.Generator().manual_seed(3)), first)
    torch.manual_seed(3)  # no generator: the global RNG, which checkpoints restore
    assert torch.equal(replace_std(STDS, "shuffled"), first)
    with pytest.raises(ValueError, match="std_source"):
        replace_std(STDS, "sorted")


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
