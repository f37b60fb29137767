"""distreward.integrations.trl: reward functions for TRL's RLOO / GRPO trainers (docs/integrations.md).

The reference for every reward is distreward's own RL stage: :meth:`distreward.rollout.RolloutScorer.reward` on
the same (prompt, response) pairs, shaped by :func:`distreward.rewards.shape_rewards`.
"""
import json

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from distreward.integrations import trl as integration  # noqa: E402
from distreward.integrations.trl import DistributionalReward  # noqa: E402
from distreward.modeling import DistRewardForSequenceClassification, save_reward_model  # noqa: E402
from distreward.rewards import RLOOBaseline, distribution_quantile, shape_rewards  # noqa: E402
from distreward.rollout import Rollout, RolloutScorer  # noqa: E402
from distreward.tiny import build_tiny_policy  # noqa: E402

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
ALPHA, LEVEL = 0.5, 0.25
QUESTIONS = ["What is 2 + 3?", "Sort: 3 1 2", "How many a in: banana?", "Is 7 prime?"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """TRL's trainers set accelerate's process-wide state (their precision); later tests build their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """(policy directory, reward-model directory): tiny models saved as the sft and rm stages save them."""
    root = tmp_path_factory.mktemp("trl")
    policy_dir, rm_dir = root / "policy", root / "rm"
    build_tiny_policy(tokenizer, seed=0, **SMALL).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    torch.manual_seed(0)
    reward_model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=1, **SMALL))
    torch.nn.init.normal_(reward_model.head.weight, std=1.0)  # spread-out distributions: shapings differ
    save_reward_model(reward_model, tokenizer, str(rm_dir))
    return policy_dir, rm_dir


def counting_reward(rm_dir) -> DistributionalReward:
    """A DistributionalReward on the CPU whose model counts its forward calls in ``forward_calls``."""
    reward = DistributionalReward.from_pretrained(rm_dir, device="cpu")
    forward = reward.model.forward
    reward.forward_calls = 0

    def counting(*args, **kwargs):
        reward.forward_calls += 1
        return forward(*args, **kwargs)

    reward.model.forward = counting
    return reward


def reference_outputs(reward: DistributionalReward, questions: list, answers: list) -> dict:
    """The RL stage's reward-model output on (question, answer) pairs -> {name: [N] fp32} of every reward."""
    empty = torch.zeros(len(questions), 1, dtype=torch.long)
    rollout = Rollout(empty, empty, empty.bool(), list(questions), list(answers))
    scorer = RolloutScorer(reward.model, reward.model, reward.tokenizer)
    with torch.no_grad():
        output = scorer.reward(rollout)
    quantile = distribution_quantile(output.bin_logits, LEVEL, reward.model.low, reward.model.high)
    zeros = torch.zeros_like(output.mean)
    shaped = {shaping: shape_rewards(output.mean, output.std, zeros, shaping, beta=0.0, alpha=ALPHA,
                                     quantile=quantile) for shaping in ("none", "std_penalty", "std_scale", "quantile")}
    return {"rm_mean": output.mean, "rm_std": output.std, f"rm_quantile_{LEVEL:g}": quantile,
            **{f"rm_{shaping}": value for shaping, value in shaped.items()}}


def reward_funcs(reward: DistributionalReward) -> list:
    return [reward.mean, reward.std, reward.quantile(LEVEL), reward.shaped("none"),
            reward.shaped("std_penalty", alpha=ALPHA), reward.shaped("std_scale"),
            reward.shaped("quantile", quantile_level=LEVEL)]


def test_reward_functions_share_one_forward_and_match_the_rl_stage(model_dirs):
    reward = counting_reward(model_dirs[1])
    answers = ["5", "1 2 3", "3", ""]
    conversational = ([[{"role": "user", "content": q}] for q in QUESTIONS],
                      [[{"role": "assistant", "content": a}] for a in answers])
    expected = reference_outputs(reward, QUESTIONS, answers)
    assert not torch.allclose(expected["rm_std_scale"], expected["rm_mean"])  # the shapings are told apart
    logged = []
    for prompts, completions in ((QUESTIONS, answers), conversational):
        calls = reward.forward_calls
        for func in reward_funcs(reward):
            values = func(prompts=prompts, completions=completions, completion_ids=None,
                          log_metric=lambda name, value: logged.append((name, value)))
            assert isinstance(values, list) and all(isinstance(value, float) for value in values)
            torch.testing.assert_close(torch.tensor(values), expected[func.__name__], rtol=1e-6, atol=1e-6)
        assert reward.forward_calls == calls + 1
    assert {name for name, _ in logged} == {"rm/mean", "rm/std"}
    assert dict(logged)["rm/mean"] == pytest.approx(expected["rm_mean"].mean().item())
    assert dict(logged)["rm/std"] == pytest.approx(expected["rm_std"].mean().item())


def test_bad_settings_are_one_line_errors(model_dirs, monkeypatch):
    reward = DistributionalReward.from_pretrained(model_dirs[1], device="cpu")
    with pytest.raises(ValueError, match="shaping must be one of"):
        reward.shaped("std_clip")
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        reward.quantile(1.0)
    with pytest.raises(ValueError, match="as many prompts as completions"):
        reward.mean(prompts=["a", "b"], completions=["c"])
    monkeypatch.setattr(integration, "_shared", None)
    monkeypatch.delenv(integration.RM_PATH_ENV, raising=False)
    with pytest.raises(ValueError, match=f"set {integration.RM_PATH_ENV}"):
        integration.rm_mean(prompts=["a"], completions=["b"])
    monkeypatch.setenv(integration.RM_PATH_ENV, str(model_dirs[0]))
    with pytest.raises(ValueError, match="holds a policy"):
        integration.rm_mean(prompts=["a"], completions=["b"])


def prompt_dataset(num_prompts: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + {i}?"}]
                                         for i in range(num_prompts)]})


