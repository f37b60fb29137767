"""The whole embedded pipeline (SFT -> RM -> REINFORCE -> report) in a tiny configuration."""
import json
import os
from dataclasses import replace

import pytest
import torch

from distreward import cli, pipeline, testbed
from distreward.pipeline import PipelineConfig, run_pipeline, run_stages
from distreward.policy_comparison import compare_policies, paired_bootstrap
from distreward.run_files import EVAL_NAME, finished_mark

# The default task v2 with its sharpened-SFT baseline on two temperatures; 8 held-out prompts (two of each family,
# so the taste region has the two prompts a per-region paired comparison needs).
TINY = dict(num_pairs=64, sft_epochs=1.0, rm_epochs=1.0, rl_steps=2, num_eval_prompts=8, sharpening_grid=[1.0, 0.0])
# Stage settings the pipeline leaves at their defaults, made small: the SFT policy's greedy evaluation on 8 test
# prompts, and the sharpening temperature chosen on 8 validation prompts.
SFT_EVAL_PROMPTS, SHARPENING_PROMPTS = 8, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_evaluations(monkeypatch) -> None:
    stage_configs = pipeline.stage_configs

    def small(*args):
        sft, rm, rl = stage_configs(*args)
        return (replace(sft, num_eval_prompts=SFT_EVAL_PROMPTS), rm,
                replace(rl, sharpening_prompts=SHARPENING_PROMPTS))

    monkeypatch.setattr(pipeline, "stage_configs", small)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as monkeypatch:
        small_evaluations(monkeypatch)
        report = run_pipeline(PipelineConfig(output_dir=str(output_dir), **TINY))
    return output_dir, report


def test_pipeline_writes_report_and_plots(pipeline_run):
    output_dir, report = pipeline_run
    assert json.load(open(output_dir / "report.json")) == report
    assert report["comparison"]["num_prompts"] == TINY["num_eval_prompts"] and report["comparison"]["verdict"]
    for name in ("sft", "trained"):
        assert set(report[name]) == {"reward", "mean_sd", "kl_to_ref", "ground_truth"}
        assert set(report[name]["reward"]) == {"min", "max", "mean", "std"}
        assert 0.0 <= report[name]["reward"]["min"] <= report[name]["reward"]["max"] <= 1.0
        assert 0.0 <= report[name]["ground_truth"]["mean"] <= 4.0
    for plot in ("reward_histogram.png", "training_curves.png"):
        assert open(output_dir / plot, "rb").read(8) == PNG_MAGIC
    for stage, output in (("sft", "model.safetensors"), ("rm", "eval.json"), ("rl", "eval.json"),
                          ("rl", "metrics.jsonl"), ("rl", "config.json")):
        assert os.path.isfile(output_dir / stage / output)
    assert json.load(open(output_dir / "config.json"))["rl_steps"] == 2
    assert not list(output_dir.glob("*/checkpoint-*"))  # finished stages keep no checkpoints


def test_pipeline_compares_with_the_sharpened_sft_policy_per_region(pipeline_run):
    """Task v2 (the default): the trained policy against the best sharpened SFT policy, chosen on validation
    prompts, and both comparisons per region."""
    output_dir, report = pipeline_run
    assert json.load(open(output_dir / "rl" / "config.json"))["task"] == "v2"
    sharpened = report["sharpened_sft"]
    assert sharpened["verdict"].startswith("the trained policy")
    assert [row["temperature"] for row in sharpened["grid"]] == TINY["sharpening_grid"]
    assert sharpened["temperature"] in TINY["sharpening_grid"]
    assert sharpened["chosen_on"] == f"{SHARPENING_PROMPTS} validation prompts"
    both = sharpened["trained_sharpened"]  # the trained policy sharpened the same way, on the same prompts
    assert both["verdict"].startswith(f"the trained policy sharpened to temperature {both['temperature']:g} ")
    assert [row["temperature"] for row in both["grid"]] == TINY["sharpening_grid"]
    assert both["ground_truth"]["sharpened"] == sharpened["ground_truth"]["sharpened"]
    assert both["ground_truth"]["gain"] == pytest.approx(both["ground_truth"]["trained_sharpened"]
                                                         - both["ground_truth"]["sharpened"])
    for by_region in (report["comparison"]["by_region"], sharpened["by_region"], both["by_region"]):
        assert "taste" in by_region and set(by_region) <= set(testbed.REGIONS)
        assert all(gains["num_prompts"] >= 2 for gains in by_region.values())
        assert sum(gains["num_prompts"] for gains in by_region.values()) <= TINY["num_eval_prompts"]


def test_pipeline_console_tells_the_story_once(tmp_path, capsys, monkeypatch):
    small_evaluations(monkeypatch)
    run_pipeline(PipelineConfig(output_dir=str(tmp_path), **TINY))
    out, err = capsys.readouterr()
    assert [line.split(" ->")[0] for line in out.splitlines() if line.startswith("[")] == [
        "[1/3] SFT warm-up", "[2/3] reward model", "[3/3] REINFORCE"]
    assert out.count("| policy |") == 1 and out.count("verdict: ") == 1  # the table and its verdict, once
    assert out.count("against the strongest cheap baseline: the trained policy") == 1  # the sharpened SFT's verdict
    assert out.count("both sharpened: the trained policy sharpened to temperature") == 1
    assert "greedy answers to" in out and "sampled responses each" in out  # the two SFT scores, labelled
    assert "reward_histogram.png" in out and "training_curves.png" in out
    assert f"`python -m distreward.serve {tmp_path / 'rm'}`" in out and "docs/integrations.md" in out
    assert "Writing model shards" not in err


