"""The over-optimisation experiment: arms, budgets, the workers' stage configs, and its results from synthetic run
directories (hand-checked paired intervals and matched-KL interpolation); one tiny real run."""
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from distreward import experiments
from distreward.pipeline import PipelineConfig
from distreward.run_files import finished_mark
from distreward.experiment_report import (claim_verdict, comparisons, gains, matched_kl_levels, t_interval,
                                          truth_at_kl, write_results)
from distreward.cli import parse_config

T_2DF = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


def config_from(argv: list):
    config, unknown = parse_config(experiments.ExperimentConfig, argv, prog="test")
    assert not unknown
    return config


def test_default_arms_are_h2_on_bt_kl_and_h1_under_none():
    assert experiments.DEFAULT_ARMS == [
        "bt_kl/none", "bt_kl/std_penalty", "bt_kl/std_scale", "bt_kl/quantile", "bt_kl/std_scale_constant",
        "bt_kl/std_scale_shuffled", "bt_kl/std_penalty_shuffled_within", "bt_kl/std_scale_shuffled_within", "bt_mean/none", "bt_mean_t0.1/none", "dpl/none", "scalar_bt/none",
        "scalar_reg/none"]
    config = config_from([])
    assert config.seeds == list(range(8)) and config.arms == experiments.DEFAULT_ARMS


def test_help_lists_only_flags_that_act(capsys):
    with pytest.raises(SystemExit):
        experiments.main(["--help"])
    flat = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "--arms" in flat and "--seeds" in flat
    assert not re.search(r"--(seed|loss_kind|shaping)\b", flat)  # the arms and --seeds set them
    assert flat.count("Skip a stage whose finished output") == 1
    assert "Turn --reuse_finished_stages off (it is on by default)." in flat


