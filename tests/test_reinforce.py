"""REINFORCE (docs/math.md §5): rollout masking and log-probs, a step that raises a known reward, the std
controls and the quantile shaping, curve.jsonl, resume."""
import collections
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from distreward.data import load_prompts
from distreward.modeling import (DistRewardForSequenceClassification, RewardOutput, load_policy_and_reference,
                                 load_reward_model, save_reward_model)
from distreward import rl_trainer, synthetic, testbed
from distreward.policy_comparison import compare_policies
from distreward.rewards import SHAPINGS, distribution_quantile
from distreward.rl_trainer import ReinforceConfig, ReinforceTrainer, run_reinforce
from distreward.rollout import RolloutScorer, generate_rollouts, left_align, mask_through_eos, prompt_text, \
    token_logprobs
from distreward.splits import prompt_split
from distreward.tables import format_report
from distreward.tiny import build_tiny_policy
from kills import Killed, killed_at
from run_files import jsonl_without_timings

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2)
DIGIT_PROMPTS = ["Pick a lucky digit.", "Choose any digit."]


def test_mask_through_eos():
    eos = 9
    tokens = torch.tensor([[1, 2, 9, 9, 3], [9, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask_through_eos(tokens, eos), expected)


def test_left_align_keeps_order():
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    values = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    order = left_align(keep)
    assert values.gather(1, order)[0, :3].tolist() == [11, 12, 14]
    assert values.gather(1, order)[1, :2].tolist() == [20, 21]
    assert keep.gather(1, order).tolist() == [[True] * 3 + [False] * 2, [True] * 2 + [False] * 3]


def test_rollout_layout_and_logprobs_match_generation(tokenizer):
    """Re-packed right-padded rows give the same log-probs as the left-padded generation saw."""
    policy = build_tiny_policy(tokenizer, seed=1, **SMALL)
    prompts = ["What is 3 + 4?", "Sort: 3 1 2 9 9", "Pick a lucky digit."]
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, prompts, samples_per_prompt=2, max_new_tokens=6)
    assert rollout.prompts == [p for p in prompts for _ in range(2)]
    assert rollout.input_ids.shape == rollout.attention_mask.shape == rollout.response_mask.shape
    for row in range(len(rollout.prompts)):
        length = int(rollout.attention_mask[row].sum())
        assert rollout.attention_mask[row, :length].all() and not rollout.attention_mask[row, length:].any()
        response = rollout.input_ids[row][rollout.response_mask[row]]
        prompt_ids = rollout.input_ids[row, :length][~rollout.response_mask[row, :length]]
        assert tokenizer.decode(prompt_ids) == prompt_text(tokenizer, rollout.prompts[row])
        assert 1 <= len(response) <= 6
        eos_at = (response == tokenizer.eos_token_id).nonzero()
        assert len(eos_at) == 0 or eos_at[0, 0] == len(response) - 1  # an EOS only ends a response
        assert rollout.response_mask[row, :length].sum() == len(response) and rollout.response_mask[row, length - 1]
        assert rollout.responses[row] == tokenizer.decode(response, skip_special_tokens=True)
    logprobs = token_logprobs(policy, rollout)
    assert (logprobs[~rollout.response_mask] == 0).all() and (logprobs[rollout.response_mask] < 0).all()
    # One row alone, unpadded: its log-probs are the same as in the padded batch.
    row = 4
    length = int(rollout.attention_mask[row].sum())
    alone = torch.log_softmax(policy(rollout.input_ids[row:row + 1, :length]).logits[0, :-1], -1)
    expected = alone.gather(-1, rollout.input_ids[row, 1:length, None]).squeeze(-1)
    mask = rollout.response_mask[row, 1:length]
    torch.testing.assert_close(logprobs[row, 1:length][mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_greedy_rollouts_are_deterministic(tokenizer):
    policy = build_tiny_policy(tokenizer, seed=1, **SMALL)
    first = generate_rollouts(policy, tokenizer, DIGIT_PROMPTS, max_new_tokens=4, temperature=0.0)
    second = generate_rollouts(policy, tokenizer, DIGIT_PROMPTS, max_new_tokens=4, temperature=0.0)
    assert torch.equal(first.input_ids, second.input_ids)


@pytest.mark.parametrize("kwargs", [dict(samples_per_prompt=0), dict(top_p=0.0), dict(temperature=-1.0)])
def test_generate_rollouts_rejects_bad_settings(tokenizer, kwargs):
    policy = build_tiny_policy(tokenizer, seed=1, **SMALL)
    with pytest.raises(ValueError):
        generate_rollouts(policy, tokenizer, DIGIT_PROMPTS, **kwargs)


class DigitRewardModel(torch.nn.Module):
    """A known reward: E = 1 if the conversation holds a digit (the prompts hold none) else 0; sd = 0.1 plus
    ``std_per_digit`` per digit token; 10-bin logits on [0, 1] with most mass in the last bin where E = 1, in the
    first elsewhere (so their quantiles differ by almost 1, as E does)."""

    low, high = 0.0, 1.0

    def __init__(self, tokenizer, std_per_digit: float = 0.0):
        super().__init__()
        digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
        self.register_buffer("digit_ids", torch.tensor(digits))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so .to() / .eval() behave like a real model
        self.std_per_digit = std_per_digit

    def forward(self, input_ids, attention_mask):
        is_digit = torch.isin(input_ids, self.digit_ids) & attention_mask.bool()
        mean = is_digit.any(-1).float()
        logits = 8.0 * (torch.arange(10, device=mean.device) == 9 * mean.long().unsqueeze(-1)).float()
        return RewardOutput(logits=mean.unsqueeze(-1), bin_logits=logits, mean=mean,
                            std=0.1 + self.std_per_digit * is_digit.sum(-1).float())


def digit_probability(policy, tokenizer) -> float:
    """Mean probability that the first response token is a digit, over DIGIT_PROMPTS."""
    encoded = tokenizer([prompt_text(tokenizer, p) for p in DIGIT_PROMPTS], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False).to(policy.device)
    with torch.no_grad():
        probs = torch.softmax(policy(**encoded).logits[:, -1], -1)
    return probs[:, tokenizer.convert_tokens_to_ids(list("0123456789"))].sum(-1).mean().item()


def digit_trainer(tokenizer, output_dir, std_per_digit: float = 0.0, **overrides) -> ReinforceTrainer:
    torch.manual_seed(0)
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=2, samples_per_prompt=32,
                    max_new_tokens=3, beta=0.0)
    config = ReinforceConfig(**{**settings, **overrides})
    scorer = RolloutScorer(build_tiny_policy(tokenizer, seed=2, **SMALL), DigitRewardModel(tokenizer, std_per_digit),
                           tokenizer, quantile_level=config.quantile_level if config.shaping == "quantile" else None)
    return ReinforceTrainer(config, build_tiny_policy(tokenizer, seed=2, **SMALL), tokenizer, scorer, DIGIT_PROMPTS)


@pytest.mark.parametrize("shaping", SHAPINGS)
@pytest.mark.parametrize("baseline", ["ema", "rloo", "batch"])
def test_reinforce_gradient_step_raises_the_known_reward(tokenizer, tmp_path, shaping, baseline):
    """A small step along -grad of the REINFORCE loss makes the rewarded tokens (digits) likelier."""
    trainer = digit_trainer(tokenizer, tmp_path, baseline=baseline, shaping=shaping)
    policy = trainer.policy
    before = digit_probability(policy, tokenizer)
    loss, metrics = trainer.compute_loss(policy, DIGIT_PROMPTS)
    assert 0 < metrics["reward"] < 1  # some samples hold a digit, some do not
    loss.backward()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter -= 0.5 * parameter.grad
    after = digit_probability(policy, tokenizer)
    assert after > before * 1.1, (before, after)


@pytest.mark.parametrize("std_source", ["constant", "shuffled"])
def test_the_std_shapings_read_the_std_control(tokenizer, tmp_path, monkeypatch, std_source):
    """compute_loss hands the shaping the batch's mean std (constant) or its stds permuted (shuffled), and logs
    the reward model's own std."""
    trainer = digit_trainer(tokenizer, tmp_path, std_per_digit=0.1, shaping="std_penalty", std_source=std_source,
                            samples_per_prompt=8)
    seen = {}
    score, shape = trainer.scorer.score, rl_trainer.shape_rewards

    def recording_score(*args):
        scores = score(*args)
        seen["model"] = scores.std
        return scores

    def recording_shape(reward, std, *args):
        seen["shaped"] = std
        return shape(reward, std, *args)

    monkeypatch.setattr(trainer.scorer, "score", recording_score)
    monkeypatch.setattr(rl_trainer, "shape_rewards", recording_shape)
    _, metrics = trainer.compute_loss(trainer.policy, DIGIT_PROMPTS)
    model, shaped = seen["model"], seen["shaped"]
    assert len(set(model.tolist())) > 1 and metrics["reward_sd"] == model.mean()
    if std_source == "constant":
        torch.testing.assert_close(shaped, torch.full_like(model, model.mean().item()))
    else:
        assert torch.equal(shaped.sort().values, model.sort().values) and not torch.equal(shaped, model)


def test_reinforce_training_raises_the_known_reward(tokenizer, tmp_path):
    trainer = digit_trainer(tokenizer, tmp_path, max_steps=3, learning_rate=3e-2)
    before = digit_probability(trainer.policy, tokenizer)
    after = digit_probability(trainer.train(), tokenizer)
    assert after > before * 1.5, (before, after)


def hand_log_ratio(policy, reference, rollout, temperature=1.0) -> torch.Tensor:
    """[B] sum over each row's response tokens of log pi(y_t) - log pi_ref(y_t), both models' distributions at
    ``temperature``, one unpadded row at a time."""
    sums = []
    for row in range(len(rollout.prompts)):
        length = int(rollout.attention_mask[row].sum())
        ids = rollout.input_ids[row:row + 1, :length]
        positions = rollout.response_mask[row, :length].nonzero()[:, 0]
        total = 0.0
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            logprobs = torch.log_softmax(model(ids).logits[0].double() / temperature, -1)
            total += sign * logprobs[positions - 1, ids[0, positions]].sum()
        sums.append(total)
    return torch.stack(sums).float()


@torch.no_grad()
def test_kl_to_reference_is_the_log_ratio_summed_over_response_tokens(tokenizer):
    """Pins the KL term by hand: its sign (policy minus reference) and a sum, not a mean, over response tokens."""
    policy, reference = (build_tiny_policy(tokenizer, seed=seed, **SMALL) for seed in (1, 2))
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, ["What is 3 + 4?", "Sort: 3 1 2"], samples_per_prompt=3,
                                max_new_tokens=5)
    scores = RolloutScorer(reference, DigitRewardModel(tokenizer), tokenizer).score(rollout,
                                                                                   token_logprobs(policy, rollout))
    expected = hand_log_ratio(policy, reference, rollout)
    torch.testing.assert_close(scores.kl, expected, atol=1e-4, rtol=1e-4)
    lengths = rollout.response_mask.sum(-1)
    assert (lengths > 1).any() and not torch.allclose(scores.kl, expected / lengths, atol=1e-3)  # a mean would differ
    assert (expected.abs() > 1e-2).sum() >= len(expected) // 2  # so a flipped sign would differ too


@torch.no_grad()
def test_the_kl_compares_the_distributions_at_the_sampling_temperature(tokenizer):
    """Sampled at temperature 0.5, the KL is that of softmax(logits / 0.5) of the policy and of the reference."""
    policy, reference = (build_tiny_policy(tokenizer, seed=seed, **SMALL) for seed in (1, 2))
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, ["What is 3 + 4?", "Sort: 3 1 2"], samples_per_prompt=3,
                                max_new_tokens=5, temperature=0.5)
    scorer = RolloutScorer(reference, DigitRewardModel(tokenizer), tokenizer, temperature=0.5)
    scores = scorer.score(rollout, token_logprobs(policy, rollout, temperature=0.5))
    expected = hand_log_ratio(policy, reference, rollout, temperature=0.5)
    torch.testing.assert_close(scores.kl, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, hand_log_ratio(policy, reference, rollout), atol=1e-2)  # T matters here
    with pytest.raises(ValueError, match="temperature must be"):
        RolloutScorer(reference, DigitRewardModel(tokenizer), tokenizer, temperature=0.0)


