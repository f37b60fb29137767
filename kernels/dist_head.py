"""Fused Triton kernels for the distributional reward head (docs/math.md §1-3).

Each program takes ``BLOCK_N`` rows of ``[N, K]`` logits (any strides) and keeps them in registers,
K padded to ``BLOCK_K`` (a power of two, 2 <= K <= 64) with masks. Per row it computes softmax in
log-sum-exp form, the mean E and std of the bin centers, the label distribution q, KL(q || p), and
the pair losses of docs/math.md §3. Math is float32 (float64 for float64 logits) whatever the input
dtype; outputs are float32 (float64), gradients come in the logits' dtype.

The label distribution takes the forms of docs/math.md §2, each a compile-time switch: the Gaussian
around a target [N] of width sigma, a Python float (one scalar argument, as before) or a tensor [N]
read per row like the target (``ROW_SIGMA``), or a given q [N, K] read with its row and bin strides
like the logits (``GIVEN_LABELS``).

- ``_row_forward_kernel`` / ``_row_backward_kernel``: ``dist_moments`` and ``gaussian_kl``, whose
  backward recomputes the softmax from the logits instead of saving ``[N, K]`` temporaries.
- ``_pair_loss_kernel``: ``pair_loss``, whose forward also writes the gradient of the mean loss
  with respect to both rows (as Liger-Kernel's cross-entropy does); backward only rescales it.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


TRITON_MAX_BINS = 64  # a row of K logits lives in registers: 2 <= K <= 64
# Elements of one [BLOCK_N, BLOCK_K] tile. The pair kernel keeps ~12 tiles live, so a GPU thread holds
# ELEMENTS_PER_THREAD of each (~50 registers, no spills): 1024 elements = 64 rows of K <= 16 at 8 warps.
# The CPU interpreter costs ~1 ms per program, so 2^20 there.
GPU_TILE_ELEMENTS = 1024
ELEMENTS_PER_THREAD = 4
INTERPRETER_TILE_ELEMENTS = 1 << 20
SCALE_BLOCK = 1024  # gradient entries per program of the pair loss's backward
# |sum_k q_k - 1| a given label distribution's row may have (docs/math.md §2; reference.LABEL_SUM_TOLERANCE).
LABEL_SUM_TOLERANCE = tl.constexpr(1e-3)
_LOG_HALF = tl.constexpr(-0.6931471805599453)


@triton.jit
def _program_tile(centers_ptr, stride_centers, n_rows, n_bins, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """This program's row indices and mask [BLOCK_N], bin indices and mask [BLOCK_K], and centers [BLOCK_K] in ACC."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    bins = tl.arange(0, BLOCK_K)
    bin_mask = bins < n_bins
    centers = tl.load(centers_ptr + bins * stride_centers, mask=bin_mask, other=0.0).to(ACC)
    return rows, rows < n_rows, bins, bin_mask, centers


@triton.jit
def _load_row_values(ptr, stride, rows, row_mask, ACC: tl.constexpr):
    """One value per row [BLOCK_N] (a target or an upstream gradient) in ACC."""
    return tl.load(ptr + rows * stride, mask=row_mask, other=0.0).to(ACC)


