"""Quantile (PIT) calibration of the predicted distribution, and the scalar head's evaluation."""
import math

import pytest
import torch

from distreward import ops, rm_metrics, tables
from distreward.plots import plot_reliability
from distreward.rm_metrics import (CALIBRATION_LEVELS, calibration_curve, calibration_ece, pit_values, prompt_groups,
                                   reward_metrics)


def test_pit_by_hand_for_two_and_three_bins():
    # centers 0.25, 0.75: bins [0, 0.5) and [0.5, 1], masses 0.25 and 0.75.
    logits = torch.tensor([0.25, 0.75]).log().expand(4, 2)
    pit = pit_values(logits, torch.tensor([0.0, 0.25, 0.75, 1.0]), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(pit, torch.tensor([0.0, 0.125, 0.625, 1.0], dtype=torch.float64))
    # default centers 0, 0.5, 1: bins of width 0.5 from -0.25, masses 0.5, 0.2, 0.3; label 0.5 (the middle
    # center) fills bin 0 and half of bin 1.
    logits = torch.tensor([[0.5, 0.2, 0.3]]).log()
    torch.testing.assert_close(pit_values(logits, torch.tensor([0.5])), torch.tensor([0.6], dtype=torch.float64))
    # the same on centers of another range: 2, 3.5, 5 in bins of width 1.5, label 3.5
    centers = torch.tensor([2.0, 3.5, 5.0])
    torch.testing.assert_close(pit_values(logits, torch.tensor([3.5]), centers),
                               torch.tensor([0.6], dtype=torch.float64))


def test_curve_and_ece_by_hand():
    pit = torch.tensor([0.0, 0.12, 0.5, 0.97], dtype=torch.float64)
    curve = calibration_curve(pit)
    assert CALIBRATION_LEVELS[0].item() == pytest.approx(0.05) and CALIBRATION_LEVELS[-1].item() == pytest.approx(0.95)
    assert curve[0].item() == 0.25 and curve[2].item() == 0.5 and curve[9].item() == 0.75 and curve[-1].item() == 0.75
    expected = (curve - CALIBRATION_LEVELS).abs().mean().item()
    assert calibration_ece(pit) == pytest.approx(expected)


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from the predicted distribution (default centers): a bin by its mass, then
    uniform inside it."""
    edges = ops.bin_edges(logits.shape[-1])
    picked = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    inside = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    return (edges[picked] + inside * (edges[1] - edges[0])).float()


def test_labels_drawn_from_the_prediction_are_calibrated():
    n = 20000
    generator = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(n, 10, generator=generator)
    pit = pit_values(logits, sample_labels(logits, generator))
    # The PIT of such labels is uniform, so each level's share is Binomial(n, p) / n: within 5 sigma
    # (sigma <= 0.5 / sqrt(n)) at every level, and so is the mean deviation.
    assert calibration_ece(pit) < 5 * 0.5 / math.sqrt(n)


def test_an_overconfident_prediction_has_a_large_ece():
    n = 20000
    generator = torch.Generator().manual_seed(1)
    logits = torch.full((n, 10), -30.0)
    logits[:, 5] = 0.0  # nearly all mass in bin 5 = [0.5, 0.5 + 1/9) (centers k/9, bins of width 1/9)
    labels = torch.rand(n, generator=generator)  # the truth is uniform on [0, 1]
    ece = calibration_ece(pit_values(logits, labels))
    # PIT = clamp((label - 0.5) * 9, 0, 1), so observed(p) = P(label <= 0.5 + p / 9) = 0.5 + p / 9 and the
    # ECE is mean_p |0.5 - 8 p / 9| = 0.215 for infinitely many labels; sampling moves each level by under
    # 5 sigma = 0.018 here.
    expected = (0.5 - 8 * CALIBRATION_LEVELS / 9).abs().mean().item()
    assert abs(expected - 0.215) < 1e-3 and abs(ece - expected) < 5 * 0.5 / math.sqrt(n)


def predictions_of(logits_chosen, logits_rejected, targets_chosen, targets_rejected):
    return {"logits_chosen": logits_chosen, "logits_rejected": logits_rejected,
            "target_chosen": targets_chosen, "target_rejected": targets_rejected}


def test_scalar_predictions_have_accuracy_and_no_distribution_metrics():
    predictions = predictions_of(torch.tensor([[0.9], [0.1], [0.5]]), torch.tensor([[0.2], [0.4], [0.5]]),
                                 torch.ones(3), torch.zeros(3))
    report = reward_metrics(predictions)
    assert report["pairwise_accuracy"] == pytest.approx(0.5) and report["num_pairs"] == 3
    assert all(report[key] is None for key in ("mean_std", "std_error_spearman", "label_kl", "calibration_ece"))
    truth = rm_metrics.truth_metrics(predictions, [4, 3, 2], [0, 1, 2])
    assert truth["truth_differs_accuracy"] == pytest.approx(0.5)
    assert "—" in tables.markdown_table({"scalar_bt": report})


def test_prompt_groups_and_the_reliability_plot(tmp_path):
    assert prompt_groups(["add", "sort", "count", "ambiguous"]) == ["clear", "clear", "clear", "ambiguous"]
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 10, generator=generator)
    predictions = predictions_of(logits[:4], logits[4:], torch.rand(4, generator=generator),
                                 torch.rand(4, generator=generator))
    path = tmp_path / "reliability.png"
    plot_reliability(predictions, ["clear", "ambiguous", "clear", "clear"], str(path))
    assert path.stat().st_size > 0
    grouped = rm_metrics.metrics_by_group(predictions, ["clear", "ambiguous", "clear", "clear"])
    assert set(grouped) == {"clear", "ambiguous"} and grouped["clear"]["num_pairs"] == 3
    assert grouped["ambiguous"]["calibration_ece"] is not None