def test_the_policy_gradient_is_that_of_the_sampling_distribution(tokenizer, tmp_path):
    """At --temperature 0.5 the REINFORCE loss is -(R - b) * sum_t log softmax(logits / 0.5)[y_t]: the loss
    that a hand computation from the same rollouts gives, not the one of the untempered policy."""
    k = 32  # samples per prompt: each group holds digits and non-digits (P(not) ~ 1e-4 on any random stream)
    trainer = digit_trainer(tokenizer, tmp_path, shaping="none", beta=0.0, samples_per_prompt=k, temperature=0.5)
    torch.manual_seed(1)
    loss, metrics = trainer.compute_loss(trainer.policy, DIGIT_PROMPTS)
    torch.manual_seed(1)
    rollout = generate_rollouts(trainer.policy, tokenizer, DIGIT_PROMPTS, k, trainer.config.max_new_tokens, 0.5)
    reward = trainer.scorer.score(rollout, token_logprobs(trainer.policy, rollout, 0.5)).reward.view(-1, k)
    advantages = (reward - (reward.sum(-1, keepdim=True) - reward) / (k - 1)).view(-1)
    assert advantages.abs().min() > 0, "every sample must carry a gradient, else both losses are 0"
    for temperature, matches in ((0.5, True), (1.0, False)):
        logprobs = token_logprobs(trainer.policy, rollout, temperature).sum(-1)
        assert torch.allclose(loss, -(advantages * logprobs).mean(), atol=1e-6) == matches