@triton.jit
def _load_logits(ptr, rows, row_mask, stride_row, stride_bin, bins, bin_mask, ACC: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile in the ACC dtype: padded bins are -inf, rows past N are 0 (uniform)."""
    z = tl.load(ptr + rows[:, None] * stride_row + bins[None, :] * stride_bin,
                mask=row_mask[:, None] & bin_mask[None, :], other=0.0).to(ACC)
    return tl.where(bin_mask[None, :], z, float("-inf"))


@triton.jit
def _log_softmax(z):
    """Row-wise (log p, p) of a [BLOCK_N, BLOCK_K] tile; -inf entries get p = 0. One division per row."""
    shifted = z - tl.max(z, axis=1)[:, None]
    unnormalised = tl.exp(shifted)
    total = tl.sum(unnormalised, axis=1)
    return shifted - tl.log(total)[:, None], unnormalised * (1.0 / total)[:, None]


@triton.jit
def _moments(p, centers):
    """Mean and variance [BLOCK_N] of the centers under p, and the deviations c - mean [BLOCK_N, BLOCK_K]."""
    mean = tl.sum(p * centers[None, :], axis=1)
    deviation = centers[None, :] - mean[:, None]
    return mean, tl.sum(p * deviation * deviation, axis=1), deviation


@triton.jit
def _gaussian_labels(target, label_scale, centers, bin_mask):
    """(log q, q) [BLOCK_N, BLOCK_K]: the Gaussian N(target, sigma^2) discretised over the centers.

    NaN rows where the target lies outside [0, 1] or a center is not finite (ops turns them into a ValueError).
    """
    target = tl.where((target >= 0) & (target <= 1), target, float("nan"))
    centers = tl.where(tl.abs(centers) < float("inf"), centers, float("nan"))
    distance = centers[None, :] - target[:, None]
    scores = tl.where(bin_mask[None, :], distance * distance * label_scale, float("-inf"))
    return _log_softmax(scores)


@triton.jit
def _given_labels(target_ptr, stride_row, stride_bin, rows, row_mask, bins, bin_mask, ACC: tl.constexpr):
    """(log q, q) [BLOCK_N, BLOCK_K] of a given label distribution q [N, K] (padded bins are 0).

    A row holding a negative or non-finite entry, or not summing to 1 within LABEL_SUM_TOLERANCE (rows past N
    included), becomes NaN, which makes its KL NaN (ops turns it into a ValueError); log q is read only where
    q != 0 (log 1 = 0 stands in elsewhere).
    """
    q = tl.load(target_ptr + rows[:, None] * stride_row + bins[None, :] * stride_bin,
                mask=row_mask[:, None] & bin_mask[None, :], other=0.0).to(ACC)
    q = tl.where((q >= 0) & (q < float("inf")), q, float("nan"))
    q = tl.where((tl.abs(tl.sum(q, axis=1) - 1.0) <= LABEL_SUM_TOLERANCE)[:, None], q, float("nan"))
    return tl.log(tl.where(q > 0, q, 1.0)), q


@triton.jit
def _labels(target_ptr, stride_target, stride_target_bin, sigma_ptr, stride_sigma, label_scale, rows, row_mask,
            bins, bin_mask, centers, ACC: tl.constexpr, GIVEN_LABELS: tl.constexpr, ROW_SIGMA: tl.constexpr):
    """(log q, q) [BLOCK_N, BLOCK_K] of BLOCK_N rows' label distributions: read from a target [N, K]
    (GIVEN_LABELS), else the Gaussian around the target [N] with the widths sigma [N] (ROW_SIGMA; a width that
    is not positive and finite makes its row NaN) or with the scalar ``label_scale`` = -1 / (2 sigma^2)."""
    if GIVEN_LABELS:
        log_q, q = _given_labels(target_ptr, stride_target, stride_target_bin, rows, row_mask, bins, bin_mask, ACC)
    else:
        target = _load_row_values(target_ptr, stride_target, rows, row_mask, ACC)
        if ROW_SIGMA:
            sigma = tl.load(sigma_ptr + rows * stride_sigma, mask=row_mask, other=1.0).to(ACC)
            sigma = tl.where((sigma > 0) & (sigma < float("inf")), sigma, float("nan"))
            log_q, q = _gaussian_labels(target, (-0.5 / (sigma * sigma))[:, None], centers, bin_mask)
        else:
            log_q, q = _gaussian_labels(target, label_scale, centers, bin_mask)
    return log_q, q


@triton.jit
def _kl_gradient(p, q, GIVEN_LABELS: tl.constexpr):
    """d KL(q || p) / d logits [BLOCK_N, BLOCK_K] = p * sum(q) - q: p - q for the Gaussian labels (which sum to 1),
    and the exact derivative of the KL returned for a given q, whose rows sum to 1 only within ops' tolerance."""
    if GIVEN_LABELS:
        grad = p * tl.sum(q, axis=1)[:, None] - q
    else:
        grad = p - q
    return grad


@triton.jit
def _kl(log_q, q, log_p):
    """KL(q || p) [BLOCK_N]; bins with q = 0 (padding included) count 0, a NaN q makes the row NaN."""
    support = q != 0
    return tl.sum(q * (tl.where(support, log_q, 0.0) - tl.where(support, log_p, 0.0)), axis=1)


@triton.jit
def _dpl_log_prob(log_pc, log_pr, BLOCK_K: tl.constexpr):
    """log P(chosen beats rejected) [BLOCK_N] and its gradients w.r.t. log pc and log pr [BLOCK_N, BLOCK_K].

    ``log P = logsumexp_ij (log pc_i + log pr_j + log w_ij)`` with w_ij = 1 for i > j, 1/2 for i = j
    and 0 for i < j, over a [BLOCK_N, BLOCK_K, BLOCK_K] tile; the gradients are the two marginals
    of the responsibilities ``softmax_ij(...)``.
    """
    i = tl.arange(0, BLOCK_K)[:, None]
    j = tl.arange(0, BLOCK_K)[None, :]
    log_w = tl.where(i > j, 0.0, tl.where(i == j, _LOG_HALF, float("-inf")))
    joint = log_pc[:, :, None] + log_pr[:, None, :] + log_w[None, :, :]
    peak = tl.max(tl.max(joint, axis=2), axis=1)
    unnormalised = tl.exp(joint - peak[:, None, None])
    total = tl.sum(tl.sum(unnormalised, axis=2), axis=1)
    responsibility = unnormalised * (1.0 / total)[:, None, None]
    return peak + tl.log(total), tl.sum(responsibility, axis=2), tl.sum(responsibility, axis=1)


@triton.jit
def _store_gradient(ptrs, grad, mask):
    """Store ``grad`` (ACC) in the pointers' dtype. The two rows of a pair may differ in dtype, so a float64 ACC
    can meet bfloat16 gradients: that cast goes through float32 (the interpreter's float64 -> bfloat16 gives garbage).
    """
    if ptrs.dtype.element_ty == tl.float64:
        tl.store(ptrs, grad.to(tl.float64), mask=mask)
    else:
        tl.store(ptrs, grad.to(tl.float32).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _flag_non_finite(flag_ptr, values, row_mask):
    """Set ``*flag_ptr`` to 1 when a live row's value [BLOCK_N] is NaN or infinite (bad input made it so)."""
    bad = row_mask & ~(tl.abs(values) < float("inf"))
    tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))


