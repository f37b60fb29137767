"""Stage settings: validated when built, one default per setting, and stage paths that chain."""
import os

import pytest

from distreward.pipeline import PipelineConfig, stage_configs
from distreward.rl_trainer import ReinforceConfig
from distreward.rm_trainer import RewardConfig
from distreward.sft_trainer import SFTConfig
from distreward.trainer_utils import TrainingConfig


@pytest.mark.parametrize("config_class, settings, match", [
    (TrainingConfig, {"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps must be >= 1"),
    (SFTConfig, {"num_pairs": 0}, "--num_pairs"),
    (RewardConfig, {"loss_kind": "mse"}, "--loss_kind must be one of bt_mean, bt_kl, dpl, scalar_bt, scalar_reg, got 'mse'"),
    (RewardConfig, {"margin_temperature": 0.0}, "--margin_temperature must be > 0"),
    (RewardConfig, {"sigma": 0.0}, "--sigma must be > 0"),
    (RewardConfig, {"num_bins": 1}, "num_bins must be an integer >= 2"),
    (ReinforceConfig, {"shaping": "sqrt"}, "--shaping must be one of none, std_penalty, std_scale, quantile"),
    (ReinforceConfig, {"std_source": "sorted"}, "--std_source must be one of model, constant, shuffled"),
    (ReinforceConfig, {"shaping": "none", "std_source": "shuffled"}, "--std_source 'shuffled' is a control"),
    (ReinforceConfig, {"shaping": "quantile", "std_source": "constant"}, "--std_source 'constant' is a control"),
    (ReinforceConfig, {"shaping": "quantile", "quantile_level": 1.0}, r"--quantile_level must lie in \(0, 1\)"),
    (ReinforceConfig, {"quantile_level": -0.5}, "--quantile_level"),
    (ReinforceConfig, {"curve_eval_steps": -1}, "--curve_eval_steps must be >= 0"),
    (ReinforceConfig, {"curve_eval_prompts": 0}, "--curve_eval_prompts must be >= 1"),
    (PipelineConfig, {"shaping": "none", "std_source": "constant"}, "--std_source 'constant' is a control"),
    (PipelineConfig, {"quantile_level": 0.0}, "--quantile_level"),
    (PipelineConfig, {"curve_eval_steps": -2}, "--curve_eval_steps"),
    (ReinforceConfig, {"beta": -1.0}, "--beta must be >= 0"),
    (ReinforceConfig, {"baseline": "rloo", "samples_per_prompt": 1}, "samples_per_prompt >= 2"),
    (ReinforceConfig, {"baseline": "ema", "ema_decay": 1.0}, "decay"),
    (PipelineConfig, {"baseline": "median"}, "baseline must be one of ema, rloo, batch"),
    (PipelineConfig, {"loss_kind": "mse"}, "--loss_kind"),
    (PipelineConfig, {"sft_epochs": 0.0}, "--num_train_epochs"),
])
def test_an_invalid_config_cannot_be_built(config_class, settings, match):
    with pytest.raises(ValueError, match=match):
        config_class(**settings)


def test_pipeline_defaults_are_the_stage_defaults():
    pipeline, sft, rm, rl = PipelineConfig(), SFTConfig(), RewardConfig(), ReinforceConfig()
    assert (pipeline.seed, pipeline.num_pairs) == (sft.seed, sft.num_pairs) == (rm.seed, rm.num_pairs)
    assert pipeline.sft_epochs == sft.num_train_epochs  # `train sft` alone trains as long as the pipeline's SFT
    assert (pipeline.rm_epochs, pipeline.loss_kind) == (rm.num_train_epochs, rm.loss_kind)
    assert (pipeline.rl_steps, pipeline.rl_learning_rate, pipeline.shaping, pipeline.baseline, pipeline.beta,
            pipeline.alpha) == (rl.max_steps, rl.learning_rate, rl.shaping, rl.baseline, rl.beta, rl.alpha)
    assert (pipeline.num_eval_prompts, pipeline.eval_split) == (rl.num_eval_prompts, rl.eval_split)
    assert (pipeline.std_source, pipeline.quantile_level, pipeline.curve_eval_steps, pipeline.curve_eval_prompts) == (
        rl.std_source, rl.quantile_level, rl.curve_eval_steps, rl.curve_eval_prompts)
    assert pipeline.temperature_baselines == rl.temperature_baselines == []


def test_pipeline_passes_the_shaping_controls_and_the_curve_to_the_rl_stage():
    settings = dict(shaping="std_penalty", std_source="shuffled", quantile_level=0.1, curve_eval_steps=5,
                    curve_eval_prompts=8, temperature_baselines=[0.9, 0.7])
    rl = stage_configs(PipelineConfig(**settings, rl_learning_rate=3e-4), "sft", "rm", "rl")[2]
    assert {name: getattr(rl, name) for name in settings} == settings and rl.learning_rate == 3e-4


@pytest.mark.parametrize("run_dir", [None, "elsewhere/run"])
def test_stage_defaults_chain_with_the_pipelines_directories(run_dir):
    """Each stage alone reads and writes where `python -m distreward.train` (or --run_dir) put the others."""
    named = {} if run_dir is None else {"run_dir": run_dir}
    root = PipelineConfig(**({} if run_dir is None else {"output_dir": run_dir})).output_dir
    sft, rm, rl = stage_configs(PipelineConfig(output_dir=root),
                                *(os.path.join(root, name) for name in ("sft", "rm", "rl")))
    assert SFTConfig(**named).output_dir == sft.output_dir
    alone_rm = RewardConfig(**named)
    assert (alone_rm.output_dir, alone_rm.model_name_or_path) == (rm.output_dir, rm.model_name_or_path)
    alone_rl = ReinforceConfig(**named)
    assert (alone_rl.output_dir, alone_rl.policy_path, alone_rl.reward_model_path) == (
        rl.output_dir, rl.policy_path, rl.reward_model_path)
    assert ReinforceConfig(policy_path="mine", **named).policy_path == "mine"  # an explicit path wins