def test_trainer_subtracts_beta_times_the_summed_kl(tokenizer, tmp_path):
    """The REINFORCE step's total reward is r - beta * kl (shaping none) with the scorer's summed KL:
    the same rollouts (same seed) with beta = 0 and 0.5 differ by exactly 0.5 * mean kl."""
    totals = {}
    for beta in (0.0, 0.5):
        trainer = digit_trainer(tokenizer, tmp_path, shaping="none", beta=beta, samples_per_prompt=4)
        reference = build_tiny_policy(tokenizer, seed=5, **SMALL).eval().requires_grad_(False)
        trainer.scorer.reference = reference.to(trainer.accelerator.device)
        torch.manual_seed(1)
        _, metrics = trainer.compute_loss(trainer.policy, DIGIT_PROMPTS)
        totals[beta] = metrics
    assert totals[0.0]["kl"] == totals[0.5]["kl"] and totals[0.0]["kl"].abs() > 1e-2
    torch.testing.assert_close(totals[0.0]["total_reward"], totals[0.0]["reward"])
    torch.testing.assert_close(totals[0.5]["total_reward"], totals[0.0]["reward"] - 0.5 * totals[0.0]["kl"])


def test_the_quantile_shaping_needs_a_scorer_that_gives_its_quantile(tokenizer, tmp_path):
    config = ReinforceConfig(output_dir=str(tmp_path), shaping="quantile", quantile_level=0.1)
    policy = build_tiny_policy(tokenizer, seed=2, **SMALL)
    for level in (None, 0.25):
        scorer = RolloutScorer(policy, DigitRewardModel(tokenizer), tokenizer, quantile_level=level)
        with pytest.raises(ValueError, match="needs a scorer with quantile_level=0.1"):
            ReinforceTrainer(config, policy, tokenizer, scorer, DIGIT_PROMPTS)
    with pytest.raises(ValueError, match="quantile_level must lie in"):
        RolloutScorer(policy, DigitRewardModel(tokenizer), tokenizer, quantile_level=1.0)


