"""The whole embedded pipeline (SFT -> RM -> REINFORCE -> report) in a tiny configuration."""
import json
import os

import pytest

from distreward import train
from distreward.experiments import gains, results_table
from distreward.pipeline import PipelineConfig, run_pipeline, run_stages

TINY = dict(num_pairs=64, sft_epochs=1.0, rm_epochs=1.0, rl_steps=2, num_eval_prompts=4)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pipeline")
    report = run_pipeline(PipelineConfig(output_dir=str(output_dir), **TINY))
    return output_dir, report


def test_pipeline_writes_report_and_plots(pipeline_run):
    output_dir, report = pipeline_run
    assert json.load(open(output_dir / "report.json")) == report
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


def test_pipeline_reuses_finished_stages(pipeline_run):
    output_dir, report = pipeline_run
    dirs = [str(output_dir / name) for name in ("sft", "rm", "rl")]
    stamps = [os.path.getmtime(os.path.join(d, "config.json" if "sft" not in d else "model.safetensors")) for d in dirs]
    again = run_stages(PipelineConfig(output_dir=str(output_dir), reuse_finished_stages=True, **TINY), *dirs)
    assert again == report
    assert stamps == [os.path.getmtime(os.path.join(d, "config.json" if "sft" not in d else "model.safetensors"))
                      for d in dirs]


def test_cli_rejects_a_bad_setting(capsys):
    assert train.main(["pipeline", "--shaping", "sqrt"]) == 2
    assert "shaping" in capsys.readouterr().err


def test_cli_rl_stage_explains_a_missing_policy(tmp_path, capsys):
    assert train.main(["rl", "--policy_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path)]) == 2
    assert "run `python -m distreward.train sft` first" in capsys.readouterr().err


def test_experiment_gains_and_table():
    report = {"sft": {"reward": {"mean": 0.5}, "kl_to_ref": 0.0, "ground_truth": {"mean": 2.0}},
              "trained": {"reward": {"mean": 0.75}, "kl_to_ref": 0.3, "ground_truth": {"mean": 2.5}}}
    assert gains(report) == {"ground_truth_gain": 0.5, "reward_gain": 0.25, "kl_to_ref": 0.3}
    runs = [{"seed": seed, "loss_kind": "bt_kl", "shaping": "none", "ground_truth_gain": gain, "reward_gain": 0.1,
             "kl_to_ref": 0.2} for seed, gain in enumerate([0.1, 0.3])]
    row = results_table(runs).splitlines()[-1]
    # mean 0.2, sample std of (0.1, 0.3) = 0.1414
    assert row == "| bt_kl | none | 2 | +0.200 ± 0.141 | +0.100 ± 0.000 | +0.200 ± 0.000 |"