@triton.jit
def _row_forward_kernel(logits_ptr, stride_row, stride_bin, target_ptr, stride_target, stride_target_bin, sigma_ptr,
                        stride_sigma, centers_ptr, stride_centers, mean_ptr, std_ptr, kl_ptr, flag_ptr, n_rows,
                        n_bins, label_scale, WITH_MOMENTS: tl.constexpr, WITH_KL: tl.constexpr,
                        GIVEN_LABELS: tl.constexpr, ROW_SIGMA: tl.constexpr, WITH_FLAG: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean, std [N] (WITH_MOMENTS) and/or KL(q || p) [N] (WITH_KL; q as :func:`_labels` reads it) of BLOCK_N rows;
    with WITH_FLAG, ``*flag_ptr`` (int32, zeroed by the caller) set to 1 when a result is not finite."""
    rows, row_mask, bins, bin_mask, centers = _program_tile(centers_ptr, stride_centers, n_rows, n_bins, ACC,
                                                            BLOCK_N, BLOCK_K)
    log_p, p = _log_softmax(_load_logits(logits_ptr, rows, row_mask, stride_row, stride_bin, bins, bin_mask, ACC))
    if WITH_MOMENTS:
        mean, var, _ = _moments(p, centers)
        std = tl.sqrt(var)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(std_ptr + rows, std, mask=row_mask)
        if WITH_FLAG:
            _flag_non_finite(flag_ptr, mean + std, row_mask)
    if WITH_KL:
        log_q, q = _labels(target_ptr, stride_target, stride_target_bin, sigma_ptr, stride_sigma, label_scale, rows,
                           row_mask, bins, bin_mask, centers, ACC, GIVEN_LABELS, ROW_SIGMA)
        kl = _kl(log_q, q, log_p)
        tl.store(kl_ptr + rows, kl, mask=row_mask)
        if WITH_FLAG:
            _flag_non_finite(flag_ptr, kl, row_mask)


@triton.jit
def _row_backward_kernel(logits_ptr, stride_row, stride_bin, target_ptr, stride_target, stride_target_bin, sigma_ptr,
                         stride_sigma, centers_ptr, stride_centers, grad_mean_ptr, stride_grad_mean, grad_std_ptr,
                         stride_grad_std, grad_kl_ptr, stride_grad_kl, grad_logits_ptr, n_rows, n_bins, label_scale,
                         WITH_MOMENTS: tl.constexpr, WITH_GRAD_MEAN: tl.constexpr, WITH_GRAD_STD: tl.constexpr,
                         WITH_KL: tl.constexpr, GIVEN_LABELS: tl.constexpr, ROW_SIGMA: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """d(loss)/d(logits) [N, K] (contiguous) from the gradients of mean and/or std (WITH_GRAD_MEAN / _STD: an
    unused output has none) or of KL [N]."""
    rows, row_mask, bins, bin_mask, centers = _program_tile(centers_ptr, stride_centers, n_rows, n_bins, ACC,
                                                            BLOCK_N, BLOCK_K)
    _, p = _log_softmax(_load_logits(logits_ptr, rows, row_mask, stride_row, stride_bin, bins, bin_mask, ACC))
    grad = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
    if WITH_MOMENTS:
        _, var, deviation = _moments(p, centers)
        if WITH_GRAD_MEAN:
            grad_mean = _load_row_values(grad_mean_ptr, stride_grad_mean, rows, row_mask, ACC)
            grad += p * (grad_mean[:, None] * deviation)
        if WITH_GRAD_STD:
            grad_std = _load_row_values(grad_std_ptr, stride_grad_std, rows, row_mask, ACC)
            std = tl.sqrt(var)
            # std = 0 (a one-hot p) passes no gradient, as reference.safe_sqrt does.
            grad_var = tl.where(std > 0, grad_std / (2.0 * tl.where(std > 0, std, 1.0)), 0.0)
            grad += p * (grad_var[:, None] * (deviation * deviation - var[:, None]))
    if WITH_KL:
        grad_kl = _load_row_values(grad_kl_ptr, stride_grad_kl, rows, row_mask, ACC)
        _, q = _labels(target_ptr, stride_target, stride_target_bin, sigma_ptr, stride_sigma, label_scale, rows,
                       row_mask, bins, bin_mask, centers, ACC, GIVEN_LABELS, ROW_SIGMA)
        grad += grad_kl[:, None] * _kl_gradient(p, q, GIVEN_LABELS)
    tl.store(grad_logits_ptr + rows[:, None] * n_bins + bins[None, :], grad.to(grad_logits_ptr.dtype.element_ty),
             mask=row_mask[:, None] & bin_mask[None, :])


@triton.jit
def _pair_loss_kernel(chosen_ptr, stride_chosen_row, stride_chosen_bin, rejected_ptr, stride_rejected_row,
                      stride_rejected_bin, target_chosen_ptr, stride_target_chosen, stride_target_chosen_bin,
                      sigma_chosen_ptr, stride_sigma_chosen, target_rejected_ptr, stride_target_rejected,
                      stride_target_rejected_bin, sigma_rejected_ptr, stride_sigma_rejected, centers_ptr,
                      stride_centers, grad_chosen_ptr, grad_rejected_ptr, loss_ptr, n_rows, n_bins,
                      label_scale_chosen, label_scale_rejected, score_weight, inv_n_rows, inv_temperature,
                      DPL: tl.constexpr, WITH_KL: tl.constexpr, WITH_GRAD: tl.constexpr,
                      GIVEN_CHOSEN: tl.constexpr, GIVEN_REJECTED: tl.constexpr, ROW_SIGMA_CHOSEN: tl.constexpr,
                      ROW_SIGMA_REJECTED: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """This program's share of the mean docs/math.md §3 pair loss (its BLOCK_N pairs' sum / N) atomically added to
    ``*loss_ptr`` (zeroed by the caller; one program on the CPU interpreter's tiles up to 2^20 / BLOCK_K rows, so
    the sum is deterministic there, in arrival order on a GPU); with WITH_GRAD, the mean's gradients w.r.t. both rows into the contiguous [N, K] grads.
    The Bradley-Terry margin is E_c - E_r times ``inv_temperature`` (unused by DPL). Each side's labels take
    their own form (:func:`_labels`: GIVEN_* for a target [N, K], ROW_SIGMA_* for widths [N])."""
    rows, row_mask, bins, bin_mask, centers = _program_tile(centers_ptr, stride_centers, n_rows, n_bins, ACC,
                                                            BLOCK_N, BLOCK_K)
    log_pc, pc = _log_softmax(_load_logits(chosen_ptr, rows, row_mask, stride_chosen_row, stride_chosen_bin,
                                           bins, bin_mask, ACC))
    log_pr, pr = _log_softmax(_load_logits(rejected_ptr, rows, row_mask, stride_rejected_row, stride_rejected_bin,
                                           bins, bin_mask, ACC))
    if DPL:
        log_prob, grad_log_pc, grad_log_pr = _dpl_log_prob(log_pc, log_pr, BLOCK_K)
        loss = -log_prob
        grad_chosen = pc - grad_log_pc
        grad_rejected = pr - grad_log_pr
    else:
        mean_c, _, deviation_c = _moments(pc, centers)
        mean_r, _, deviation_r = _moments(pr, centers)
        margin = (mean_r - mean_c) * inv_temperature
        loss = tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin)))  # softplus = -log sigmoid(-margin)
        slope = (tl.sigmoid(margin) * inv_temperature)[:, None]
        grad_chosen = -slope * pc * deviation_c
        grad_rejected = slope * pr * deviation_r
    if WITH_KL:
        log_qc, qc = _labels(target_chosen_ptr, stride_target_chosen, stride_target_chosen_bin, sigma_chosen_ptr,
                             stride_sigma_chosen, label_scale_chosen, rows, row_mask, bins, bin_mask, centers, ACC,
                             GIVEN_CHOSEN, ROW_SIGMA_CHOSEN)
        log_qr, qr = _labels(target_rejected_ptr, stride_target_rejected, stride_target_rejected_bin,
                             sigma_rejected_ptr, stride_sigma_rejected, label_scale_rejected, rows, row_mask, bins,
                             bin_mask, centers, ACC, GIVEN_REJECTED, ROW_SIGMA_REJECTED)
        half_weight = 0.5 * score_weight
        loss += half_weight * (_kl(log_qc, qc, log_pc) + _kl(log_qr, qr, log_pr))
        grad_chosen += half_weight * _kl_gradient(pc, qc, GIVEN_CHOSEN)
        grad_rejected += half_weight * _kl_gradient(pr, qr, GIVEN_REJECTED)
    tl.atomic_add(loss_ptr, tl.sum(tl.where(row_mask, loss, 0.0), axis=0) * inv_n_rows)
    if WITH_GRAD:
        offsets = rows[:, None] * n_bins + bins[None, :]
        mask = row_mask[:, None] & bin_mask[None, :]
        _store_gradient(grad_chosen_ptr + offsets, inv_n_rows * grad_chosen, mask)
        _store_gradient(grad_rejected_ptr + offsets, inv_n_rows * grad_rejected, mask)


@triton.jit
def _scale_pair_gradients_kernel(grad_chosen_ptr, grad_rejected_ptr, grad_output_ptr, out_chosen_ptr,
                                 out_rejected_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out = grad * grad_output for both rows' saved [N, K] gradients: the pair loss's backward in one launch."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    scale = tl.load(grad_output_ptr).to(ACC)
    grad_chosen = tl.load(grad_chosen_ptr + offsets, mask=mask).to(ACC)
    grad_rejected = tl.load(grad_rejected_ptr + offsets, mask=mask).to(ACC)
    _store_gradient(out_chosen_ptr + offsets, grad_chosen * scale, mask)
    _store_gradient(out_rejected_ptr + offsets, grad_rejected * scale, mask)


def _launch_settings(logits: torch.Tensor, tile_per_row: int):
    """(BLOCK_N, num_warps, grid): as many rows of ``tile_per_row`` register elements as the tile budget holds."""
    n_rows = logits.shape[0]
    budget = INTERPRETER_TILE_ELEMENTS if logits.device.type == "cpu" else GPU_TILE_ELEMENTS
    block_n = max(1, min(triton.next_power_of_2(n_rows), budget // tile_per_row))
    num_warps = min(8, max(1, block_n * tile_per_row // (32 * ELEMENTS_PER_THREAD)))
    return block_n, triton.next_power_of_2(num_warps), (triton.cdiv(n_rows, block_n),)


def _label_scale(sigma: float) -> float:
    """The factor -1 / (2 sigma^2) of the squared distances in the Gaussian labels' log-density."""
    return -0.5 / (float(sigma) * float(sigma))