def test_a_curve_needs_held_out_prompts(tokenizer, tmp_path):
    config = ReinforceConfig(output_dir=str(tmp_path), curve_eval_steps=1)
    policy = build_tiny_policy(tokenizer, seed=2, **SMALL)
    scorer = RolloutScorer(policy, DigitRewardModel(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="needs held-out prompts"):
        ReinforceTrainer(config, policy, tokenizer, scorer, DIGIT_PROMPTS)


@torch.no_grad()
def test_scorer_gives_the_quantile_of_the_reward_distribution_only_when_asked(saved_models):
    policy, reference, tokenizer = load_policy_and_reference(str(saved_models / "sft"))
    reward_model, _ = load_reward_model(str(saved_models / "rm"), tokenizer)
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, ["What is 3 + 4?", "Sort: 3 1 2"], samples_per_prompt=2,
                                max_new_tokens=4)
    logprobs = token_logprobs(policy, rollout)
    assert RolloutScorer(reference, reward_model, tokenizer).score(rollout, logprobs).quantile is None
    scorer = RolloutScorer(reference, reward_model, tokenizer, quantile_level=0.25)
    scores = scorer.score(rollout, logprobs)
    expected = distribution_quantile(scorer.reward(rollout).bin_logits, 0.25, reward_model.low, reward_model.high)
    torch.testing.assert_close(scores.quantile, expected)
    assert [record["quantile"] for record in scores.records(rollout)] == scores.quantile.tolist()