@pytest.mark.parametrize("arm, message", [
    ("bt_kl/sqrt", "error: unknown arm 'bt_kl/sqrt': RM one of bt_mean, "),
    ("mse/none", "error: unknown arm 'mse/none': RM one of "),
    ("bt_kl", "error: arm 'bt_kl' is not of the form RM/SHAPING (e.g. bt_kl/std_scale)"),
    ("bt_kl/none/x", "error: arm 'bt_kl/none/x' is not of the form RM/SHAPING"),
])
def test_a_bad_arm_is_one_error_line(capsys, arm, message):
    assert experiments.main(["--arms", "bt_kl/none", arm]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_bad_budget_and_jobs_are_one_error_line(capsys):
    assert experiments.main(["--budget", "gpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: --budget must be one of full, cpu, got 'gpu'"
    assert experiments.main(["--jobs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --jobs must be >= 1")


def test_budget_fills_unset_settings_and_a_flag_overrides_it():
    config = config_from(["--budget", "cpu", "--rl_steps", "7"])
    assert config.rl_steps == 7 and config.sft_epochs == experiments.BUDGETS["cpu"]["sft_epochs"]
    full = config_from(["--budget", "full"])
    pipeline = PipelineConfig()
    assert (full.num_pairs, full.sft_epochs, full.rm_epochs, full.rl_steps, full.num_eval_prompts) == (
        pipeline.num_pairs, pipeline.sft_epochs, pipeline.rm_epochs, pipeline.rl_steps, pipeline.num_eval_prompts)
    assert full.curve_eval_steps == 10


def test_arm_stage_configs_apply_the_arm_and_the_budget(tmp_path):
    config = config_from(["--output_dir", str(tmp_path), "--arms", "bt_mean/none", "--rl_steps", "3",
                          "--rl_batch_size", "4", "--curve_eval_steps", "0"])
    sft, rm, rl = experiments.arm_stage_configs(config, 5, "bt_mean/none")
    assert sft.output_dir == str(tmp_path / "seed5" / "sft") and sft.seed == rm.seed == rl.seed == 5
    assert (rm.output_dir, rm.loss_kind, rm.model_name_or_path) == (str(tmp_path / "seed5" / "rm_bt_mean"),
                                                                     "bt_mean", sft.output_dir)
    assert (rl.output_dir, rl.reward_model_path) == (str(tmp_path / "seed5" / "rl_bt_mean_none"), rm.output_dir)
    assert (rl.shaping, rl.max_steps, rl.per_device_train_batch_size) == ("none", 3, 4)


def test_each_worker_is_handed_its_seeds_stage_configs(tmp_path, monkeypatch, capsys):
    """No command line between the grid and its workers: each gets the stage configs the grid built."""
    calls = []

    def fake_worker(seed, plan, reuse, threads, log_path):
        calls.append((seed, plan, reuse, threads, log_path))
        return 1 if seed == 2 else 0

    monkeypatch.setattr(experiments, "worker_pool", ThreadPoolExecutor)  # in this process, so the fake is seen
    monkeypatch.setattr(experiments, "run_worker", fake_worker)
    config = config_from(["--output_dir", str(tmp_path), "--seeds", "1", "2", "--jobs", "2", "--threads", "1",
                          "--arms", "bt_kl/none", "bt_kl/std_scale", "--no_reuse_finished_stages", "--beta", "0.2"])
    plans = {seed: experiments.seed_plan(config, seed) for seed in config.seeds}
    assert experiments.run_workers(config, plans) == [2]
    assert [call[:4] for call in sorted(calls, key=lambda call: call[0])] == [(1, plans[1], False, 1),
                                                                              (2, plans[2], False, 1)]
    assert [arm for arm, _ in plans[2]] == ["bt_kl/none", "bt_kl/std_scale"]
    _, (sft, rm, rl) = plans[2][1]
    assert (sft.seed, rl.seed, rl.beta, rl.shaping, rl.output_dir) == (2, 2, 0.2, "std_scale",
                                                                      str(tmp_path / "seed2" / "rl_bt_kl_std_scale"))
    assert os.path.isdir(tmp_path / "seed1")
    assert capsys.readouterr().err == f"seed 2 failed, see {tmp_path / 'seed2' / 'log.txt'}\n"


def test_a_worker_process_runs_its_seed_into_its_log(tmp_path):
    """A spawned worker gets seed 2's stage configs: its sft and rm stages finished earlier (reused), its rl stage
    finds no policy in the sft directory (one error line in the log, the seed failed)."""
    config = config_from(["--output_dir", str(tmp_path), "--seeds", "2", "--threads", "1", "--arms", "bt_kl/none"])
    plan = experiments.seed_plan(config, 2)
    for stage_config, mark in zip(plan[0][1][:2], (finished_mark("sft", evaluates=True), finished_mark("rm"))):
        os.makedirs(stage_config.output_dir)
        with open(os.path.join(stage_config.output_dir, mark), "w") as handle:
            handle.write("{}")
    assert experiments.run_workers(config, {2: plan}) == [2]
    log = (tmp_path / "seed2" / "log.txt").read_text()
    assert log.count("finished earlier, reused") == 2 and "=== seed 2, arm bt_kl/none" in log
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: no policy in "), errors


def test_t_interval_and_verdicts():
    mean, low, high = t_interval([0.1, 0.2, 0.3])
    half = T_2DF * 0.1 / math.sqrt(3)  # sample std 0.1
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert claim_verdict([0.1, 0.2, 0.3]) == "not separated from 0"  # 0.2 - 0.248 < 0
    assert claim_verdict([0.2, 0.21, 0.22]) == "supported"
    assert claim_verdict([-0.2, -0.21, -0.22]) == "contradicted (the interval lies below 0)"
    assert claim_verdict([0.5]) == "not separated from 0 (one seed: no interval)"
    # one of 1000 claims: the interval at 1 - 0.05 / 1000 (t quantile ~141 at 2 degrees of freedom) holds 0
    assert claim_verdict([0.2, 0.21, 0.22], family_size=1000) == "not separated from 0"
    assert t_interval([0.2, 0.21, 0.22], 0.99)[1] < t_interval([0.2, 0.21, 0.22])[1]


def test_comparisons_pair_each_arm_with_its_reference():
    arms = ["bt_kl/none", "bt_kl/std_scale", "bt_kl/std_scale_constant", "bt_mean/none", "dpl/quantile"]
    assert [(better, other) for better, other, _ in comparisons(arms)] == [
        ("bt_kl/std_scale", "bt_kl/none"), ("bt_kl/std_scale", "bt_kl/std_scale_constant"),
        ("bt_kl/none", "bt_mean/none")]  # dpl/quantile lacks dpl/none


def test_truth_at_kl_interpolates_at_the_first_crossing():
    curve = [{"step": 0, "kl_to_ref": 0.0, "ground_truth": 2.0}, {"step": 5, "kl_to_ref": 0.4, "ground_truth": 2.4},
             {"step": 10, "kl_to_ref": 0.2, "ground_truth": 1.0}, {"step": 15, "kl_to_ref": 0.8, "ground_truth": 3.0}]
    assert truth_at_kl(curve, 0.0) == 2.0
    assert truth_at_kl(curve, 0.1) == pytest.approx(2.1)  # a quarter of the way from 2.0 to 2.4
    assert truth_at_kl(curve, 0.3) == pytest.approx(2.3)  # first crossing, not the later one after step 10
    assert truth_at_kl(curve, 0.6) == pytest.approx(7 / 3)  # from (0.2, 1.0) two thirds of the way to (0.8, 3.0)
    assert truth_at_kl(curve, 0.9) is None
    assert matched_kl_levels([curve, curve[:2]]) == pytest.approx([0.4 / 3, 0.8 / 3, 0.4])


def write_run(root, seed: int, variant: str, shaping: str, gain: float, kl: float, accuracy: float, curve=None):
    """A finished run's files, as the stages write them: rm eval.json, rl eval.json and curve.jsonl."""
    rm_dir, rl_dir = root / f"seed{seed}" / f"rm_{variant}", root / f"seed{seed}" / f"rl_{variant}_{shaping}"
    rm_dir.mkdir(parents=True, exist_ok=True)
    rl_dir.mkdir(parents=True)
    (rm_dir / "eval.json").write_text(json.dumps({"pairwise_accuracy": accuracy - 0.1,
                                                  "truth_differs_accuracy": accuracy, "calibration_ece": 0.05}))
    comparison = {"ground_truth": {"sft": 2.0, "trained": 2.0 + gain, "gain": gain, "ci95": [gain - 0.1, gain + 0.1]},
                  "reward": {"sft": 0.5, "trained": 0.6, "gain": 0.1, "ci95": [0.0, 0.2]}, "verdict": "IMPROVED: x"}
    (rl_dir / "eval.json").write_text(json.dumps({"sft": {"kl_to_ref": 0.0}, "trained": {"kl_to_ref": kl},
                                                  "comparison": comparison}))
    if curve is not None:
        (rl_dir / "curve.jsonl").write_text("".join(json.dumps({
            "step": step, "kl_to_ref": k, "ground_truth": g, "reward": 0.5, "reward_std": 0.1, "num_prompts": 8}) + "\n"
            for step, (k, g) in enumerate(curve)))


def test_results_from_synthetic_runs(tmp_path):
    # seed s: none gains 0.1 * s, std_scale 0.1 * s + (0.10, 0.20, 0.30)[s]: paired differences 0.1, 0.2, 0.3
    # curves: none (KL 0, truth 2) -> (1, 3 + s), std_scale (0, 2) -> (0.5, 3 + s)
    for seed in range(3):
        write_run(tmp_path, seed, "bt_kl", "none", 0.1 * seed, 1.0, 0.8, curve=[(0.0, 2.0), (1.0, 3.0 + seed)])
        write_run(tmp_path, seed, "bt_kl", "std_scale", 0.1 * seed + 0.1 * (seed + 1), 0.5, 0.8,
                  curve=[(0.0, 2.0), (0.5, 3.0 + seed)])
        write_run(tmp_path, seed, "bt_mean", "none", 0.1 * seed - 0.2, 1.5, 0.7 - 0.01 * seed)
    arms = ["bt_kl/none", "bt_kl/std_scale", "bt_mean/none", "dpl/none"]
    runs, markdown = write_results(str(tmp_path), [0, 1, 2], arms)
    assert len(runs) == 9 and json.load(open(tmp_path / "results.json"))[0]["curve"][1]["kl_to_ref"] == 1.0
    assert open(tmp_path / "overoptimisation.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    lines = markdown.splitlines()
    half = T_2DF * 0.1 / math.sqrt(3)
    row = next(line for line in lines if line.startswith("| bt_kl/std_scale − bt_kl/none | 3 | +0.200 "))
    assert f"+0.200 [{0.2 - half:+.3f}, {0.2 + half:+.3f}] | -0.500 [-0.500, -0.500] | +0.000 [+0.000, +0.000]" in row
    assert row.endswith("| not separated from 0 |")
    # bt_kl minus bt_mean: gain 0.2 each seed (interval of width 0), accuracy 0.1 + 0.01 s
    row = next(line for line in lines if line.startswith("| bt_kl/none − bt_mean/none |"))
    assert "| +0.200 [+0.200, +0.200] | -0.500 [-0.500, -0.500] | +0.110 [" in row and row.endswith("| supported |")
    # matched KL: levels 1/3, 2/3 and 1 of 0.5; none reaches 2 + (1 + s) k, std_scale 2 + 2 (1 + s) k
    matched = [line for line in lines if line.startswith("| bt_kl/std_scale − bt_kl/none | 3 | 0.")]
    assert [line.split(" | ")[2] for line in matched] == ["0.167", "0.333", "0.500"]
    k = 0.5 / 3  # the differences at KL k are (1 + s) k: mean 2k, sample std k
    assert f"| {2 * k:+.3f} [{2 * k - T_2DF * k / math.sqrt(3):+.3f}, {2 * k + T_2DF * k / math.sqrt(3):+.3f}] |" \
        in matched[0]
    assert "bt_mean/none" not in markdown.split("at matched KL")[1].split("Not finished")[0]  # no curves, no row
    assert "| 2 | bt_mean | none | 0.580 (0.680) | 2.000 | 2.000 | +0.000 [-0.100, +0.100] | +0.100 [+0.000, +0.200] " \
           "| 1.500 | IMPROVED |" in lines
    assert lines[-1] == "Not finished (left out): dpl/none seed 0, dpl/none seed 1, dpl/none seed 2"
    # the per-arm table: ECE and accuracy means, one row per finished arm
    assert next(line for line in lines if line.startswith("| bt_mean/none |")).startswith(
        "| bt_mean/none | 3 | 0.690 [0.665, 0.715] | 0.050 [0.050, 0.050] | -0.100 [")


def test_results_per_region(tmp_path):
    # std_penalty beats its within-prompt shuffle by 0.4 + 0.02 s on superficial, by nothing on consensus, at the end
    # and along the curves (both arms reach KL 1; superficial truth 2 + (gain) k along the way)
    for seed in range(3):
        for shaping, edge in (("std_penalty", 0.4 + 0.02 * seed), ("std_penalty_shuffled_within", 0.0)):
            rl_dir = tmp_path / f"seed{seed}" / f"rl_bt_kl_{shaping}"
            write_run(tmp_path, seed, "bt_kl", shaping, 0.1, 1.0, 0.8)
            report = json.loads((rl_dir / "eval.json").read_text())
            report["comparison"]["by_region"] = {"superficial": {"ground_truth": {"trained": 2.0 + edge}},
                                                 "consensus": {"ground_truth": {"trained": 3.0}}}
            (rl_dir / "eval.json").write_text(json.dumps(report))
            (rl_dir / "curve.jsonl").write_text("".join(json.dumps({
                "step": step, "kl_to_ref": k, "ground_truth": 2.0, "reward": 0.5, "reward_std": 0.1, "num_prompts": 8,
                "ground_truth_by_region": {"superficial": 2.0 + edge * k, "consensus": 3.0}}) + "\n"
                for step, k in enumerate((0.0, 0.5, 1.0))))
    _, markdown = write_results(str(tmp_path), [0, 1, 2], ["bt_kl/std_penalty", "bt_kl/std_penalty_shuffled_within"])
    rows = [line for line in markdown.splitlines() if line.startswith("| bt_kl/std_penalty − bt_kl/std_penalty_")]
    superficial = next(line for line in rows if "| superficial |" in line)
    half = T_2DF * 0.02 / math.sqrt(3)
    assert f"| 3 | +0.420 [{0.42 - half:+.3f}, {0.42 + half:+.3f}] | 1.000 | +0.420 [{0.42 - half:+.3f}" in superficial
    assert superficial.endswith("| supported |")
    consensus = next(line for line in rows if "| consensus |" in line)
    assert "| +0.000 [+0.000, +0.000] | 1.000 | +0.000 [+0.000, +0.000] | not separated from 0 |" in consensus


def test_aggregate_only_trains_nothing(tmp_path, capsys):
    write_run(tmp_path, 0, "bt_kl", "none", 0.1, 1.0, 0.8)
    assert experiments.main(["--output_dir", str(tmp_path), "--arms", "bt_kl/none", "--seeds", "0",
                             "--aggregate_only"]) == 0
    markdown = open(tmp_path / "results.md").read()
    assert "| bt_kl/none | 1 |" in markdown
    assert "No pair of runs with curve.jsonl on both sides" in markdown
    assert not (tmp_path / "seed0" / "sft").exists()
    assert experiments.main(["--output_dir", str(tmp_path / "empty"), "--aggregate_only"]) == 2
    assert capsys.readouterr().err.startswith("error: no finished run of")


def test_gains_of_an_eval_report():
    comparison = {"ground_truth": {"sft": 2.0, "trained": 2.5, "gain": 0.5, "ci95": [0.25, 0.75]},
                  "reward": {"sft": 0.5, "trained": 0.75, "gain": 0.25, "ci95": [0.125, 0.375]},
                  "verdict": "IMPROVED: ground truth ..."}
    report = {"sft": {"kl_to_ref": 0.0}, "trained": {"kl_to_ref": 0.3}, "comparison": comparison}
    assert gains(report) == {"sft_ground_truth": 2.0, "trained_ground_truth": 2.5, "ground_truth_gain": 0.5,
                             "ground_truth_ci95": [0.25, 0.75], "reward_gain": 0.25, "reward_ci95": [0.125, 0.375],
                             "sft_kl_to_ref": 0.0, "kl_to_ref": 0.3, "verdict": "IMPROVED"}


def test_tiny_experiment_end_to_end(tmp_path, monkeypatch):
    """One seed, two arms that share the SFT policy and the reward model, settings that exist in every stage."""
    stage_configs = experiments.stage_configs

    def small_evaluations(*args):  # stage settings no experiment flag sets: the SFT and sharpening evaluations
        sft, rm, rl = stage_configs(*args)
        return replace(sft, num_eval_prompts=4), rm, replace(rl, sharpening_prompts=8)

    monkeypatch.setattr(experiments, "stage_configs", small_evaluations)
    argv = ["--output_dir", str(tmp_path), "--seeds", "0", "--arms", "bt_kl/none", "bt_kl/std_scale",
            "--num_pairs", "64", "--sft_epochs", "1", "--rm_epochs", "1", "--rl_steps", "2", "--num_eval_prompts", "4",
            "--rl_batch_size", "4", "--curve_eval_steps", "0", "--sharpening_grid", "1.0", "0.0"]
    assert experiments.main(argv) == 0
    assert sorted(os.listdir(tmp_path / "seed0")) == ["rl_bt_kl_none", "rl_bt_kl_std_scale", "rm_bt_kl", "sft"]
    runs = json.load(open(tmp_path / "results.json"))
    assert [(run["arm"], run["seed"]) for run in runs] == [("bt_kl/none", 0), ("bt_kl/std_scale", 0)]
    assert runs[0]["sft_ground_truth"] == runs[1]["sft_ground_truth"]  # same SFT policy, same prompts
    stamp = os.path.getmtime(tmp_path / "seed0" / "rm_bt_kl" / "eval.json")
    assert experiments.main(argv) == 0  # everything finished: reused, nothing retrained
    assert os.path.getmtime(tmp_path / "seed0" / "rm_bt_kl" / "eval.json") == stamp
    assert "| bt_kl/std_scale − bt_kl/none | 1 |" in open(tmp_path / "results.md").read()
