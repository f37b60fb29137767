"""Fused Triton rollout log-prob gather (docs/math.md §4), the CUDA path of ``ops.gather_logprobs``.

One program per row of ``[B, T, V]`` logits (any strides). The forward streams the row in
``BLOCK_V`` chunks with an online max / sum-exp, so each logit is read once, and writes
``logp = L[y] - logsumexp(L)`` and the row's logsumexp ``[B, T]``; the backward streams the row
once more and writes ``grad * (onehot(y) - softmax(L))`` in the logits' dtype. Masked rows read
nothing and get 0; without a mask (``HAS_MASK`` off) every row is live. On request the forward sets
a flag when a live row's id lies outside the vocabulary or its logsumexp is not finite (NaN or +inf
logits, or none finite): the value check costs no pass of its own. Math is float32 (float64 for float64 logits) whatever the input dtype. The
launchers have the C++ kernels' contract and know nothing of ``distreward.ops`` (whose input checks come
first); :func:`gather_logprobs` is the differentiable op (``FusedGatherLogprobs``).
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Logits one program holds per step: 4096 keeps a GPU's registers; the CPU interpreter costs ~1 ms a
# step, so it takes the whole row (up to 2^16) at once.
GPU_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 1 << 16


@triton.jit
def _row_start(row, steps, stride_b, stride_t):
    """Offset of row ``row`` (= b * T + t) of the logits."""
    return (row // steps).to(tl.int64) * stride_b + (row % steps).to(tl.int64) * stride_t


@triton.jit
def _is_live(mask_ptr, row, HAS_MASK: tl.constexpr):
    """Whether row ``row`` is scored: its mask entry, or every row without a mask."""
    if HAS_MASK:
        live = tl.load(mask_ptr + row) != 0
    else:
        live = row >= 0
    return live


@triton.jit
def _forward_kernel(logits_ptr, stride_b, stride_t, stride_v, ids_ptr, mask_ptr, logp_ptr, lse_ptr, flag_ptr, steps,
                    VOCAB: tl.constexpr, HAS_MASK: tl.constexpr, WITH_FLAG: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    live = _is_live(mask_ptr, row, HAS_MASK)
    row_ptr = logits_ptr + _row_start(row, steps, stride_b, stride_t)
    running_max = tl.full((), float("-inf"), ACC)
    total = tl.zeros((), ACC)
    for start in range(0, VOCAB, BLOCK_V):  # a constexpr bound: triton 3.6's interpreter takes no runtime one
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=(cols < VOCAB) & live, other=float("-inf")).to(ACC)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row of -inf so far adds 0, not NaN
        total = total * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    lse = running_max + tl.log(tl.where(live, total, 1.0))
    token = tl.load(ids_ptr + row)
    in_vocab = live & (token >= 0) & (token < VOCAB)  # ids are validated by the caller; never read outside
    picked = tl.load(row_ptr + token * stride_v, mask=in_vocab, other=float("nan")).to(ACC)
    tl.store(logp_ptr + row, tl.where(live, picked - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(live, lse, 0.0))
    if WITH_FLAG:
        bad = live & ~(in_vocab & (tl.abs(lse) < float("inf")))
        tl.atomic_max(flag_ptr, bad.to(tl.int32))


@triton.jit
def _backward_kernel(logits_ptr, stride_b, stride_t, stride_v, ids_ptr, mask_ptr, lse_ptr, grad_logp_ptr,
                     stride_grad, grad_ptr, steps, VOCAB: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    live = _is_live(mask_ptr, row, HAS_MASK)
    row_ptr = logits_ptr + _row_start(row, steps, stride_b, stride_t)
    grad_row_ptr = grad_ptr + row.to(tl.int64) * VOCAB
    token = tl.load(ids_ptr + row)
    lse = tl.load(lse_ptr + row).to(ACC)
    g = tl.load(grad_logp_ptr + row * stride_grad).to(ACC)
    for start in range(0, VOCAB, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < VOCAB
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_row & live, other=float("-inf")).to(ACC)
        grad = g * (tl.where(cols == token, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(grad_row_ptr + cols, tl.where(live, grad, 0.0).to(grad_ptr.dtype.element_ty), mask=in_row)


def check_device(device: torch.device) -> None:
    """ValueError unless the kernels run on ``device``: CUDA, or any device under TRITON_INTERPRET=1."""
    if device.type != "cuda" and not isinstance(_forward_kernel, InterpretedFunction):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")


def _launch_settings(logits: torch.Tensor):
    """(ACC, BLOCK_V, num_warps) for ``logits`` [B, T, V]; raise ValueError where no kernel can run."""
    check_device(logits.device)
    limit = GPU_BLOCK_V if logits.device.type == "cuda" else INTERPRETER_BLOCK_V
    block_v = min(triton.next_power_of_2(logits.shape[-1]), limit)
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    return acc, block_v, 8 if block_v >= 2048 else 4


def _contiguous(mask):
    return None if mask is None else mask.contiguous()


def gather_logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, mask, flag=None):
    """logits [B, T, V] (any strides), ids [B, T] int64, mask [B, T] bool or None (every row live) -> (logp, lse)
    [B, T] fp32 (fp64), both 0 where mask is False. The same contract as the C++
    ``torch.ops.distreward.gather_logprobs_forward``; ``flag`` (a zeroed int32 tensor [] or None) is set to 1
    when a live row's id is outside [0, V) or its logsumexp is not finite (the C++ kernel raises instead)."""
    acc, block_v, num_warps = _launch_settings(logits)
    ids = ids.contiguous()
    logp = torch.empty(ids.shape, dtype=torch.float64 if acc == tl.float64 else torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    if logp.numel():
        _forward_kernel[(logp.numel(),)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), ids, _contiguous(mask), logp, lse, flag,
            logits.shape[1], VOCAB=logits.shape[2], HAS_MASK=mask is not None, WITH_FLAG=flag is not None, ACC=acc,
            BLOCK_V=block_v, num_warps=num_warps)
    return logp, lse