def _label_args(target, sigma):
    """One side's label arguments of the kernels, (target, its row stride, its bin stride, sigma tensor, its stride,
    label_scale), and the switches (GIVEN_LABELS, ROW_SIGMA): a target [N, K] is q itself (sigma unused), a float
    sigma goes in as the scalar label_scale, a tensor sigma [N] is read per row. ``target`` None: no labels."""
    given = target is not None and target.dim() == 2
    row_sigma = target is not None and not given and isinstance(sigma, torch.Tensor)
    scale = _label_scale(sigma) if target is not None and not given and not row_sigma else 1.0
    args = (target, _stride(target), _stride(target, 1) if given else 0, sigma if row_sigma else None,
            _stride(sigma) if row_sigma else 0, scale)
    return args, given, row_sigma


def _check_launchable(logits: torch.Tensor) -> int:
    """Raise ValueError unless the kernels can run on ``logits`` [N, K]; returns BLOCK_K."""
    n_bins = logits.shape[-1]
    if not 2 <= n_bins <= TRITON_MAX_BINS:
        raise ValueError(f"logits has {n_bins} bins; backend='triton' supports 2 to {TRITON_MAX_BINS} "
                         "(use backend='eager')")
    if logits.device.type != "cuda" and not isinstance(_pair_loss_kernel, InterpretedFunction):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got logits on {logits.device}")
    return triton.next_power_of_2(n_bins)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits (gradcheck), float32 for every other dtype."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _acc_dtype(logits: torch.Tensor):
    return tl.float64 if logits.dtype == torch.float64 else tl.float32