def test_evaluation_of_two_policies_is_paired(saved_models, tmp_path):
    """evaluate() draws from its own seeded stream: the same weights give the same samples whatever the global
    RNG did before or which policy went first, and it leaves the global RNG as it found it; so the SFT and
    the trained policy see the same prompts and random numbers, and identical policies compare as a gain of 0."""
    config = rl_config(saved_models, tmp_path, num_eval_prompts=6, eval_samples_per_prompt=2, max_new_tokens=6,
                       task="v1")  # the prompts and ground truth of task v1, below
    policy, reference, tokenizer = load_policy_and_reference(config.policy_path)
    reward_model, _ = load_reward_model(config.reward_model_path, tokenizer)
    scorer = RolloutScorer(reference, reward_model, tokenizer, synthetic.score_response)
    prompts = synthetic.make_prompts(6, seed=0, split="test", unique=True)
    trainer = ReinforceTrainer(config, policy, tokenizer, scorer, prompts)
    other = build_tiny_policy(tokenizer, seed=9, **SMALL)
    first = trainer.evaluate(policy, prompts)[1]
    torch.rand(100)
    state = torch.get_rng_state()
    trainer.evaluate(other, prompts)
    assert torch.equal(torch.get_rng_state(), state)
    second = trainer.evaluate(policy, prompts)[1]
    assert first == second and len({record["response"] for record in first}) > 1  # sampled, yet repeatable
    samples = [{"policy": name, **record} for name, records in (("sft", first), ("trained", second))
               for record in records]
    comparison = compare_policies(samples)
    assert comparison["ground_truth"]["gain"] == comparison["reward"]["gain"] == 0.0
    assert comparison["ground_truth"]["ci95"] == [0.0, 0.0]


@pytest.mark.parametrize("task, split_key", [("v1", lambda prompt: prompt), ("v2", testbed.problem_key)],
                         ids=["v1", "v2"])  # task v1 splits by prompt, task v2 by the problem behind a prompt
@pytest.mark.parametrize("eval_split", ["test", "validation"])
def test_embedded_held_out_prompts_are_distinct_and_from_their_split(eval_split, task, split_key):
    config = ReinforceConfig(num_train_prompts=64, num_eval_prompts=32, eval_split=eval_split, task=task)
    train, held_out, ground_truth = load_prompts(config)
    assert len(train) == 64 and len(set(held_out)) == 32 and ground_truth is not None
    assert {prompt_split(split_key(p)) for p in train} == {"train"}
    assert {prompt_split(split_key(p)) for p in held_out} == {eval_split}