def test_pipeline_reuses_finished_stages(pipeline_run):
    output_dir, report = pipeline_run
    dirs = [str(output_dir / name) for name in ("sft", "rm", "rl")]
    stamps = [os.path.getmtime(os.path.join(d, "config.json" if "sft" not in d else "model.safetensors")) for d in dirs]
    again = run_stages(PipelineConfig(output_dir=str(output_dir), reuse_finished_stages=True, **TINY))
    assert again == report
    assert stamps == [os.path.getmtime(os.path.join(d, "config.json" if "sft" not in d else "model.safetensors"))
                      for d in dirs]


def test_rl_alone_finds_the_pipelines_policy_and_reward_model(pipeline_run, tmp_path):
    output_dir, _ = pipeline_run
    rl_dir = tmp_path / "rl"
    assert cli.main(["rl", "--run_dir", str(output_dir), "--output_dir", str(rl_dir), "--max_steps", "1",
                       "--num_train_prompts", "8", "--per_device_train_batch_size", "4", "--num_eval_prompts", "2",
                       "--samples_per_prompt", "2", "--sharpening_grid", "1.0", "0.0",
                       "--sharpening_prompts", str(SHARPENING_PROMPTS)]) == 0
    settings = json.load(open(rl_dir / "config.json"))
    assert (settings["policy_path"], settings["reward_model_path"]) == (str(output_dir / "sft"), str(output_dir / "rm"))


def test_cli_rejects_a_bad_setting(capsys):
    assert cli.main(["pipeline", "--shaping", "sqrt"]) == 2
    assert "shaping" in capsys.readouterr().err


def test_cli_rl_stage_explains_a_missing_policy(tmp_path, capsys):
    assert cli.main(["rl", "--policy_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)]) == 2
    assert "run `python -m distreward.train sft` first" in capsys.readouterr().err


def samples_for(rewards: dict, truths: dict) -> list:
    """eval_samples.jsonl records: per policy, two samples for each of len(rewards[policy]) // 2 prompts."""
    return [{"policy": name, "prompt": f"p{index // 2}", "reward": reward, "ground_truth": truth}
            for name in ("sft", "trained") for index, (reward, truth) in enumerate(zip(rewards[name], truths[name]))]


def test_paired_bootstrap_interval():
    assert paired_bootstrap(torch.full((5,), 0.25)) == pytest.approx((0.25, 0.25))
    low, high = paired_bootstrap(torch.tensor([0.0, 1.0] * 50))
    assert 0.35 < low < 0.5 < high < 0.65  # the mean 0.5 +- 1.96 * 0.05
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap(torch.tensor([1.0]))


def test_reward_up_ground_truth_down_is_flagged_as_over_optimisation():
    comparison = compare_policies(samples_for({"sft": [0.5] * 8, "trained": [0.9] * 8},
                                              {"sft": [3.0] * 8, "trained": [2.0, 3.0] * 4}))
    assert comparison["num_prompts"] == 4 and comparison["over_optimisation"]
    assert comparison["ground_truth"]["gain"] == pytest.approx(-0.5)
    assert comparison["ground_truth"]["ci95"] == pytest.approx([-0.5, -0.5])  # every prompt lost 0.5
    assert comparison["verdict"].startswith(
        "OVER-OPTIMISATION: the RM reward rose while the ground truth 3.000 -> 2.500")


def test_a_clear_ground_truth_gain_is_reported_as_improved():
    comparison = compare_policies(samples_for({"sft": [0.5] * 8, "trained": [0.6] * 8},
                                              {"sft": [2.0] * 8, "trained": [3.0, 2.0, 4.0, 2.0] * 2}))
    assert not comparison["over_optimisation"] and comparison["ground_truth"]["ci95"][0] > 0
    assert comparison["verdict"].startswith("IMPROVED: ground truth 2.000 -> 2.750 (+0.750, 95% CI")


def test_the_pipeline_takes_the_report_the_rl_stage_returns(tmp_path, monkeypatch):
    """run_stages returns what run_reinforce returned, not eval.json read back; a reused rl stage's eval.json is
    read (stage runs replaced by ones that write the finished marks only)."""
    config = PipelineConfig(output_dir=str(tmp_path))
    marks = ((0, "run_sft", finished_mark("sft", evaluates=True)), (1, "run_reward_training", finished_mark("rm")),
             (2, "run_reinforce", finished_mark("rl")))
    for index, name, mark in marks:
        def run(stage_config, mark=mark, last=index == 2):
            os.makedirs(stage_config.output_dir, exist_ok=True)
            with open(os.path.join(stage_config.output_dir, mark), "w") as handle:
                handle.write("{}")
            if last:
                with open(os.path.join(stage_config.output_dir, EVAL_NAME), "w") as handle:
                    json.dump({"read": "from disk"}, handle)
                return {"returned": "by run_reinforce"}

        monkeypatch.setattr(pipeline, name, run)
    assert run_stages(config) == {"returned": "by run_reinforce"}
    assert run_stages(replace(config, reuse_finished_stages=True)) == {"read": "from disk"}