def _stride(x, dim=0):
    """Stride of an optional tensor argument (0 for None, whose pointer the kernel never reads)."""
    return 0 if x is None else x.stride(dim)


def _new_row_stat(logits):
    """An uninitialised [N] output in the compute dtype (float32, float64 for float64 logits)."""
    return torch.empty(logits.shape[0], dtype=_compute_dtype(logits), device=logits.device)


def _row_forward(logits, centers, target=None, sigma=1.0, flag=None):
    """(mean, std, None) [N] when ``target`` is None, else (None, None, KL [N]) for the labels of ``target``
    [N] or [N, K] and ``sigma`` (a float or a tensor [N]); float32 (float64). ``flag`` (a zeroed int32 tensor
    [] or None) is set to 1 when a result is not finite."""
    block_k = _check_launchable(logits)
    with_kl = target is not None
    if with_kl:
        mean, std, kl = None, None, _new_row_stat(logits)
    else:
        mean, std, kl = _new_row_stat(logits), _new_row_stat(logits), None
    if logits.shape[0]:
        block_n, num_warps, grid = _launch_settings(logits, block_k)
        (target, stride_target, stride_target_bin, row_sigma, stride_sigma, label_scale), given, per_row = \
            _label_args(target, sigma)
        _row_forward_kernel[grid](
            logits, logits.stride(0), logits.stride(1), target, stride_target, stride_target_bin, row_sigma,
            stride_sigma, centers, centers.stride(0), mean, std, kl, flag, logits.shape[0], logits.shape[1],
            label_scale, WITH_MOMENTS=not with_kl, WITH_KL=with_kl, GIVEN_LABELS=given, ROW_SIGMA=per_row,
            WITH_FLAG=flag is not None, ACC=_acc_dtype(logits), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps)
    return mean, std, kl


