"""Results of the over-optimisation experiment, read from its run directories: ``results.json``,
``results.md`` and ``overoptimisation.png`` (written by ``python -m distreward.experiments``).

An arm is ``RM/SHAPING``; seed ``s`` of arm ``v/h`` lives in ``output_dir/seed{s}/`` as ``sft/``,
``rm_{v}/`` and ``rl_{v}_{h}/``. Arms are compared paired by seed (the same SFT policy, and within an
RM variant the same reward model, in both arms of a pair), with a 95% Student-t interval over the
per-seed differences; a claim is "supported" only when its interval (Bonferroni-widened over the claims of a table)
excludes 0 in its direction.
"""
import json
import math
import os
import statistics

from scipy.stats import t as student_t

from distreward.plots import pyplot
from distreward.run_files import (CURVE_NAME, EVAL_NAME, OVEROPTIMISATION_PLOT_NAME, RESULTS_MARKDOWN_NAME,
                                  RESULTS_NAME, RL_DIR, RM_DIR, SFT_DIR, seed_dir)

REFERENCE_ARM = "bt_kl/none"
# a control of a std shaping -> that shaping, with which (not with none) it is compared
CONTROL_SHAPINGS = {"std_scale_constant": "std_scale", "std_scale_shuffled": "std_scale",
                    "std_scale_shuffled_within": "std_scale", "std_penalty_shuffled_within": "std_penalty"}
MATCHED_KL_FRACTIONS = (1 / 3, 2 / 3, 1.0)  # of the largest KL every run of a comparison reaches


def split_arm(arm: str) -> tuple:
    """``"bt_kl/std_scale"`` -> ``("bt_kl", "std_scale")`` (ValueError unless it is ``RM/SHAPING``)."""
    parts = arm.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"arm {arm!r} is not of the form RM/SHAPING (e.g. bt_kl/std_scale)")
    return parts[0], parts[1]


def run_dirs(output_dir: str, seed: int, arm: str) -> tuple:
    """(sft, rm, rl) directories of ``arm`` at ``seed``."""
    variant, shaping = split_arm(arm)
    root = seed_dir(output_dir, seed)
    return (os.path.join(root, SFT_DIR), os.path.join(root, f"{RM_DIR}_{variant}"),
            os.path.join(root, f"{RL_DIR}_{variant}_{shaping}"))


def read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def gains(report: dict) -> dict:
    """One run's rl ``eval.json`` -> ground truth of both policies, the gains with their 95% intervals over
    prompts, the KL of both policies and the verdict (:func:`distreward.policy_comparison.compare_policies`)."""
    comparison = report["comparison"]
    truth, reward = comparison["ground_truth"], comparison["reward"]
    return {"sft_ground_truth": truth["sft"], "trained_ground_truth": truth["trained"],
            "ground_truth_gain": truth["gain"], "ground_truth_ci95": truth["ci95"],
            "reward_gain": reward["gain"], "reward_ci95": reward["ci95"], "sft_kl_to_ref": report["sft"]["kl_to_ref"],
            "kl_to_ref": report["trained"]["kl_to_ref"], "verdict": comparison["verdict"].split(":")[0]}


def load_run(output_dir: str, seed: int, arm: str):
    """The record of one finished run (RM metrics, gains, ``curve`` points; ``[]`` without curve.jsonl), or None."""
    _, rm_dir, rl_dir = run_dirs(output_dir, seed, arm)
    if not os.path.isfile(os.path.join(rl_dir, EVAL_NAME)):
        return None
    rm_report = read_json(os.path.join(rm_dir, EVAL_NAME))
    curve_path = os.path.join(rl_dir, CURVE_NAME)
    curve = []
    if os.path.isfile(curve_path):
        with open(curve_path) as handle:
            curve = sorted((json.loads(line) for line in handle if line.strip()), key=lambda point: point["step"])
    report = read_json(os.path.join(rl_dir, EVAL_NAME))
    return {"arm": arm, "seed": seed, "rm_accuracy": rm_report["pairwise_accuracy"],
            "rm_truth_differs_accuracy": rm_report.get("truth_differs_accuracy"),
            "rm_calibration_ece": rm_report.get("calibration_ece"), **gains(report), "curve": curve,
            "by_region": {region: scores["ground_truth"]["trained"]
                          for region, scores in report["comparison"].get("by_region", {}).items()
                          if "ground_truth" in scores}}


