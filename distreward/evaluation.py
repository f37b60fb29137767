"""Held-out evaluation of a distributional reward model (docs/math.md §7) and the H1.1 vs H1.2 comparison.

:func:`predict` runs the model over tokenised pairs; :func:`reward_metrics` turns the predictions
into ``eval.json``'s numbers (a scalar head's, whose logits are [N, 1], have no std, label KL or
calibration: those are None); :func:`plot_runs` draws, per run, the predicted distributions of a few
answers and the histogram of the predicted std; :func:`plot_reliability` the quantile calibration
curves. ``python -m distreward.evaluation RUN_DIR RUN_DIR`` compares finished ``rm`` runs side by side
(a markdown table and one PNG).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from distreward import ops
from distreward.data import PreferenceCollator

PREDICTIONS_NAME = "predictions.safetensors"
RM_CONFIG_NAME = "rm_config.json"  # an rm run's settings (runs before the Hugging Face model kept them in config.json)
METRIC_NAMES = ("pairwise_accuracy", "mean_std", "std_error_spearman", "label_kl", "calibration_ece")
CALIBRATION_LEVELS = torch.arange(1, 20, dtype=torch.float64) / 20  # p = 0.05, 0.10, ..., 0.95
PROMPT_GROUPS = {"add": "clear", "sort": "clear", "count": "clear", "ambiguous": "ambiguous"}  # embedded task


@torch.no_grad()
def predict(model, dataset, pad_token_id: int, batch_size: int = 64, device=None) -> dict:
    """The bin logits (the model's ``bin_logits``) of both sides of every pair: ``logits_chosen`` /
    ``logits_rejected`` [N, K] fp32 (a scalar head's: [N, 1]),
    ``target_chosen`` / ``target_rejected`` [N] fp32 (labels mu in [0, 1]), the panel labels ``sigma_*`` [N] or
    ``q_*`` [N, K] where the pairs have them, and the model's bin ``centers`` [K] fp32."""
    device = device or next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=PreferenceCollator(pad_token_id))
    was_training = model.training
    model.eval()
    parts = {key: [] for key in ("logits_chosen", "logits_rejected", "target_chosen", "target_rejected")}
    for batch in loader:
        for side in ("chosen", "rejected"):
            output = model(batch[f"input_ids_{side}"].to(device), batch[f"attention_mask_{side}"].to(device))
            parts[f"logits_{side}"].append(output.bin_logits.float().cpu())
            for label in ("target", "sigma", "q"):
                if f"{label}_{side}" in batch:
                    parts.setdefault(f"{label}_{side}", []).append(batch[f"{label}_{side}"])
    model.train(was_training)
    result = {key: torch.cat(values) for key, values in parts.items()}
    if model.centers is not None:
        result["centers"] = model.centers.float().cpu()
    return result


def answers(predictions: dict) -> tuple:
    """(logits [2N, K], labels [2N]) of every answer: the chosen sides, then the rejected ones."""
    return (torch.cat([predictions["logits_chosen"], predictions["logits_rejected"]]),
            torch.cat([predictions["target_chosen"], predictions["target_rejected"]]))


def answer_labels(predictions: dict, sigma: float) -> tuple:
    """(target, sigma) of every answer's label, in :func:`answers`' order, for ``ops.gaussian_kl``: the panel
    label distributions q [2N, K] where the predictions have them, else the means [2N] with the per-answer
    widths [2N] (``gaussian_spread``) or the fixed ``sigma``."""
    def both(name):
        return torch.cat([predictions[f"{name}_chosen"], predictions[f"{name}_rejected"]])

    if "q_chosen" in predictions:
        return both("q"), sigma
    return both("target"), both("sigma") if "sigma_chosen" in predictions else sigma


def is_scalar(predictions: dict) -> bool:
    """Whether ``predictions`` come from a scalar head (logits [N, 1]: one reward, no distribution)."""
    return predictions["logits_chosen"].shape[-1] == 1


def rewards(logits: torch.Tensor, centers=None) -> torch.Tensor:
    """The reward [N] fp32 of logits [N, K]: E of the distribution, or a scalar head's value (K = 1)."""
    return logits[:, 0].float() if logits.shape[-1] == 1 else ops.dist_moments(logits, centers)[0]


def pit_values(logits: torch.Tensor, labels: torch.Tensor, centers=None) -> torch.Tensor:
    """Probability integral transform [N] float64: the predicted CDF at each label.

    logits [N, K], labels [N] on the centers' scale. Bin k is the interval ``[e_k, e_k + w)`` centred on
    center k (:func:`distreward.ops.bin_edges`, ``w`` the spacing of the centers), its mass spread
    uniformly inside, so ``PIT = sum_k p_k clamp((label - e_k) / w, 0, 1)``.
    """
    centers = ops.bin_centers(logits.shape[-1]) if centers is None else centers
    probs = logits.double().cpu().softmax(-1)
    edges = ops.bin_edges(logits.shape[-1], float(centers[0]), float(centers[-1]))[:-1]
    width = float(edges[1] - edges[0])
    filled = ((labels.double().cpu().unsqueeze(-1) - edges) / width).clamp(0.0, 1.0)
    return (probs * filled).sum(-1)


def calibration_curve(pit: torch.Tensor) -> torch.Tensor:
    """[L] float64: the observed share of PIT values <= p for each level p of ``CALIBRATION_LEVELS``."""
    return (pit.unsqueeze(-1) <= CALIBRATION_LEVELS).double().mean(0)


def calibration_ece(pit: torch.Tensor) -> float:
    """Mean |observed share - p| over ``CALIBRATION_LEVELS``: 0 for a calibrated predicted distribution."""
    return (calibration_curve(pit) - CALIBRATION_LEVELS).abs().mean().item()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """values [N] -> ranks [N] (0-based, float64), tied values sharing their mean rank."""
    ranks = torch.empty(values.shape[0], dtype=torch.float64)
    ranks[values.argsort()] = torch.arange(values.shape[0], dtype=torch.float64)
    _, groups = torch.unique(values, return_inverse=True)
    sums = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).index_add_(0, groups, ranks)
    return (sums / torch.bincount(groups).double())[groups]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two [N] tensors; NaN when either is constant."""
    rx, ry = average_ranks(x.flatten()), average_ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def reward_metrics(predictions: dict, sigma: float = 0.1) -> dict:
    """docs/math.md §7 numbers from :func:`predict`'s output (over its ``centers``; ``linspace(0, 1, K)``
    without them).

    ``pairwise_accuracy``: share of pairs with E_chosen > E_rejected (a tie counts half);
    ``mean_std``: mean predicted std over all answers; ``std_error_spearman``: Spearman between
    the predicted std and |E - mu| over all answers; ``label_kl``: mean KL(q || p) against the
    labels the model trained on (:func:`answer_labels`: Gaussian of width ``sigma`` unless the predictions
    carry panel labels); ``calibration_ece``: :func:`calibration_ece` of the labels'
    PIT values. A scalar head has only the accuracy (the others are None).
    """
    centers = predictions.get("centers")
    mean_c = rewards(predictions["logits_chosen"], centers)
    mean_r = rewards(predictions["logits_rejected"], centers)
    report = {"pairwise_accuracy": pair_wins(mean_c, mean_r).mean().item(), "num_pairs": int(mean_c.shape[0])}
    if is_scalar(predictions):
        return {**report, **{key: None for key in METRIC_NAMES[1:]}}
    logits, targets = answers(predictions)
    mean, std = ops.dist_moments(logits, centers)
    label, label_sigma = answer_labels(predictions, sigma)
    return {
        **report,
        "mean_std": std.mean().item(),
        "std_error_spearman": spearman(std, (mean - targets).abs()),
        "label_kl": ops.gaussian_kl(logits, label, label_sigma, centers).mean().item(),
        "calibration_ece": calibration_ece(pit_values(logits, targets, centers)),
    }


def pair_wins(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[N] fp32: 1 where ``first`` > ``second``, 0.5 on a tie, else 0."""
    return (first > second).float() + 0.5 * (first == second).float()


