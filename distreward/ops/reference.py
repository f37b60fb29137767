"""Plain-PyTorch reference implementations of docs/math.md §1-4 (the ``eager`` backend).

Every function computes in float32 (float64 stays float64) whatever the input dtype, in
log-sum-exp form, so it is stable for logits of any magnitude. The fused backends are tested
against these.
"""
import torch
import torch.nn.functional as F

from distreward.ops import loss_kinds

LABEL_SUM_TOLERANCE = 1e-3  # |sum_k q_k - 1| a given label distribution's row may have (docs/math.md §2)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with value and gradient 0 where ``x`` is 0 (a one-hot distribution has std 0)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def dist_moments(logits: torch.Tensor, centers: torch.Tensor):
    """logits [N, K], centers [K] -> (mean [N], std [N]) of softmax(logits) over the centers."""
    z = logits.to(compute_dtype(logits))
    c = centers.to(z.dtype)
    p = torch.softmax(z, dim=-1)
    mean = (p * c).sum(-1)
    var = (p * (c - mean.unsqueeze(-1)).square()).sum(-1)
    return mean, safe_sqrt(var)


def label_sides(sigma):
    """``pair_loss``'s ``sigma`` as (sigma_chosen, sigma_rejected): a pair as given, one width for both sides."""
    return sigma if isinstance(sigma, tuple) else (sigma, sigma)


def label_log_probs(target: torch.Tensor, sigma, centers: torch.Tensor) -> torch.Tensor:
    """log q [N, K] of the label distribution (docs/math.md §2), in float32 (float64 for a float64 target).

    - ``target`` [N] label means: q is the discretised Gaussian N(target, sigma^2) over the centers, with
      ``sigma`` a number or a tensor [N] of per-row widths. Rows whose target lies outside [0, 1], whose
      sigma is not positive and finite, or whose centers are not finite are NaN.
    - ``target`` [N, K]: q is the target itself (``sigma`` unused); log 0 = -inf. Rows holding a negative or
      non-finite entry, or not summing to 1 within LABEL_SUM_TOLERANCE, are NaN.
    """
    if target.dim() == 2:
        q = target.to(compute_dtype(target))
        usable = ((q >= 0) & torch.isfinite(q)).all(dim=-1, keepdim=True)
        usable &= (q.sum(-1, keepdim=True) - 1).abs() <= LABEL_SUM_TOLERANCE
        return torch.where(usable, q.log(), torch.nan)
    c = centers.to(compute_dtype(target))
    c = torch.where(torch.isfinite(c), c, torch.nan)
    t = target.to(c.dtype)
    t = torch.where((t >= 0) & (t <= 1), t, torch.nan)
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(c.dtype)
        s = torch.where((s > 0) & torch.isfinite(s), s, torch.nan)
        scale = (-0.5 / (s * s)).unsqueeze(-1)
    else:
        scale = -0.5 / (float(sigma) * float(sigma))
    scores = (c - t.unsqueeze(-1)).square() * scale
    return torch.log_softmax(scores, dim=-1)


