"""``python -m distreward.experiments``: reward shaping x reward-model loss on the embedded task, over seeds.

For every seed it trains one SFT policy, one reward model per loss (shared by the shapings) and one
REINFORCE run per (loss, shaping), all in ``output_dir/seed{s}/`` (finished stages are reused, so
an interrupted grid picks up where it stopped). It writes ``results.json`` (every run's gains) and
``results.md``: one row per run (the reward model's accuracy on the test pairs, on all and on those
whose ground truth differs; the ground-truth and reward gains of the trained over the SFT
policy on the same held-out prompts, each with its 95% paired bootstrap interval over prompts, the
KL to the reference and the verdict), then per (loss, shaping) the mean gain over seeds with its
95% t-interval over seeds. The budget flags (``--rl_steps``, ``--sft_epochs``, ...) are the
pipeline's.
"""
import json
import math
import os
import statistics
import sys
from dataclasses import field, fields, make_dataclass

from scipy.stats import t as student_t

from distreward.pipeline import PipelineConfig, run_stages
from distreward.rewards import SHAPINGS
from distreward.train import USER_ERRORS, parse_config

LOSS_KINDS = ("bt_mean", "bt_kl")
GRID_FIELDS = ("seed", "loss_kind", "shaping")  # PipelineConfig's settings that --seeds, --loss_kinds, --shapings set
METRICS = (("ground-truth gain", "ground_truth_gain"), ("reward gain", "reward_gain"), ("KL to ref", "kl_to_ref"))
RUN_COLUMNS = ("seed", "RM loss", "shaping", "RM test accuracy (truth differs)", "SFT ground truth",
               "trained ground truth", "ground-truth gain [95% CI]", "RM reward gain [95% CI]", "KL to ref", "verdict")


def pipeline_config(config, seed: int, loss_kind: str, shaping: str) -> PipelineConfig:
    """The settings of one run of the grid (raises ValueError on a setting that run cannot take)."""
    settings = {f.name: getattr(config, f.name) for f in fields(PipelineConfig) if f.name not in GRID_FIELDS}
    return PipelineConfig(**settings, seed=seed, loss_kind=loss_kind, shaping=shaping)


def check_grid(config) -> None:
    """Build every run's settings, so that a bad one fails before the first run starts."""
    for seed in config.seeds:
        for loss_kind in config.loss_kinds:
            for shaping in config.shapings:
                pipeline_config(config, seed, loss_kind, shaping)


