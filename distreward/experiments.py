"""``python -m distreward.experiments``: reward shaping x reward-model loss on the embedded task, over seeds.

For every seed it trains one SFT policy, one reward model per loss (shared by the shapings) and one
REINFORCE run per (loss, shaping), all in ``output_dir/seed{s}/`` (finished stages are reused, so
an interrupted grid picks up where it stopped). It writes ``results.json`` (every run's gains) and
``results.md``: per (loss, shaping), the mean ± standard deviation over seeds of the ground-truth
gain and the reward gain (trained minus SFT policy on the same held-out prompts) and the trained
policy's KL to the reference. The budget flags (``--rl_steps``, ``--sft_epochs``, ...) are the
pipeline's.
"""
import json
import os
import statistics
import sys
from dataclasses import dataclass, field, replace

from distreward.pipeline import PipelineConfig, run_stages
from distreward.rewards import SHAPINGS
from distreward.train import USER_ERRORS, parse_config

LOSS_KINDS = ("bt_mean", "bt_kl")
METRICS = (("ground-truth gain", "ground_truth_gain"), ("reward gain", "reward_gain"), ("KL to ref", "kl_to_ref"))


@dataclass
class ExperimentConfig(PipelineConfig):
    """The pipeline's settings, run for every seed x loss x shaping."""

    output_dir: str = field(default="runs/experiments", metadata={"help": "Root of the runs and the results."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds to run."})
    shapings: list[str] = field(default_factory=lambda: list(SHAPINGS), metadata={
        "help": "Reward shapings to compare."})
    loss_kinds: list[str] = field(default_factory=lambda: list(LOSS_KINDS), metadata={
        "help": "Reward-model losses to compare."})
    reuse_finished_stages: bool = field(default=True, metadata={
        "help": "Skip a stage whose finished output is already there (--no_reuse_finished_stages reruns all)."})


def gains(report: dict) -> dict:
    """One run's ``eval.json`` -> ground-truth gain, reward gain and the trained policy's KL."""
    sft, trained = report["sft"], report["trained"]
    return {"ground_truth_gain": trained["ground_truth"]["mean"] - sft["ground_truth"]["mean"],
            "reward_gain": trained["reward"]["mean"] - sft["reward"]["mean"],
            "kl_to_ref": trained["kl_to_ref"]}


def results_table(runs: list) -> str:
    """Markdown table: per (loss, shaping), mean ± std over seeds of each metric in :data:`METRICS`."""
    lines = ["| RM loss | shaping | seeds | " + " | ".join(name for name, _ in METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(METRICS)]
    groups = {}
    for run in runs:
        groups.setdefault((run["loss_kind"], run["shaping"]), []).append(run)
    for (loss_kind, shaping), group in groups.items():
        cells = []
        for _, key in METRICS:
            values = [run[key] for run in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):+.3f} ± {spread:.3f}")
        lines.append(f"| {loss_kind} | {shaping} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_experiments(config: ExperimentConfig) -> list:
    """Run the grid, write ``results.json`` and ``results.md``; returns the per-run records."""
    runs = []
    for seed in config.seeds:
        root = os.path.join(config.output_dir, f"seed{seed}")
        for loss_kind in config.loss_kinds:
            for shaping in config.shapings:
                run_config = replace(config, seed=seed, loss_kind=loss_kind, shaping=shaping)
                report = run_stages(run_config, os.path.join(root, "sft"), os.path.join(root, f"rm_{loss_kind}"),
                                    os.path.join(root, f"rl_{loss_kind}_{shaping}"))
                runs.append({"seed": seed, "loss_kind": loss_kind, "shaping": shaping, **gains(report)})
    table = results_table(runs)
    with open(os.path.join(config.output_dir, "results.json"), "w") as handle:
        json.dump(runs, handle, indent=2)
    with open(os.path.join(config.output_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    print(f"\nmean ± std over seeds {config.seeds} (trained minus SFT policy, held-out prompts):")
    print(table)
    return runs


def main(argv=None) -> int:
    config, unknown = parse_config(ExperimentConfig, list(sys.argv[1:] if argv is None else argv),
                                   prog="python -m distreward.experiments")
    if unknown:
        print(f"error: unknown argument(s): {' '.join(unknown)} (see --help)", file=sys.stderr)
        return 2
    try:
        run_experiments(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