def _row_backward(logits, centers, grad_mean=None, grad_std=None, target=None, sigma=1.0, grad_kl=None):
    """d/d(logits) [N, K] in the logits' dtype, from the gradients of mean and/or std (None: that output was
    unused) or of KL [N]."""
    block_k = _check_launchable(logits)
    with_kl = grad_kl is not None
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.shape[0]:
        block_n, num_warps, grid = _launch_settings(logits, block_k)
        (target, stride_target, stride_target_bin, row_sigma, stride_sigma, label_scale), given, per_row = \
            _label_args(target, sigma)
        _row_backward_kernel[grid](
            logits, logits.stride(0), logits.stride(1), target, stride_target, stride_target_bin, row_sigma,
            stride_sigma, centers, centers.stride(0), grad_mean, _stride(grad_mean), grad_std, _stride(grad_std),
            grad_kl, _stride(grad_kl), grad_logits, logits.shape[0], logits.shape[1], label_scale,
            WITH_MOMENTS=not with_kl, WITH_GRAD_MEAN=grad_mean is not None, WITH_GRAD_STD=grad_std is not None,
            WITH_KL=with_kl, GIVEN_LABELS=given, ROW_SIGMA=per_row, ACC=_acc_dtype(logits), BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=num_warps)
    return grad_logits