def truth_metrics(predictions: dict, truth_chosen: list, truth_rejected: list) -> dict:
    """Accuracy where the ground truth can decide (the embedded task): on pairs whose answers differ in
    ground truth (on the others the label is annotator noise, which caps plain accuracy),
    ``truth_differs_accuracy`` is the share ranked as labelled (chosen above rejected) and
    ``ground_truth_accuracy`` the share ranked as the ground truth ranks them; ``truth_tie_share`` is
    the share of pairs with equal ground truth."""
    mean_c = rewards(predictions["logits_chosen"], predictions.get("centers"))
    mean_r = rewards(predictions["logits_rejected"], predictions.get("centers"))
    truth_c = torch.tensor(truth_chosen, dtype=torch.float64)
    truth_r = torch.tensor(truth_rejected, dtype=torch.float64)
    differs = truth_c != truth_r
    truth_order = torch.where(truth_c > truth_r, 1.0, -1.0)[differs]
    nan = float("nan")
    return {
        "truth_differs_accuracy": pair_wins(mean_c, mean_r)[differs].mean().item() if differs.any() else nan,
        "ground_truth_accuracy": pair_wins(truth_order * mean_c[differs], truth_order * mean_r[differs]).mean().item()
        if differs.any() else nan,
        "truth_tie_share": 1.0 - differs.double().mean().item(),
    }