def test_eval_split_must_be_held_out():
    with pytest.raises(ValueError, match="--eval_split must be one of test, validation"):
        ReinforceConfig(eval_split="train")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tokenizer):
    """A tiny 'SFT' policy and a reward model on it, saved as the sft / rm stages save them."""
    root = tmp_path_factory.mktemp("models")
    policy = build_tiny_policy(tokenizer, seed=3, **SMALL)
    policy.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    torch.manual_seed(0)
    reward_model = DistRewardForSequenceClassification.from_backbone(policy)
    save_reward_model(reward_model, tokenizer, root / "rm")
    return root


def rl_config(saved_models, output_dir, **overrides) -> ReinforceConfig:
    settings = dict(policy_path=str(saved_models / "sft"), reward_model_path=str(saved_models / "rm"),
                    output_dir=str(output_dir), num_train_prompts=16, num_eval_prompts=4, max_steps=4,
                    per_device_train_batch_size=4, samples_per_prompt=2, max_new_tokens=4, save_steps=2,
                    learning_rate=1e-2, eval_samples_per_prompt=1, sharpening_grid=[1.0, 0.0], sharpening_prompts=8)
    return ReinforceConfig(**{**settings, **overrides})


def test_run_reinforce_writes_spec_outputs(saved_models, tmp_path):
    config = rl_config(saved_models, tmp_path)
    report = run_reinforce(config)
    assert set(report) == {"sft", "trained", "comparison", "sharpened_sft"}  # the embedded task's sharpened baseline
    sharpened = report["sharpened_sft"]
    assert [row["temperature"] for row in sharpened["grid"]] == config.sharpening_grid
    assert sharpened["temperature"] in config.sharpening_grid and sharpened["verdict"].startswith("the trained policy")
    comparison = report["comparison"]
    assert comparison["num_prompts"] == 4 and isinstance(comparison["over_optimisation"], bool)
    for key in ("reward", "ground_truth"):
        gain, (low, high) = comparison[key]["gain"], comparison[key]["ci95"]
        assert low <= gain <= high
        assert gain == pytest.approx(comparison[key]["trained"] - comparison[key]["sft"])
        assert comparison[key]["sft"] == pytest.approx(report["sft"][key]["mean"])
    assert comparison["verdict"].split(":")[0] in ("IMPROVED", "WORSE", "NO CLEAR CHANGE", "OVER-OPTIMISATION")
    for summary in (report["sft"], report["trained"]):
        assert set(summary) == {"reward", "mean_sd", "kl_to_ref", "ground_truth"}
        assert set(summary["reward"]) == {"min", "max", "mean", "std"} and set(summary["ground_truth"]) == {"mean"}
        assert summary["reward"]["min"] <= summary["reward"]["mean"] <= summary["reward"]["max"]
    assert report["sft"]["kl_to_ref"] == 0.0  # the reference scored against itself
    assert json.load(open(tmp_path / "eval.json")) == report
    assert json.load(open(tmp_path / "config.json"))["shaping"] == "std_scale"
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "reward", "reward_sd", "kl", "total_reward", "ground_truth"} <= set(metrics[0])
    phases = {f"seconds_{phase}" for phase in ("generation", "policy_logprobs", "reference_logprobs", "reward",
                                                "loss", "backward", "optimizer")}
    assert all(phases == {key for key in record if key.startswith("seconds_")} for record in metrics)
    assert all(record[key] > 0 for record in metrics for key in phases)
    assert os.path.isfile(tmp_path / "policy" / "model.safetensors")
    samples = [json.loads(line) for line in open(tmp_path / "eval_samples.jsonl")]
    assert collections.Counter(s["policy"] for s in samples) == {"sft": 4, "trained": 4, "sharpened": 4,
                                                                 "trained_sharpened": 4}


