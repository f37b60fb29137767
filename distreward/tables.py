"""The text tables of ``eval.json``: finished rm runs' metrics side by side (:func:`markdown_table`) and the rl
stage's SFT vs trained policy with its verdicts and baselines (:func:`format_report`).
"""
from distreward.rm_metrics import METRIC_NAMES


def _cell(value) -> str:
    """A table cell: 3 decimals, or "—" for a metric the run does not have (a scalar head's std, an old run)."""
    return "—" if value is None else f"{value:.3f}"


def markdown_table(metrics: dict) -> str:
    """Markdown table, one row per run (name -> :func:`distreward.rm_metrics.reward_metrics` output)."""
    lines = ["| run | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(values.get(key)) for key in METRIC_NAMES) + " |"
              for name, values in metrics.items()]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The write-up's table, SFT vs trained (reward min / max / mean, mean sd, KL, ground truth), and the verdict."""
    columns = [("reward min", lambda r: r["reward"]["min"]), ("reward max", lambda r: r["reward"]["max"]),
               ("reward mean", lambda r: r["reward"]["mean"]), ("mean sd", lambda r: r["mean_sd"]),
               ("KL to ref", lambda r: r["kl_to_ref"])]
    if "ground_truth" in report["sft"]:
        columns.append(("ground truth (0-4)", lambda r: r["ground_truth"]["mean"]))
    lines = ["| policy | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in ("sft", "trained"):
        lines.append(f"| {name} | " + " | ".join(f"{value(report[name]):.3f}" for _, value in columns) + " |")
    lines += ["", "verdict: " + report["comparison"]["verdict"]]
    if "sharpened_sft" in report:
        lines.append("against the strongest cheap baseline: " + report["sharpened_sft"]["verdict"])
        lines.append("both sharpened: " + report["sharpened_sft"]["trained_sharpened"]["verdict"])
    for region, gains in report["comparison"].get("by_region", {}).items():
        cells = [f"{key} {gains[key]['gain']:+.3f}" for key in ("ground_truth", "reward", "std") if key in gains]
        if "sharpened_sft" in report and region in report["sharpened_sft"]["by_region"]:
            cells.append(f"ground truth vs sharpened "
                         f"{report['sharpened_sft']['by_region'][region]['ground_truth']['gain']:+.3f}")
        lines.append(f"  region {region} ({gains['num_prompts']} prompts), trained - sft: " + ", ".join(cells))
    lines += [temperature_baseline_line(row, report) for row in report.get("temperature_baselines", [])]
    return "\n".join(lines)


def temperature_baseline_line(row: dict, report: dict) -> str:
    """One console line for a ``temperature_baselines`` entry of ``eval.json``: the tempered SFT policy's gain
    (ground truth where known, else RM reward) and KL, next to the trained policy's."""
    key, name = ("ground_truth", "ground truth") if "ground_truth" in row else ("reward", "RM reward")
    score, trained_gain = row[key], report["comparison"][key]["gain"]
    low, high = score["ci95"]
    line = (f"baseline: the SFT policy at temperature {row['temperature']:g}, no reward model: {name} "
            f"{score['sft']:.3f} -> {score['tempered']:.3f} ({score['gain']:+.3f} [{low:+.3f}, {high:+.3f}]) at KL "
            f"{row['kl_to_ref']:.3f}; REINFORCE {trained_gain:+.3f} at KL {report['trained']['kl_to_ref']:.3f}")
    if score["gain"] >= trained_gain and row["kl_to_ref"] <= report["trained"]["kl_to_ref"]:
        line += " (the baseline gains as much or more, at no more KL)"
    return line