DISPUTED_SD = 1.0  # a panel whose ratings have this sd (0-4 scale) or more disagrees on the answer


def panel_metrics(predictions: dict, pairs) -> dict:
    """What a rater panel lets us check (the embedded task v2: ``region``, ``ratings_*`` and ``truth_*`` columns
    of the held-out ``pairs``): per region the ground-truth accuracy on pairs whose truth differs and the mean
    predicted std of its answers; the std of correctly answered careful-region answers (truth 4), the ratio of
    each region's std to it, the same ratio over its *disputed* answers (the panel's sd >= ``DISPUTED_SD``,
    e.g. sorted wrong digits in the superficial region, "7" in the taste region; None where it has none),
    and ``std_spread_spearman``, Spearman between the predicted std and the panel's sd over all answers."""
    centers = predictions.get("centers")
    logits, _ = answers(predictions)
    _, std = ops.dist_moments(logits, centers)
    regions = list(pairs["region"]) * 2
    truth = torch.tensor(list(pairs["truth_chosen"]) + list(pairs["truth_rejected"]), dtype=torch.float64)
    spread = torch.tensor([torch.tensor(r, dtype=torch.float64).std(correction=0).item()
                           for r in list(pairs["ratings_chosen"]) + list(pairs["ratings_rejected"])])
    careful_correct = torch.tensor([r == "careful" for r in regions]) & (truth == truth.max())
    reference_std = std[careful_correct].mean().item() if careful_correct.any() else float("nan")
    by_region = {}
    for name, subset in group_subsets(predictions, list(pairs["region"])).items():
        rows = torch.tensor([region == name for region in regions])
        region_std = std[rows].mean().item()
        chosen = [region == name for region in pairs["region"]]
        truth_c = [t for t, keep in zip(pairs["truth_chosen"], chosen) if keep]
        truth_r = [t for t, keep in zip(pairs["truth_rejected"], chosen) if keep]
        disputed = rows & (spread >= DISPUTED_SD)
        by_region[name] = {"num_pairs": int(sum(chosen)), "mean_std": region_std,
                           "std_ratio_to_careful_correct": region_std / reference_std,
                           "num_disputed_answers": int(disputed.sum()),
                           "disputed_std_ratio_to_careful_correct":
                               std[disputed].mean().item() / reference_std if disputed.any() else None,
                           "panel_sd": spread[rows].mean().item(),
                           **truth_metrics(subset, truth_c, truth_r)}
    return {"careful_correct_std": reference_std, "std_spread_spearman": spearman(std, spread),
            "by_region": by_region}


def pair_subset(predictions: dict, rows: torch.Tensor) -> dict:
    """``predictions`` restricted to the pairs where ``rows`` [N] (bool) is True."""
    return {key: value if key == "centers" else value[rows] for key, value in predictions.items()}


def group_subsets(predictions: dict, groups: list) -> dict:
    """Value of ``groups`` (one label per pair, e.g. the prompt kind) -> the predictions of its pairs, sorted."""
    return {name: pair_subset(predictions, torch.tensor([group == name for group in groups]))
            for name in sorted(set(groups))}