class DistMomentsFunction(torch.autograd.Function):
    """(mean, std) [N] of softmax(logits [N, K]) over the centers; backward recomputes the softmax. An unused
    output gets no gradient tensor (no zeros are materialised for it)."""

    @staticmethod
    def forward(ctx, logits, centers, flag):
        mean, std, _ = _row_forward(logits, centers, flag=flag)
        ctx.save_for_backward(logits, centers)
        ctx.set_materialize_grads(False)
        return mean, std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_std):
        if grad_mean is None and grad_std is None:
            return None, None, None
        logits, centers = ctx.saved_tensors
        return _row_backward(logits, centers, grad_mean=grad_mean, grad_std=grad_std), None, None


class GaussianKLFunction(torch.autograd.Function):
    """KL(q || softmax(logits)) [N] for the labels q of ``target`` [N] (Gaussian, width ``sigma``: a float or a
    tensor [N]) or ``target`` [N, K] (q itself); backward is grad * (p - q) (p * sum(q) - q for a given q)."""

    @staticmethod
    def forward(ctx, logits, target, sigma, centers, flag):
        _, _, kl = _row_forward(logits, centers, target, sigma, flag)
        row_sigma = isinstance(sigma, torch.Tensor)
        ctx.save_for_backward(logits, target, centers, *((sigma,) if row_sigma else ()))
        ctx.sigma = None if row_sigma else sigma
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        logits, target, centers, *row_sigma = ctx.saved_tensors
        sigma = row_sigma[0] if row_sigma else ctx.sigma
        return _row_backward(logits, centers, target=target, sigma=sigma, grad_kl=grad_kl), None, None, None, None


def _scale_pair_gradients(grad_chosen, grad_rejected, grad_output):
    """(grad_chosen * grad_output, grad_rejected * grad_output), new tensors, in one launch (no host read of
    grad_output: the saved gradients stay as they are, so a second backward through a retained graph is right)."""
    outs = (torch.empty_like(grad_chosen), torch.empty_like(grad_rejected))
    numel = grad_chosen.numel()
    if numel:
        acc = tl.float64 if grad_output.dtype == torch.float64 else tl.float32
        _scale_pair_gradients_kernel[(triton.cdiv(numel, SCALE_BLOCK),)](
            grad_chosen, grad_rejected, grad_output, *outs, numel, ACC=acc, BLOCK=SCALE_BLOCK)
    return outs


