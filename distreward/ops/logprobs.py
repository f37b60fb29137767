"""The autograd Function of the fused log-prob gathers, and ``backend="cpp"`` of
:func:`distreward.ops.gather_logprobs` (the C++ kernels of ``csrc/logprobs.cpp``).

A fused backend is a pair of kernels with one contract, ``gather_logprobs_forward(logits, ids, mask)
-> (logp, lse)`` and ``gather_logprobs_backward(grad_logp, logits, ids, mask, lse, out=None) -> grad``:
``distreward._C`` on CPU, ``distreward.kernels.logprobs`` (Triton) on CUDA. Neither direction
materialises a ``[B, T, V]`` tensor besides the gradient itself.
"""
import torch

from distreward import _C


class FusedGatherLogprobs(torch.autograd.Function):
    """logits [B, T, V] (any strides), ids [B, T] int64, mask [B, T] bool, kernels (forward, backward)
    -> log-probs [B, T] fp32 (fp64 for fp64 logits). Saves the per-row logsumexp [B, T], so the backward
    is a single pass over the logits."""

    @staticmethod
    def forward(ctx, logits, ids, mask, kernels):
        forward_kernel, _ = kernels
        logp, lse = forward_kernel(logits, ids, mask)
        ctx.save_for_backward(logits, ids, mask, lse)
        ctx.kernels = kernels
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        logits, ids, mask, lse = ctx.saved_tensors
        _, backward_kernel = ctx.kernels
        return backward_kernel(grad_logp, logits, ids, mask, lse), None, None, None


def fused_gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask, kernels) -> torch.Tensor:
    """Validated inputs (``mask`` bool [B, T] or None) -> log-probs [B, T] through the ``kernels`` pair."""
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return FusedGatherLogprobs.apply(logits, ids.long(), mask, kernels)


def cpp_gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask=None) -> torch.Tensor:
    """Validated CPU inputs -> log-probs [B, T] via the C++ extension."""
    return fused_gather_logprobs(logits, ids, mask, (_C.gather_logprobs_forward, _C.gather_logprobs_backward))