def gather_logprobs_backward(grad_logp, logits, ids, mask, lse, in_place: bool = False) -> torch.Tensor:
    """grad_logp [B, T] -> grad_logits [B, T, V] = grad_logp * (onehot(ids) - softmax(logits)), 0 on masked
    rows (mask None: none), contiguous in the logits' dtype; written over the (contiguous) logits themselves when
    ``in_place`` (each chunk is read before it is written)."""
    acc, block_v, num_warps = _launch_settings(logits)
    if in_place and not logits.is_contiguous():
        raise ValueError("in_place needs contiguous logits")
    out = logits if in_place else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_logp = grad_logp.reshape(-1)
    if lse.numel():
        _backward_kernel[(lse.numel(),)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), ids.contiguous(), _contiguous(mask), lse,
            grad_logp, grad_logp.stride(0), out, logits.shape[1], VOCAB=logits.shape[2], HAS_MASK=mask is not None,
            ACC=acc, BLOCK_V=block_v, num_warps=num_warps)
    return out


class FusedGatherLogprobs(torch.autograd.Function):
    """logits [B, T, V] (any strides), ids [B, T] int64, mask [B, T] bool or None, optionally a zeroed int32
    ``flag`` [] the forward kernel sets on a bad row -> (logp, lse) [B, T] fp32 (fp64 for fp64 logits), lse not
    differentiable (no zero gradient is made for it). Saves only the [B, T] logsumexp besides the inputs, so the
    backward is a single pass over the logits."""

    @staticmethod
    def forward(ctx, logits, ids, mask, flag=None):
        logp, lse = gather_logprobs_forward(logits, ids, mask, flag)
        ctx.save_for_backward(logits, ids, mask, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return logp, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_lse):
        if grad_logp is None:
            return None, None, None, None
        logits, ids, mask, lse = ctx.saved_tensors
        return gather_logprobs_backward(grad_logp, logits, ids, mask, lse), None, None, None


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask, flag=None):
    """Differentiable :func:`gather_logprobs_forward`: (logp, lse) [B, T], the gradient flowing to the logits."""
    return FusedGatherLogprobs.apply(logits, ids, mask, flag)