def test_temperature_baselines_sample_the_sft_policy_on_the_same_prompts(saved_models, tmp_path):
    """A baseline at the run's own temperature is the SFT evaluation again (same seeded samples: gain and KL
    exactly 0); one at a lower temperature is sampled from softmax(logits / T) of the SFT policy."""
    report = run_reinforce(rl_config(saved_models, tmp_path, temperature_baselines=[1.0, 0.25]))
    same, sharper = report["temperature_baselines"]
    assert same["temperature"] == 1.0 and sharper["temperature"] == 0.25
    for key in ("ground_truth", "reward"):
        assert same[key]["gain"] == 0.0 and same[key]["tempered"] == same[key]["sft"] == report["comparison"][key]["sft"]
        assert sharper[key]["sft"] == report["comparison"][key]["sft"]
        low, high = sharper[key]["ci95"]
        assert low <= sharper[key]["gain"] <= high
        assert sharper[key]["gain"] == pytest.approx(sharper[key]["tempered"] - sharper[key]["sft"])
    # the tempered samples are scored by softmax(logits / T): their log-ratio to the reference is no longer exactly 0
    # (its sign is the Monte Carlo estimate's, on 16 samples of a barely trained model: not asserted)
    assert same["kl_to_ref"] == 0.0 and sharper["kl_to_ref"] != 0.0 and math.isfinite(sharper["kl_to_ref"])
    assert json.load(open(tmp_path / "eval.json")) == report
    samples = read_jsonl(tmp_path / "eval_samples.jsonl")  # the temperature baselines' samples are not in it
    assert len(samples) == 4 * 4 and {s["policy"] for s in samples} == {"sft", "trained", "sharpened",
                                                                        "trained_sharpened"}
    lines = format_report(report).splitlines()[-2:]
    assert all(line.startswith("baseline: the SFT policy at temperature") for line in lines)
    assert "temperature 0.25" in lines[1] and f"KL {sharper['kl_to_ref']:.3f}" in lines[1]


@pytest.mark.parametrize("settings", [dict(temperature=-1.0), dict(temperature=float("inf")),
                                      dict(temperature_baselines=[0.8, 0.0]), dict(temperature_baselines=[float("nan")])])
def test_temperatures_must_be_positive(settings):
    with pytest.raises(ValueError, match="temperature must be"):
        ReinforceConfig(**settings)
    assert ReinforceConfig(temperature=0.0).temperature == 0.0  # greedy rollouts (scored untempered)


def read_jsonl(path) -> list:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_curve_records_ground_truth_against_kl_and_leaves_training_alone(saved_models, tmp_path):
    """curve.jsonl has a point at step 0 (the policy is the reference: KL 0), every curve_eval_steps steps and at
    the last step; its evaluations draw from their own seeded stream, so training matches a run without them.
    Runs with the quantile shaping, which the scorer feeds with the real reward model's quantile."""
    settings = dict(max_steps=5, shaping="quantile", quantile_level=0.3)
    run_reinforce(rl_config(saved_models, tmp_path / "plain", **settings))
    run_reinforce(rl_config(saved_models, tmp_path / "curve", curve_eval_steps=2, curve_eval_prompts=3, **settings))
    assert not os.path.exists(tmp_path / "plain" / "curve.jsonl")
    curve = read_jsonl(tmp_path / "curve" / "curve.jsonl")
    assert [point["step"] for point in curve] == [0, 2, 4, 5]
    for point in curve:
        assert list(point) == ["step", "kl_to_ref", "ground_truth", "ground_truth_by_region", "reward", "reward_std",
                               "num_prompts"]
        assert point["num_prompts"] == 3 and 0 <= point["reward"] <= 1 and 0 <= point["ground_truth"] <= 4
        by_region = point["ground_truth_by_region"]  # the 3 prompts' regions: their means bracket the overall one
        assert set(by_region) <= set(testbed.REGIONS) and len(by_region) >= 2
        assert min(by_region.values()) - 1e-9 <= point["ground_truth"] <= max(by_region.values()) + 1e-9
        assert 0 < point["reward_std"] < 0.5
    assert abs(curve[0]["kl_to_ref"]) < 1e-6 and abs(curve[-1]["kl_to_ref"]) > 1e-3
    for name in ("eval.json", "eval_samples.jsonl"):
        assert open(tmp_path / "plain" / name).read() == open(tmp_path / "curve" / name).read(), name
    assert jsonl_without_timings(tmp_path / "plain" / "metrics.jsonl") == \
        jsonl_without_timings(tmp_path / "curve" / "metrics.jsonl")
    assert "reward_quantile" in read_jsonl(tmp_path / "curve" / "metrics.jsonl")[0]