class PairLossFunction(torch.autograd.Function):
    """Mean docs/math.md §3 pair loss; the forward kernel writes the gradients, backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, logits_chosen, logits_rejected, target_chosen, target_rejected, kind, sigma, score_weight,
                centers, with_grad, temperature):
        block_k = _check_launchable(logits_chosen)
        n_rows, n_bins = logits_chosen.shape
        dpl, with_kl = not kind.margin, kind.reads_targets and score_weight != 0
        block_n, num_warps, grid = _launch_settings(logits_chosen, block_k * block_k if dpl else block_k)
        wider = logits_rejected if logits_rejected.dtype == torch.float64 else logits_chosen  # float64 if either is
        loss = torch.zeros((), dtype=_compute_dtype(wider), device=logits_chosen.device)
        grads = [torch.empty(z.shape, dtype=z.dtype, device=z.device) if with_grad else None
                 for z in (logits_chosen, logits_rejected)]
        if not with_kl:
            target_chosen = target_rejected = None
        sigma_chosen, sigma_rejected = sigma if isinstance(sigma, tuple) else (sigma, sigma)
        chosen_labels, given_chosen, row_sigma_chosen = _label_args(target_chosen, sigma_chosen)
        rejected_labels, given_rejected, row_sigma_rejected = _label_args(target_rejected, sigma_rejected)
        _pair_loss_kernel[grid](
            logits_chosen, logits_chosen.stride(0), logits_chosen.stride(1),
            logits_rejected, logits_rejected.stride(0), logits_rejected.stride(1),
            *chosen_labels[:5], *rejected_labels[:5], centers, centers.stride(0), grads[0], grads[1], loss,
            n_rows, n_bins, chosen_labels[5], rejected_labels[5], float(score_weight), 1.0 / n_rows,
            1.0 / float(temperature), DPL=dpl, WITH_KL=with_kl, WITH_GRAD=with_grad, GIVEN_CHOSEN=given_chosen,
            GIVEN_REJECTED=given_rejected, ROW_SIGMA_CHOSEN=row_sigma_chosen, ROW_SIGMA_REJECTED=row_sigma_rejected,
            ACC=_acc_dtype(wider), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
        if with_grad:
            ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if not ctx.saved_tensors:  # neither logits required a gradient (only centers or targets did: they get none)
            return (None,) * 10
        return (*_scale_pair_gradients(*ctx.saved_tensors, grad_output), None, None, None, None, None, None, None,
                None)


def triton_dist_moments(logits: torch.Tensor, centers: torch.Tensor, flag=None):
    """logits [N, K] (fp32/bf16/fp16/fp64, 2 <= K <= 64), centers [K] -> (mean [N], std [N]) fp32 (fp64);
    ``flag`` (a zeroed int32 tensor [] or None) set to 1 when a result is not finite."""
    return DistMomentsFunction.apply(logits, centers, flag)


def triton_gaussian_kl(logits: torch.Tensor, target: torch.Tensor, sigma, centers: torch.Tensor, flag=None):
    """logits [N, K] -> KL(q || softmax(logits)) [N] fp32 (fp64): q = Gaussian(target, sigma) for a target [N] in
    [0, 1] and sigma a float or a tensor [N] of per-row widths, or q = ``target`` itself [N, K] (sigma unused);
    ``flag`` as in :func:`triton_dist_moments`."""
    return GaussianKLFunction.apply(logits, target, sigma, centers, flag)


def triton_pair_loss(logits_chosen, logits_rejected, target_chosen, target_rejected, kind, sigma, score_weight,
                     centers, temperature=1.0):
    """Mean over N pairs of the docs/math.md §3 loss ``kind``, a row of distreward/ops/loss_kinds.py's table
    (``kind.margin``: Bradley-Terry on the means, else the distributional preference (dpl); ``kind.reads_targets``:
    plus the KL to the labels): logits [N, K] each, targets [N] or [N, K] each (None when not read), ``sigma`` a
    float or tensor [N] for both sides or a tuple (sigma_chosen, sigma_rejected) of those -> scalar fp32 (fp64),
    NaN when a pair's inputs are bad (its own flag); ``temperature`` divides the Bradley-Terry margin (unused
    without one). Inputs, the kind and its temperature are validated by ``ops.pair_loss``."""
    with_grad = torch.is_grad_enabled() and (logits_chosen.requires_grad or logits_rejected.requires_grad)
    return PairLossFunction.apply(logits_chosen, logits_rejected, target_chosen, target_rejected, kind, sigma,
                                  score_weight, centers, with_grad, temperature)