# The pipeline's settings, less the three the grid sets per run, plus the grid: a flag --help lists always acts.
ExperimentConfig = make_dataclass("ExperimentConfig", [
    ("output_dir", str, field(default="runs/experiments", metadata={"help": "Root of the runs and the results."})),
    *[(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in fields(PipelineConfig)
      if f.name not in GRID_FIELDS + ("output_dir", "reuse_finished_stages")],
    ("seeds", list[int], field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds to run."})),
    ("shapings", list[str], field(default_factory=lambda: list(SHAPINGS), metadata={
        "help": "Reward shapings to compare."})),
    ("loss_kinds", list[str], field(default_factory=lambda: list(LOSS_KINDS), metadata={
        "help": "Reward-model losses to compare."})),
    ("reuse_finished_stages", bool, field(default=True, metadata={
        "help": "Skip a stage whose finished output is already there, so an interrupted grid picks up where it "
                "stopped."})),
], namespace={"__doc__": "The pipeline's settings, run for every seed x loss x shaping.", "__post_init__": check_grid})


def gains(report: dict) -> dict:
    """One run's ``eval.json`` -> ground truth of both policies, the gains with their 95% intervals over
    prompts, the trained policy's KL and the verdict (:func:`distreward.evaluation.compare_policies`)."""
    comparison = report["comparison"]
    truth, reward = comparison["ground_truth"], comparison["reward"]
    return {"sft_ground_truth": truth["sft"], "trained_ground_truth": truth["trained"],
            "ground_truth_gain": truth["gain"], "ground_truth_ci95": truth["ci95"],
            "reward_gain": reward["gain"], "reward_ci95": reward["ci95"],
            "kl_to_ref": report["trained"]["kl_to_ref"], "verdict": comparison["verdict"].split(":")[0]}


def t_interval(values: list) -> tuple:
    """(mean, low, high): the mean of ``values`` and its 95% Student-t interval (NaN bounds for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def runs_table(runs: list) -> str:
    """Markdown table, one row per run (see :data:`RUN_COLUMNS`)."""
    lines = ["| " + " | ".join(RUN_COLUMNS) + " |", "|---:|---|---|" + "---:|" * (len(RUN_COLUMNS) - 4) + "---|"]
    for run in runs:
        truth, reward = run["ground_truth_ci95"], run["reward_ci95"]
        lines.append(f"| {run['seed']} | {run['loss_kind']} | {run['shaping']} | {run['rm_accuracy']:.3f} "
                     f"({run['rm_truth_differs_accuracy']:.3f}) | {run['sft_ground_truth']:.3f} | "
                     f"{run['trained_ground_truth']:.3f} | {run['ground_truth_gain']:+.3f} [{truth[0]:+.3f}, "
                     f"{truth[1]:+.3f}] | {run['reward_gain']:+.3f} [{reward[0]:+.3f}, {reward[1]:+.3f}] | "
                     f"{run['kl_to_ref']:.3f} | {run['verdict']} |")
    return "\n".join(lines)


def results_table(runs: list) -> str:
    """Markdown table: per (loss, shaping), the mean over seeds of each metric in :data:`METRICS`
    with its 95% t-interval over seeds."""
    lines = ["| RM loss | shaping | seeds | " + " | ".join(f"{name} [95% CI]" for name, _ in METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(METRICS)]
    groups = {}
    for run in runs:
        groups.setdefault((run["loss_kind"], run["shaping"]), []).append(run)
    for (loss_kind, shaping), group in groups.items():
        cells = []
        for _, key in METRICS:
            mean, low, high = t_interval([run[key] for run in group])
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if len(group) > 1 else f"{mean:+.3f} (one seed)")
        lines.append(f"| {loss_kind} | {shaping} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_experiments(config) -> list:
    """Run the grid, write ``results.json`` and ``results.md``; returns the per-run records."""
    runs = []
    for seed in config.seeds:
        root = os.path.join(config.output_dir, f"seed{seed}")
        for loss_kind in config.loss_kinds:
            for shaping in config.shapings:
                run_config = pipeline_config(config, seed, loss_kind, shaping)
                rm_dir = os.path.join(root, f"rm_{loss_kind}")
                report = run_stages(run_config, os.path.join(root, "sft"), rm_dir,
                                    os.path.join(root, f"rl_{loss_kind}_{shaping}"))
                with open(os.path.join(rm_dir, "eval.json")) as handle:
                    rm_report = json.load(handle)
                runs.append({"seed": seed, "loss_kind": loss_kind, "shaping": shaping,
                             "rm_accuracy": rm_report["pairwise_accuracy"],
                             "rm_truth_differs_accuracy": rm_report.get("truth_differs_accuracy", float("nan")),
                             **gains(report)})
    table = runs_table(runs) + "\n\n" + results_table(runs)
    with open(os.path.join(config.output_dir, "results.json"), "w") as handle:
        json.dump(runs, handle, indent=2)
    with open(os.path.join(config.output_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    print(f"\ntrained minus SFT policy on {config.num_eval_prompts} held-out {config.eval_split} prompts, "
          f"seeds {config.seeds}; last table: mean over seeds [95% t-interval]:")
    print(table)
    return runs


def main(argv=None) -> int:
    try:  # a config validates when it is built: a bad setting raises while parsing
        config, unknown = parse_config(ExperimentConfig, list(sys.argv[1:] if argv is None else argv),
                                       prog="python -m distreward.experiments")
        if unknown:
            print(f"error: unknown argument(s): {' '.join(unknown)} (see --help)", file=sys.stderr)
            return 2
        run_experiments(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