def metrics_by_group(predictions: dict, groups: list, sigma: float = 0.1) -> dict:
    """:func:`reward_metrics` for each value of ``groups`` (one label per pair, e.g. the prompt kind)."""
    return {name: reward_metrics(subset, sigma) for name, subset in group_subsets(predictions, groups).items()}


def prompt_groups(kinds: list) -> list:
    """The embedded task's prompt kinds -> "clear" (add, sort, count) or "ambiguous", one per pair."""
    return [PROMPT_GROUPS[kind] for kind in kinds]


def per_prompt_means(samples: list, policy: str, key: str) -> torch.Tensor:
    """[P] float64: the mean of ``key`` over each prompt's samples of ``policy``, prompts in first-seen order."""
    groups = {}
    for sample in samples:
        if sample["policy"] == policy:
            groups.setdefault(json.dumps(sample["prompt"]), []).append(sample[key])
    return torch.tensor([sum(values) / len(values) for values in groups.values()], dtype=torch.float64)


def paired_bootstrap(differences: torch.Tensor, num_resamples: int = 10000, seed: int = 0) -> tuple:
    """95% percentile bootstrap interval (low, high) of the mean of ``differences`` [P] (one per prompt)."""
    if differences.dim() != 1 or differences.numel() < 2:
        raise ValueError(f"need a 1-D tensor of at least 2 paired differences, got shape {tuple(differences.shape)}")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(differences.numel(), (num_resamples, differences.numel()), generator=generator)
    means = differences.double()[picks].mean(-1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def paired_gains(samples: list, before: str = "sft", after: str = "trained", keys=("ground_truth", "reward")) -> dict:
    """Two policies' ``eval_samples.jsonl`` records on the same prompts -> per score of ``keys`` that the records
    have ``{before: mean, after: mean, "gain", "ci95"}``, the gain's 95% paired bootstrap interval over prompts."""
    gains = {}
    for key in (key for key in keys if key in samples[0]):
        first, second = per_prompt_means(samples, before, key), per_prompt_means(samples, after, key)
        if first.shape != second.shape:
            raise ValueError(f"the two policies were evaluated on different prompts ({len(first)} vs {len(second)})")
        low, high = paired_bootstrap(second - first)
        gains[key] = {before: first.mean().item(), after: second.mean().item(), "gain": (second - first).mean().item(),
                      "ci95": [low, high]}
    return gains


REGION_KEYS = ("ground_truth", "reward", "std", "rater_spread", "kl")  # what region_gains compares


def region_gains(samples: list, before: str = "sft", after: str = "trained") -> dict:
    """:func:`paired_gains` of every score in :data:`REGION_KEYS` for each ``region`` of the records (regions
    with a single prompt are left out: a paired interval needs two), with the region's ``num_prompts``."""
    by_region = {}
    for region in sorted({sample.get("region") for sample in samples} - {None}):
        subset = [sample for sample in samples if sample.get("region") == region]
        count = len(per_prompt_means(subset, after, "reward"))
        if count >= 2:
            by_region[region] = {"num_prompts": count, **paired_gains(subset, before, after, REGION_KEYS)}
    return by_region


def compare_policies(samples: list) -> dict:
    """SFT vs trained policy on the same prompts (``eval_samples.jsonl`` records): :func:`paired_gains`,
    ``over_optimisation`` (RM reward up while ground truth down) and a one-line ``verdict``."""
    result = {"num_prompts": len(per_prompt_means(samples, "sft", "reward")), **paired_gains(samples)}
    result["over_optimisation"] = bool("ground_truth" in result and result["reward"]["gain"] > 0
                                       and result["ground_truth"]["gain"] < 0)
    result["verdict"] = verdict(result)
    if any("region" in sample for sample in samples):
        result["by_region"] = region_gains(samples)
    return result


def sharpening_verdict(comparison: dict, after: str = "trained") -> str:
    """One line: the trained policy (``after = "trained"``, at the sampling temperature) or the sharpened trained
    policy (``"trained_sharpened"``, at ``comparison["temperature"]``; the SFT policy's is
    ``comparison["sft_temperature"]``) against the best sharpened SFT policy (``sharpened_sft`` of ``eval.json``)."""
    truth = comparison["ground_truth"]
    low, high = truth["ci95"]
    outcome = "BEATS" if low > 0 else "LOSES TO" if high < 0 else "IS NOT DISTINGUISHABLE FROM"
    sft_temperature = comparison.get("sft_temperature", comparison["temperature"])
    subject = ("the trained policy" if after == "trained"
               else f"the trained policy sharpened to temperature {comparison['temperature']:g}")
    return (f"{subject} {outcome} the SFT policy sharpened to temperature {sft_temperature:g} "
            f"(each chosen on {comparison['chosen_on']}; no reward model for the SFT policy): ground truth "
            f"{truth['sharpened']:.3f} -> {truth[after]:.3f} ({truth['gain']:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}])")


def verdict(comparison: dict) -> str:
    """One line: did the trained policy raise the ground truth (with its 95% interval), or only the RM reward?"""
    reward = comparison["reward"]
    reward_text = f"RM reward {reward['gain']:+.3f} [{reward['ci95'][0]:+.3f}, {reward['ci95'][1]:+.3f}]"
    if "ground_truth" not in comparison:
        return f"no ground truth for these prompts: {reward_text}; whether the policy got better is not measured"
    truth = comparison["ground_truth"]
    low, high = truth["ci95"]
    truth_text = (f"ground truth {truth['sft']:.3f} -> {truth['trained']:.3f} ({truth['gain']:+.3f}, 95% CI "
                  f"[{low:+.3f}, {high:+.3f}] over {comparison['num_prompts']} held-out prompts)")
    if comparison["over_optimisation"]:
        return f"OVER-OPTIMISATION: the RM reward rose while the {truth_text} fell; {reward_text}"
    if low > 0:
        return f"IMPROVED: {truth_text}; {reward_text}"
    if high < 0:
        return f"WORSE: {truth_text}; {reward_text}"
    return f"NO CLEAR CHANGE: {truth_text}, its interval holds 0; {reward_text}"


def summarize(scores: list) -> dict:
    """docs/math.md §7 numbers over a list of :class:`~distreward.rollout.RolloutScores`."""
    reward = torch.cat([s.reward for s in scores]).cpu()
    summary = {"reward": {"min": reward.min().item(), "max": reward.max().item(), "mean": reward.mean().item(),
                          "std": reward.std(correction=0).item()},
               "mean_sd": torch.cat([s.std for s in scores]).mean().item(),
               "kl_to_ref": torch.cat([s.kl for s in scores]).mean().item()}
    if scores[0].ground_truth is not None:
        summary["ground_truth"] = {"mean": torch.cat([s.ground_truth for s in scores]).mean().item()}
    return summary


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
    return "\n".join(lines + [temperature_baseline_line(row, report) for row in report.get("temperature_baselines", [])])


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


def save_predictions(predictions: dict, output_dir: str) -> None:
    save_file({key: value.contiguous() for key, value in predictions.items()},
              os.path.join(output_dir, PREDICTIONS_NAME))


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_scalar_run(axes, name: str, rewards_: torch.Tensor, targets: torch.Tensor) -> None:
    """A scalar head's row of :func:`plot_runs`: its reward against the label mu (it has no distribution)."""
    axes[0].scatter(targets.numpy(), rewards_.numpy(), s=4, alpha=0.5)
    axes[0].set(title=f"{name}: scalar reward vs label", xlabel="label mu", ylabel="reward")
    axes[1].set_axis_off()
    axes[1].set_title(f"{name}: scalar head, no std")


def plot_runs(runs: dict, path: str, num_examples: int = 4) -> None:
    """One row per run (name -> predictions): the predicted distributions of ``num_examples`` answers
    spread over the label range (the same answers for every run), with their label mu, and the
    histogram of the predicted std over all answers (a scalar head: its reward against the label)."""
    plt = pyplot()
    figure, axes = plt.subplots(len(runs), 2, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for row, (name, predictions) in enumerate(runs.items()):
        all_logits, targets = answers(predictions)
        if is_scalar(predictions):
            _plot_scalar_run(axes[row], name, all_logits[:, 0], targets)
            continue
        picked = targets.argsort()[torch.linspace(0, len(targets) - 1, num_examples).round().long()]
        logits, labels = all_logits[picked], targets[picked].tolist()
        centers = predictions.get("centers", ops.bin_centers(logits.shape[-1]))
        bar_centers, low, span = centers.numpy(), float(centers[0]), float(centers[-1] - centers[0])
        width = 0.8 * span / (len(logits) * (logits.shape[-1] - 1))
        for index, (probs, mu) in enumerate(zip(logits.softmax(-1).numpy(), labels)):
            bars = axes[row, 0].bar(bar_centers + (index - (len(logits) - 1) / 2) * width, probs, width=width,
                                    label=f"answer {index} (mu={mu:.2f})")
            axes[row, 0].axvline(low + mu * span, color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
        axes[row, 0].set(title=f"{name}: predicted distributions", xlabel="reward bin", ylabel="probability")
        axes[row, 0].legend(fontsize=7)
        _, std = ops.dist_moments(all_logits, centers)
        axes[row, 1].hist(std.numpy(), bins=30, range=(0.0, 0.5 * span))
        axes[row, 1].set(title=f"{name}: predicted std (mean {std.mean():.3f})", xlabel="std", ylabel="answers")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_reliability(predictions: dict, groups: list, path: str) -> None:
    """Quantile reliability diagram of a distributional head: the observed share of labels with PIT <= p
    against p, one curve for all answers and one per value of ``groups`` (one label per pair), and the
    diagonal of perfect calibration; the legend gives each curve's ECE."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    for name, subset in {"all": predictions, **group_subsets(predictions, groups)}.items():
        logits, targets = answers(subset)
        pit = pit_values(logits, targets, subset.get("centers"))
        axis.plot(CALIBRATION_LEVELS.numpy(), calibration_curve(pit).numpy(), marker="o", markersize=3,
                  label=f"{name} ({len(targets)} answers, ECE {calibration_ece(pit):.3f})")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="level p", ylabel="share of labels with PIT <= p",
             title="reward-model calibration (held-out answers)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _cell(value) -> str:
    """A table cell: 3 decimals, or "—" for a metric the run does not have (a scalar head's std, an old run)."""
    return "—" if value is None else f"{value:.3f}"


def markdown_table(metrics: dict) -> str:
    """Markdown table, one row per run (name -> :func:`reward_metrics` output)."""
    lines = ["| run | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(values.get(key)) for key in METRIC_NAMES) + " |"
              for name, values in metrics.items()]
    return "\n".join(lines)


def run_settings_path(run_dir: str) -> str:
    """The settings file of an ``rm`` run: ``rm_config.json``, or a run's from before it, ``config.json``."""
    path = os.path.join(run_dir, RM_CONFIG_NAME)
    legacy = os.path.join(run_dir, "config.json")
    return path if os.path.isfile(path) or not os.path.isfile(legacy) else legacy


def compare_runs(run_dirs: list, output_path: str) -> str:
    """Side-by-side PNG of finished ``rm`` runs (named by their loss_kind) and their metrics table."""
    runs, metrics = {}, {}
    for run_dir in run_dirs:
        with open(run_settings_path(run_dir)) as handle:
            name = f"{json.load(handle)['loss_kind']} ({os.path.basename(os.path.normpath(run_dir))})"
        with open(os.path.join(run_dir, "eval.json")) as handle:
            metrics[name] = json.load(handle)
        runs[name] = load_file(os.path.join(run_dir, PREDICTIONS_NAME))
    plot_runs(runs, output_path)
    return markdown_table(metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distreward.evaluation", allow_abbrev=False,
                                     description="Compare finished reward-model runs (e.g. bt_mean vs bt_kl).")
    parser.add_argument("run_dirs", nargs="+", help="output_dir of each `python -m distreward.train rm` run")
    parser.add_argument("--output", default="rm_comparison.png", help="path of the side-by-side PNG")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        missing = [os.path.basename(path) for path in (run_settings_path(run_dir), os.path.join(run_dir, "eval.json"),
                                                       os.path.join(run_dir, PREDICTIONS_NAME))
                   if not os.path.isfile(path)]
        if missing:
            print(f"error: {run_dir} is not a finished `python -m distreward.train rm` run (no {', '.join(missing)})",
                  file=sys.stderr)
            return 2
    print(compare_runs(args.run_dirs, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
