"""Score labels of the reward model from a rater panel (docs/math.md §2): ``--label_kind``.

Every answer carries its mean score ``mu`` in [0, 1]; an answer rated by a panel (integer ratings, as
HelpSteer2 keeps per rater) can also carry its ratings ``r_j``, mapped to [0, 1] like the score. Then:

- ``gaussian``: the write-up's label, a discretised Gaussian N(mu, sigma0^2) of fixed width;
- ``gaussian_spread``: N(mu, sigma_i^2) with a per-answer width ``sigma_i = sqrt(sigma0^2 + s_i^2)``,
  ``s_i`` the raters' (population) sd on the [0, 1] scale;
- ``mixture``: ``q_i = mean_j N_disc(r_j, sigma0)``, the average of one discretised Gaussian per rater,
  which keeps a bimodal panel bimodal;
- ``auto`` (the default): :data:`PANEL_DEFAULT` where the data keep per-rater ratings, ``gaussian`` elsewhere.
"""
import torch

from distreward.ops import bin_centers
from distreward.ops.reference import label_log_probs
from distreward.ops.validation import check_choice

LABEL_KINDS = ("auto", "gaussian", "gaussian_spread", "mixture")
PANEL_LABEL_KINDS = ("gaussian_spread", "mixture")  # the kinds that read the raters' ratings
PANEL_DEFAULT = "mixture"  # what ``auto`` picks for data with ratings


def check_label_kind(label_kind: str) -> None:
    check_choice("--label_kind", label_kind, LABEL_KINDS)


def resolve_label_kind(label_kind: str, has_ratings: bool) -> str:
    """``auto`` -> :data:`PANEL_DEFAULT` for data with per-rater ratings, else ``gaussian``; ValueError for a
    panel kind on data without ratings."""
    check_label_kind(label_kind)
    if label_kind == "auto":
        return PANEL_DEFAULT if has_ratings else "gaussian"
    if label_kind in PANEL_LABEL_KINDS and not has_ratings:
        raise ValueError(f"--label_kind {label_kind} reads each rater's ratings, which these data lack (no "
                         f"ratings_chosen / ratings_rejected columns): use --label_kind gaussian or auto")
    return label_kind


def scaled_ratings(ratings: list, score_min: float, score_max: float) -> torch.Tensor:
    """An answer's ratings on the [0, 1] scale -> float64 [R]; ValueError for a rating outside the score range."""
    values = torch.tensor(ratings, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"an answer's ratings must be a non-empty list of numbers, got {ratings!r}")
    if bool(((values < score_min) | (values > score_max)).any()):
        raise ValueError(f"ratings {ratings} lie outside the score range [{score_min:g}, {score_max:g}]")
    return (values - score_min) / (score_max - score_min)


def spread_sigma(ratings: list, sigma: float, score_min: float, score_max: float) -> float:
    """``gaussian_spread``'s width ``sqrt(sigma^2 + s^2)`` of one answer, ``s`` its ratings' sd on [0, 1]."""
    spread = scaled_ratings(ratings, score_min, score_max).std(correction=0)
    return float((sigma ** 2 + spread ** 2).sqrt())


def mixture_label(ratings: list, sigma: float, score_min: float, score_max: float, num_bins: int) -> list:
    """``mixture``'s label distribution [K] of one answer: the mean of one Gaussian label per rating."""
    scaled = scaled_ratings(ratings, score_min, score_max)
    centers = bin_centers(num_bins, dtype=torch.float64)
    return label_log_probs(scaled, sigma, centers).exp().mean(0).tolist()
