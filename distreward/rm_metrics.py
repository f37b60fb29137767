"""Held-out metrics of a reward model (docs/math.md §7): the numbers of the rm stage's ``eval.json``.

:func:`predict` runs the model over tokenised pairs; :func:`reward_metrics` turns the predictions
into ``eval.json``'s numbers (a scalar head's, whose logits are [N, 1], have no std, label KL or
calibration: those are None); :func:`truth_metrics`, :func:`panel_metrics` and :func:`metrics_by_group`
add what the embedded task's ground truth, rater panel and prompt groups let us check. The figures of these
predictions: :mod:`distreward.plots`.
"""
import os

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from distreward import ops
from distreward.data import PreferenceCollator
from distreward.defaults import SIGMA
from distreward.run_files import PREDICTIONS_NAME

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


def reward_metrics(predictions: dict, sigma: float = SIGMA) -> dict:
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


def metrics_by_group(predictions: dict, groups: list, sigma: float = SIGMA) -> dict:
    """:func:`reward_metrics` for each value of ``groups`` (one label per pair, e.g. the prompt kind)."""
    return {name: reward_metrics(subset, sigma) for name, subset in group_subsets(predictions, groups).items()}


def prompt_groups(kinds: list) -> list:
    """The embedded task's prompt kinds -> "clear" (add, sort, count) or "ambiguous", one per pair."""
    return [PROMPT_GROUPS[kind] for kind in kinds]


def save_predictions(predictions: dict, output_dir: str) -> None:
    save_file({key: value.contiguous() for key, value in predictions.items()},
              os.path.join(output_dir, PREDICTIONS_NAME))
