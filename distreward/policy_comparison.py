"""Two policies on the same held-out prompts (the rl stage's ``eval.json``): per-prompt paired gains with 95%
bootstrap intervals, overall and per region, and the one-line verdicts; :func:`summarize` one policy's rollout
scores.
"""
import json

import torch


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