TRAINERS = {"rloo": (RLOOTrainer, RLOOConfig), "grpo": (GRPOTrainer, GRPOConfig)}


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_trainer_rewards_match_shape_rewards_and_two_steps_train(kind, model_dirs, tokenizer, tmp_path):
    """Two steps of TRL's trainer on CPU; the last batch's rewards, re-scored by the RL stage, match TRL's per
    function; RLOO's advantages are the RLOO baseline of shape_rewards' std_penalty (beta = 0: exact)."""
    policy_dir, rm_dir = model_dirs
    reward = counting_reward(rm_dir)
    trainer_class, config_class = TRAINERS[kind]
    funcs = [reward.mean, reward.std, reward.quantile(LEVEL), reward.shaped("std_scale")]
    args = config_class(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=4, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                        beta=0.0, reward_weights=[1.0, -ALPHA, 0.0, 0.0, 0.0], save_strategy="no", seed=0,
                        learning_rate=1e-3, bf16=False)  # fp32: TRL autocasts the models it prepares to bf16
    # the last: the directory itself, which TRL loads as a sequence classifier and reads logits[:, 0] = E from
    trainer = trainer_class(model=str(policy_dir), reward_funcs=[*funcs, str(rm_dir)], args=args,
                            train_dataset=prompt_dataset(), processing_class=tokenizer)
    trainer.train()
    assert reward.forward_calls == 2  # one per generation batch, for four reward functions
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert entry["rm/mean"] == pytest.approx(entry["rewards/rm_mean/mean"], rel=1e-5)
        assert entry["rm/std"] == pytest.approx(entry["rewards/rm_std/mean"], rel=1e-5)

    logs = trainer._logs  # the last generation batch: its prompts, completions, rewards and advantages
    questions = [prompt[-1]["content"] for prompt in logs["prompt"]]
    answers = [completion[-1]["content"] for completion in logs["completion"]]
    expected = reference_outputs(reward, questions, answers)
    for func in funcs:
        torch.testing.assert_close(torch.tensor(list(logs["rewards"][func.__name__])), expected[func.__name__],
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(list(logs["rewards"][rm_dir.name])), expected["rm_mean"],
                               rtol=1e-5, atol=1e-6)
    if kind == "rloo":
        total = expected["rm_std_penalty"]
        torch.testing.assert_close(torch.tensor(list(logs["advantages"])), total - RLOOBaseline(2)(total, total.mean()),
                                   rtol=1e-5, atol=1e-6)


def test_trl_command_line_resolves_the_dotted_paths(model_dirs, tmp_path, monkeypatch):
    """TRL's rloo script (what `trl rloo` runs) with `--reward_funcs distreward.integrations.trl.rm_mean ...`."""
    from trl.scripts import rloo

    policy_dir, rm_dir = model_dirs
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as handle:
        for row in prompt_dataset(4):
            handle.write(json.dumps(row) + "\n")
    monkeypatch.setattr(integration, "_shared", None)
    monkeypatch.setenv(integration.RM_PATH_ENV, str(rm_dir))
    monkeypatch.setenv(integration.QUANTILE_LEVEL_ENV, "0.1")
    names = ["rm_mean", "rm_std", "rm_quantile", "rm_std_scale"]
    argv = ["--model_name_or_path", str(policy_dir), "--dataset_name", str(data_dir), "--output_dir",
            str(tmp_path / "out"), "--reward_funcs", *[f"distreward.integrations.trl.{name}" for name in names],
            "--reward_weights", "1", "-0.5", "0", "0", "--per_device_train_batch_size", "4", "--num_generations",
            "2", "--max_completion_length", "4", "--max_steps", "1", "--logging_steps", "1", "--report_to", "none",
            "--use_cpu", "--save_strategy", "steps", "--save_steps", "1", "--beta", "0"]
    script_args, training_args, model_args, dataset_args = rloo.make_parser().parse_args_and_config(argv)
    rloo.main(script_args, training_args, model_args, dataset_args)
    log = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]
    assert {f"rewards/{name}/mean" for name in names} | {"rm/mean", "rm/std"} <= set(log)
    assert log["rm/mean"] == pytest.approx(log["rewards/rm_mean/mean"], rel=1e-5)
    assert log["rm/std"] == pytest.approx(log["rewards/rm_std/mean"], rel=1e-5)


def test_module_functions_load_the_model_named_by_the_environment(model_dirs, monkeypatch):
    reward = DistributionalReward.from_pretrained(model_dirs[1], device="cpu")
    answers = ["5", "1 2 3", "3", ""]
    monkeypatch.setattr(integration, "_shared", None)
    monkeypatch.setenv(integration.RM_PATH_ENV, str(model_dirs[1]))
    monkeypatch.setenv(integration.QUANTILE_LEVEL_ENV, "0.1")
    pairs = {"prompts": QUESTIONS, "completions": answers}
    assert integration.rm_quantile(**pairs) == reward.quantile(0.1)(**pairs)
    assert integration.rm_quantile(**pairs) != reward.quantile(LEVEL)(**pairs)
    assert integration.rm_std_scale(**pairs) == reward.shaped("std_scale")(**pairs)
    assert [integration.rm_mean.__name__, integration.rm_std.__name__] == ["rm_mean", "rm_std"]
    monkeypatch.setenv(integration.QUANTILE_LEVEL_ENV, "2")
    with pytest.raises(ValueError, match=f"{integration.QUANTILE_LEVEL_ENV} must lie in"):
        integration.rm_quantile(**pairs)
