"""The rollout log-prob gather's backends and its one dispatch table, used by
:func:`distreward.ops.gather_logprobs` and :func:`distreward.sequence_logprobs` alike (which entry runs is
the registry's choice, :mod:`distreward.ops.registry`).

A fused backend is a pair of kernels with one contract, ``gather_logprobs_forward(logits, ids, mask)
-> (logp, lse)`` (mask None: every row live) and ``gather_logprobs_backward(grad_logp, logits, ids, mask, lse, in_place=False) ->
grad``: :mod:`distreward.ops.cpp` (the C++ extension, through PyTorch's dispatcher) on CPU,
:mod:`distreward.kernels.logprobs` (Triton, with its autograd Function) on CUDA. Each is imported on first
use, so a missing C++ build leaves the Triton path (and eager) working, and the kernels import nothing from ``ops``.
Neither direction materialises a ``[B, T, V]`` tensor besides the gradient itself.
"""
import torch

from distreward.ops import reference, registry
from distreward.ops import validation as check


def _eager(logits, ids, mask, validate):
    # Out-of-range ids are clamped so nothing reads outside a row, then reported by check_gather_values
    # (validate) or made NaN.
    logp, lse = reference.gather_logprobs_and_lse(logits, ids.clamp(0, logits.shape[-1] - 1), mask)
    if validate:
        check.check_gather_values(ids, mask, lse, logits.shape[-1])
        return logp
    usable = (ids >= 0) & (ids < logits.shape[-1])  # a live bad id gives NaN, as in the Triton kernel
    return logp.where(usable if mask is None else usable | ~mask, torch.nan)


def _cpp(logits, ids, mask, validate):
    # the kernel checks ids and rows itself, in its own loop
    return registry.kernels("gather_logprobs", "cpp").gather_logprobs_forward(logits, ids, mask)[0]


def _triton(logits, ids, mask, validate):
    flag = torch.zeros((), dtype=torch.int32, device=logits.device) if validate else None
    logp, lse = registry.kernels("gather_logprobs", "triton").gather_logprobs(logits, ids, mask, flag)
    if validate and bool(flag):  # only then are ids and rows scanned, for the position to name
        check.check_gather_values(ids, mask, lse, logits.shape[-1])
    return logp


# backend -> f(logits [B, T, V], ids [B, T] int64, mask [B, T] bool or None, validate) -> logp [B, T], inputs
# validated by check_gather_inputs; each raises ValueError / IndexError on bad values under validate (the C++
# kernel always: its check reads no device memory).
GATHER = {"eager": _eager, "triton": _triton, "cpp": _cpp}