def gaussian_kl(logits: torch.Tensor, target: torch.Tensor, sigma, centers: torch.Tensor) -> torch.Tensor:
    """KL(q || softmax(logits)) [N] for the labels q of :func:`label_log_probs` (Gaussian around a target [N] of
    width ``sigma``, or a given q [N, K]); q_k = 0 terms count 0 (NaN stays)."""
    log_p = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)
    log_q = label_log_probs(target, sigma, centers).to(log_p.dtype)
    q = log_q.exp()
    terms = torch.where(q != 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(-1)


def dpl_log_prob(logits_chosen: torch.Tensor, logits_rejected: torch.Tensor) -> torch.Tensor:
    """log( sum_{i>j} p_c,i p_r,j + 0.5 sum_i p_c,i p_r,i ) [N], in log-sum-exp form."""
    dtype = torch.promote_types(compute_dtype(logits_chosen), compute_dtype(logits_rejected))
    log_pc = torch.log_softmax(logits_chosen.to(dtype), dim=-1)
    log_pr = torch.log_softmax(logits_rejected.to(dtype), dim=-1)
    k = log_pc.shape[-1]
    weight = torch.tril(torch.ones(k, k, dtype=dtype, device=log_pc.device), diagonal=-1)
    weight += 0.5 * torch.eye(k, dtype=dtype, device=log_pc.device)
    joint = log_pc.unsqueeze(-1) + log_pr.unsqueeze(-2) + weight.log()
    return torch.logsumexp(joint.flatten(-2), dim=-1)


def bt_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Bradley-Terry term ``-log sigmoid((r_c - r_r) / temperature)`` [N], as a stable softplus."""
    return F.softplus((reward_rejected - reward_chosen) / temperature)


def pair_loss(logits_chosen, logits_rejected, target_chosen, target_rejected,
              kind: str = "bt_kl", sigma=0.1, score_weight: float = 1.0, centers=None,
              temperature: float = 1.0) -> torch.Tensor:
    """Mean over N pairs of the docs/math.md §3 loss ``kind`` ("bt_mean", "bt_kl" or "dpl"); scalar fp32.

    Each target is [N] label means or [N, K] label distributions (:func:`label_log_probs`); ``sigma`` is a
    number or a tensor [N] for both sides, or a pair (sigma_chosen, sigma_rejected) of those.

    ``temperature`` divides the margin E_c - E_r of the Bradley-Terry term (bt_mean, bt_kl); dpl has
    no margin and takes only ``temperature=1``.
    """
    loss = loss_kinds.row(kind, loss_kinds.LOSS_KINDS)
    loss_kinds.check_temperature(kind, temperature)
    if loss.margin:
        mean_c, _ = dist_moments(logits_chosen, centers)
        mean_r, _ = dist_moments(logits_rejected, centers)
        pref = bt_loss(mean_c, mean_r, temperature)
    else:
        pref = -dpl_log_prob(logits_chosen, logits_rejected)
    if not loss.reads_targets or score_weight == 0:
        return pref.mean()
    sigma_chosen, sigma_rejected = label_sides(sigma)
    score = 0.5 * (gaussian_kl(logits_chosen, target_chosen, sigma_chosen, centers)
                   + gaussian_kl(logits_rejected, target_rejected, sigma_rejected, centers))
    return (pref + score_weight * score).mean()


def scalar_pair_loss(reward_chosen, reward_rejected, target_chosen=None, target_rejected=None,
                     kind: str = "scalar_bt", score_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Mean over N pairs of a scalar reward model's loss; rewards [N] each -> scalar fp32 (fp64 stays fp64).

    ``scalar_bt``: TRL RewardTrainer's ``-log sigmoid(r_c - r_r)`` (the margin divided by ``temperature``);
    ``scalar_reg``: that plus ``score_weight * ((r_c - mu_c)^2 + (r_r - mu_r)^2) / 2`` with the labels
    mu [N] in [0, 1] (a label outside [0, 1] makes its row NaN, as the Gaussian labels do).
    """
    loss = loss_kinds.row(kind, loss_kinds.SCALAR_LOSS_KINDS)
    dtype = torch.promote_types(compute_dtype(reward_chosen), compute_dtype(reward_rejected))
    r_c, r_r = reward_chosen.to(dtype), reward_rejected.to(dtype)
    pref = bt_loss(r_c, r_r, temperature)
    if not loss.reads_targets or score_weight == 0:
        return pref.mean()
    squared = [(r - t.to(dtype).where((t >= 0) & (t <= 1), torch.nan)).square()
               for r, t in ((r_c, target_chosen), (r_r, target_rejected))]
    return (pref + score_weight * 0.5 * (squared[0] + squared[1])).mean()


def gather_logprobs_and_lse(logits: torch.Tensor, ids: torch.Tensor, mask=None):
    """logits [B, T, V], ids [B, T] -> (logp, lse) [B, T] fp32 (fp64): ``lse = logsumexp(logits[b, t])``,
    ``logp = logits[b, t, ids[b, t]] - lse``; both 0 where mask is False (masked rows are never read)."""
    x, picked_ids = logits.to(compute_dtype(logits)), ids.long()
    if mask is not None:  # only live rows: masked rows may be all -inf
        x, picked_ids = x[mask], picked_ids[mask]
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, picked_ids.unsqueeze(-1)).squeeze(-1) - lse
    if mask is None:
        return logp, lse
    zeros = torch.zeros(ids.shape, dtype=x.dtype, device=logits.device)
    return zeros.index_put((mask,), logp), zeros.index_put((mask,), lse)


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask=None) -> torch.Tensor:
    """logits [B, T, V], ids [B, T] -> log softmax(logits)[b, t, ids[b, t]] [B, T] fp32; 0 where mask is False."""
    return gather_logprobs_and_lse(logits, ids, mask)[0]