@pytest.mark.parametrize("shaping", ["std_penalty", "std_scale", "quantile"])
def test_a_scalar_reward_model_takes_only_shaping_none(saved_models, tmp_path, monkeypatch, shaping):
    def load_scalar(path, tokenizer):
        model, reward_tokenizer = load_reward_model(path, tokenizer)
        model.config.head = "scalar"  # is_scalar: run_reinforce refuses before any forward pass
        return model, reward_tokenizer

    monkeypatch.setattr(rl_trainer, "load_reward_model", load_scalar)
    with pytest.raises(ValueError, match="scalar reward model: use --shaping none"):
        run_reinforce(rl_config(saved_models, tmp_path, shaping=shaping))


@pytest.mark.parametrize("settings", [dict(baseline="ema"),
                                      dict(shaping="std_penalty", std_source="shuffled", curve_eval_steps=1)],
                         ids=["ema", "shuffled-std-curve"])
def test_resume_continues_exactly_where_a_killed_run_stopped(saved_models, tmp_path, monkeypatch, settings):
    """Same weights, metrics.jsonl and curve.jsonl (no duplicate points) as an uninterrupted run; the shuffled
    std draws from the RNG the checkpoint restores."""
    run_reinforce(rl_config(saved_models, tmp_path / "whole", **settings))

    original = ReinforceTrainer.compute_loss
    # killed at step 4: after checkpoint-2 and one more logged step
    monkeypatch.setattr(ReinforceTrainer, "compute_loss", killed_at(4, original))
    with pytest.raises(Killed):
        run_reinforce(rl_config(saved_models, tmp_path / "killed", **settings))
    assert os.path.isdir(tmp_path / "killed" / "checkpoint-2")
    monkeypatch.setattr(ReinforceTrainer, "compute_loss", original)
    run_reinforce(rl_config(saved_models, tmp_path / "killed", resume=True, **settings))

    whole = load_file(tmp_path / "whole" / "policy" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "policy" / "model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name])
    assert jsonl_without_timings(tmp_path / "whole" / "metrics.jsonl") == \
        jsonl_without_timings(tmp_path / "killed" / "metrics.jsonl")
    if "curve_eval_steps" in settings:
        assert open(tmp_path / "whole" / "curve.jsonl").read() == open(tmp_path / "killed" / "curve.jsonl").read()
    if "curve_eval_steps" in settings:
        assert [point["step"] for point in read_jsonl(tmp_path / "killed" / "curve.jsonl")] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_every_score_is_on_the_rollouts_device(saved_models, device):
    """The trainer stacks the scores into one metrics tensor: a score left on the CPU breaks a GPU run."""
    policy, reference, tokenizer = load_policy_and_reference(str(saved_models / "sft"))
    reward_model, _ = load_reward_model(str(saved_models / "rm"), tokenizer)
    policy, reference, reward_model = policy.to(device), reference.to(device), reward_model.to(device)
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tokenizer, ["What is 3 + 4?", "Sort: 3 1 2"], samples_per_prompt=2,
                                max_new_tokens=4).to(device)
    scorer = RolloutScorer(reference, reward_model, tokenizer, ground_truth=synthetic.score_response,
                           quantile_level=0.25)
    scores = scorer.score(rollout, token_logprobs(policy, rollout))
    for name in ("reward", "std", "kl", "ground_truth", "quantile"):
        assert getattr(scores, name).device == rollout.input_ids.device, name
