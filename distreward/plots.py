"""The reward model's figures (matplotlib, file-only Agg backend): :func:`plot_runs` draws, per run, the
predicted distributions of a few answers and the histogram of the predicted std; :func:`plot_reliability` the
quantile calibration curves.
"""
import torch

from distreward import ops
from distreward.rm_metrics import (CALIBRATION_LEVELS, answers, calibration_curve, calibration_ece, group_subsets,
                                   is_scalar, pit_values)


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