def t_interval(values: list, confidence: float = 0.95) -> tuple:
    """(mean, low, high): the mean of ``values`` and its Student-t interval at ``confidence`` (NaN bounds for one
    value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = student_t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def interval_text(values: list, spec: str = "+.3f") -> str:
    """``"+0.200 [-1.071, +1.471]"`` (each number in format ``spec``); ``n/a`` when a value is missing (None),
    ``(one seed)`` for one value."""
    if not values or any(value is None for value in values):
        return "n/a"
    mean, low, high = t_interval(values)
    return f"{mean:{spec}} (one seed)" if len(values) == 1 else f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def claim_verdict(differences: list, family_size: int = 1) -> str:
    """Plain words for a claim that the paired ``differences`` are positive, one of ``family_size`` claims judged
    together: the t-interval at confidence ``1 - 0.05 / family_size`` (Bonferroni), so that all the claims of a
    table together are wrongly "supported" with probability at most 5%."""
    _, low, high = t_interval(differences, 1 - 0.05 / family_size)
    if math.isnan(low):
        return "not separated from 0 (one seed: no interval)"
    if low > 0:
        return "supported"
    return "contradicted (the interval lies below 0)" if high < 0 else "not separated from 0"


def comparisons(arms: list) -> list:
    """(claimed better arm, other arm, claim) pairs among ``arms``: a shaping against its RM's ``none`` (H2), a
    control against ``std_scale`` (the model's std, not the rescaling), an RM variant against ``bt_kl`` (H1)."""
    pairs = []
    for arm in arms:
        variant, shaping = split_arm(arm)
        if shaping in CONTROL_SHAPINGS:
            pairs.append((f"{variant}/{CONTROL_SHAPINGS[shaping]}", arm, f"the RM's own std beats {shaping}"))
        elif shaping != "none":
            pairs.append((arm, f"{variant}/none", f"{shaping} shaping raises the ground truth over none"))
        elif arm != REFERENCE_ARM:
            pairs.append((REFERENCE_ARM, arm, f"a bt_kl reward model beats a {variant} one"))
    return [pair for pair in pairs if pair[0] in arms and pair[1] in arms]


def paired(runs: list, better: str, other: str) -> list:
    """[(run of ``better``, run of ``other``)] for every seed both arms finished, by seed."""
    by_arm = {arm: {run["seed"]: run for run in runs if run["arm"] == arm} for arm in (better, other)}
    return [(by_arm[better][seed], by_arm[other][seed]) for seed in sorted(set(by_arm[better]) & set(by_arm[other]))]


def truth_at_kl(curve: list, level: float):
    """Ground truth where a run's curve (points in step order) first reaches KL ``level``, interpolated linearly
    between the two points around that crossing; None if it never does."""
    if not curve or curve[0]["kl_to_ref"] >= level:
        return curve[0]["ground_truth"] if curve else None
    for before, after in zip(curve, curve[1:]):
        if after["kl_to_ref"] >= level:
            weight = (level - before["kl_to_ref"]) / (after["kl_to_ref"] - before["kl_to_ref"])
            return before["ground_truth"] + weight * (after["ground_truth"] - before["ground_truth"])
    return None


def matched_kl_levels(curves: list) -> list:
    """KL levels every curve reaches: :data:`MATCHED_KL_FRACTIONS` of the smallest of their largest KLs."""
    reach = min(max(point["kl_to_ref"] for point in curve) for curve in curves)
    return [fraction * reach for fraction in MATCHED_KL_FRACTIONS] if reach > 0 else []


def region_curve(curve: list, region: str) -> list:
    """A run's curve with ``region``'s ground truth as its ``ground_truth`` ([] unless every point has it)."""
    points = [{"kl_to_ref": point["kl_to_ref"], "ground_truth": point.get("ground_truth_by_region", {}).get(region)}
              for point in curve]
    return points if points and all(point["ground_truth"] is not None for point in points) else []


def region_table(runs: list, pairs: list) -> list:
    """Per region (the embedded task v2's), each pair's final ground-truth difference and the difference at the
    largest KL every run of the pair reaches (from the curves' per-region points), paired by seed."""
    regions = sorted({region for run in runs for region in run["by_region"]})
    lines = ["| comparison (paired by seed) | region | seeds | final ground-truth difference [95% CI] | matched KL | "
             "ground-truth difference there [95% CI] | verdict at matched KL |", "|---|---|---:|---:|---:|---:|---|"]
    family_size = len(pairs) * len(regions)
    for better, other, _ in pairs:
        matched = paired(runs, better, other)
        for region in regions:
            final = [a["by_region"][region] - b["by_region"][region] for a, b in matched
                     if region in a["by_region"] and region in b["by_region"]]
            curves = [(region_curve(a["curve"], region), region_curve(b["curve"], region)) for a, b in matched]
            curves = [pair for pair in curves if pair[0] and pair[1]]
            level, at_level = None, []
            if curves and len(curves) == len(matched):
                level = matched_kl_levels([curve for pair in curves for curve in pair])[-1]
                at_level = [truth_at_kl(a, level) - truth_at_kl(b, level) for a, b in curves]
            lines.append(f"| {better} − {other} | {region} | {len(final)} | {interval_text(final)} | "
                         + (f"{level:.3f} | {interval_text(at_level)} | {claim_verdict(at_level, family_size)} |"
                            if at_level else "n/a | n/a | no per-region curves |"))
    return lines if regions else []


def arm_table(runs: list, arms: list) -> list:
    lines = ["| arm | seeds | RM accuracy, truth differs | RM calibration ECE | ground-truth gain [95% CI] | "
             "RM reward gain [95% CI] | KL to ref [95% CI] |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        group = [run for run in runs if run["arm"] == arm]
        if group:
            lines.append(f"| {arm} | {len(group)} | " + " | ".join(
                interval_text([run[key] for run in group], "+.3f" if key.endswith("gain") else ".3f") for key in (
                    "rm_truth_differs_accuracy", "rm_calibration_ece", "ground_truth_gain", "reward_gain", "kl_to_ref"))
                + " |")
    return lines


def runs_table(runs: list) -> list:
    """One row per run: the RM's test accuracy (on the pairs whose ground truth differs), both policies' ground
    truth, the gains with their 95% intervals over prompts, the KL and the run's own verdict."""
    lines = ["| seed | RM loss | shaping | RM test accuracy (truth differs) | SFT ground truth | trained ground truth "
             "| ground-truth gain [95% CI] | RM reward gain [95% CI] | KL to ref | verdict |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        truth, reward, differs = run["ground_truth_ci95"], run["reward_ci95"], run["rm_truth_differs_accuracy"]
        lines.append(f"| {run['seed']} | {' | '.join(split_arm(run['arm']))} | {run['rm_accuracy']:.3f} "
                     f"({'n/a' if differs is None else f'{differs:.3f}'}) | {run['sft_ground_truth']:.3f} | "
                     f"{run['trained_ground_truth']:.3f} | {run['ground_truth_gain']:+.3f} [{truth[0]:+.3f}, "
                     f"{truth[1]:+.3f}] | {run['reward_gain']:+.3f} [{reward[0]:+.3f}, {reward[1]:+.3f}] | "
                     f"{run['kl_to_ref']:.3f} | {run['verdict']} |")
    return lines


def comparison_table(runs: list, pairs: list) -> list:
    lines = ["| comparison (paired by seed) | seeds | ground-truth gain difference [95% CI] | KL difference "
             "[95% CI] | RM accuracy difference [95% CI] | claim | verdict |", "|---|---:|---:|---:|---:|---|---|"]
    for better, other, claim in pairs:
        matched = paired(runs, better, other)
        differences = {key: [a[key] - b[key] if a[key] is not None and b[key] is not None else None
                             for a, b in matched]
                       for key in ("ground_truth_gain", "kl_to_ref", "rm_truth_differs_accuracy")}
        lines.append(f"| {better} − {other} | {len(matched)} | " + " | ".join(
            interval_text(values) for values in differences.values())
            + f" | {claim} | {claim_verdict(differences['ground_truth_gain'], len(pairs))} |")
    return lines


def matched_kl_table(runs: list, pairs: list) -> list:
    lines = ["| comparison (paired by seed) | seeds | KL | ground truth, first arm | ground truth, second arm | "
             "difference [95% CI] | verdict |", "|---|---:|---:|---:|---:|---:|---|"]
    family_size = len(pairs) * len(MATCHED_KL_FRACTIONS)
    for better, other, _ in pairs:
        matched = [(a, b) for a, b in paired(runs, better, other) if a["curve"] and b["curve"]]
        if not matched:
            continue
        for level in matched_kl_levels([run["curve"] for pair in matched for run in pair]):
            truths = [(truth_at_kl(a["curve"], level), truth_at_kl(b["curve"], level)) for a, b in matched]
            differences = [a - b for a, b in truths]
            cells = [interval_text([pair[side] for pair in truths], ".3f") for side in (0, 1)]
            lines.append(f"| {better} − {other} | {len(matched)} | {level:.3f} | {' | '.join(cells)} | "
                         f"{interval_text(differences)} | {claim_verdict(differences, family_size)} |")
    return lines if len(lines) > 2 else ["No pair of runs with curve.jsonl on both sides (--curve_eval_steps 0?)."]


def results_markdown(runs: list, arms: list) -> str:
    """results.md: (a) per arm, (b) paired comparisons of the final gains, (c) ground truth at matched KL,
    (d) where the task has regions, (b) and (c) per region, (e) one row per run."""
    pairs = comparisons([arm for arm in arms if any(run["arm"] == arm for run in runs)])
    sections = [
        "## Per arm (mean over seeds [95% t-interval])", *arm_table(runs, arms), "",
        "Gains are the trained minus the SFT policy on the same held-out prompts (each run's own 95% interval over "
        "prompts is in results.json). ECE is n/a for a scalar reward model (or an RM eval.json without it).", "",
        "## Paired by seed: final gains", *comparison_table(runs, pairs), "",
        "\"supported\": the t-interval of the per-seed differences excludes 0 in the claimed direction at confidence "
        "1 - 0.05/m for the m claims of the table (Bonferroni: all of a table's claims together are wrongly "
        "supported with probability at most 5%; the intervals shown are the plain 95% ones); \"not separated "
        "from 0\": it holds 0, which does not show the arms equal.", "",
        "## Paired by seed: ground truth at matched KL", *matched_kl_table(runs, pairs), "",
        "Each run's ground truth where its curve.jsonl first reaches the KL (linear between evaluation points), at "
        "a third, two thirds and all of the largest KL every run of the comparison reaches: an arm that moves "
        "less gets no credit for it here.", "",
        *(["## Paired by seed, per region: final and at matched KL", *regions, "",
           "Each region's ground truth of the trained policy (final: eval.json; at matched KL: the run's curve.jsonl "
           "points of that region, at the largest KL every run of the pair reaches). Verdicts are Bonferroni-widened "
           "over every pair and region of the table.", ""] if (regions := region_table(runs, pairs)) else []),
        "## Per run", *runs_table(runs)]
    return "\n".join(sections) + "\n"


def mean_curve(group: list) -> tuple:
    """(mean KL, mean ground-truth gain over the run's step-0 point, 95% half-width) per step every run of
    ``group`` evaluated (the gain, paired within each run, leaves out how good each seed's SFT policy is); a run
    without curve.jsonl contributes its SFT and final evaluation as steps 0 and 1."""
    curves = [run["curve"] or [{"step": 0, "kl_to_ref": run["sft_kl_to_ref"], "ground_truth": run["sft_ground_truth"]},
                               {"step": 1, "kl_to_ref": run["kl_to_ref"], "ground_truth": run["trained_ground_truth"]}]
              for run in group]
    steps = sorted(set.intersection(*({point["step"] for point in curve} for curve in curves)))
    kls, truths, halves = [], [], []
    for step in steps:
        points = [next(point for point in curve if point["step"] == step) for curve in curves]
        mean, low, _ = t_interval([point["ground_truth"] - curve[0]["ground_truth"]
                                   for point, curve in zip(points, curves)])
        kls.append(statistics.mean(point["kl_to_ref"] for point in points))
        truths.append(mean)
        halves.append(0.0 if math.isnan(low) else mean - low)
    return kls, truths, halves


def plot_overoptimisation(runs: list, arms: list, path: str) -> None:
    """Ground-truth gain over the SFT policy against KL to the reference per arm (mean over seeds by step, 95% t
    error bars); left the RM variants under shaping none, right the shapings."""
    plt = pyplot()

    panels = (("RM variants, shaping none", [arm for arm in arms if split_arm(arm)[1] == "none"]),
              ("shapings", [REFERENCE_ARM] * (REFERENCE_ARM in arms) + [
                  arm for arm in arms if split_arm(arm)[1] != "none"]))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, (title, panel_arms) in zip(axes, panels):
        for index, arm in enumerate(panel_arms):  # the reference arm first, in C0, in both panels
            group = [run for run in runs if run["arm"] == arm]
            if group:
                kls, truths, halves = mean_curve(group)
                note = "" if all(run["curve"] for run in group) else ", start and end only"
                axis.errorbar(kls, truths, yerr=halves, marker="o", markersize=3, capsize=2, color=f"C{index % 10}",
                              label=f"{arm} ({len(group)} seeds{note})")
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set(xlabel="KL to the SFT reference", ylabel="ground-truth gain over step 0 (0-4 scale)", title=title)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(output_dir: str, seeds: list, arms: list) -> tuple:
    """Read every finished run of ``arms`` x ``seeds``, write results.json, results.md and the plot;
    returns (run records, markdown)."""
    runs, missing = [], []
    for arm in arms:
        for seed in seeds:
            run = load_run(output_dir, seed, arm)
            (runs.append(run) if run else missing.append(f"{arm} seed {seed}"))
    if not runs:
        raise ValueError(f"no finished run of {arms} x seeds {seeds} in {output_dir}")
    with open(os.path.join(output_dir, RESULTS_NAME), "w") as handle:
        json.dump(runs, handle, indent=2)
    markdown = results_markdown(runs, arms)
    if missing:
        markdown += f"\nNot finished (left out): {', '.join(missing)}\n"
    with open(os.path.join(output_dir, RESULTS_MARKDOWN_NAME), "w") as handle:
        handle.write(markdown)
    plot_overoptimisation(runs, arms, os.path.join(output_dir, OVEROPTIMISATION_PLOT_NAME))
    return runs, markdown
