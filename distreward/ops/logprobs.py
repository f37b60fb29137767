"""``backend="cpp"`` of :func:`distreward.ops.gather_logprobs`: the fused C++ gather (``csrc/logprobs.cpp``)
as an autograd Function. Neither direction materialises a ``[B, T, V]`` tensor besides the gradient itself."""
import torch

from distreward import _C


class CppGatherLogprobs(torch.autograd.Function):
    """logits [B, T, V] (CPU, any strides), ids [B, T] int64, mask [B, T] bool -> log-probs [B, T] fp32
    (fp64 for fp64 logits). Saves the per-row logsumexp [B, T] so the backward is a single pass."""

    @staticmethod
    def forward(ctx, logits, ids, mask):
        logp, lse = _C.gather_logprobs_forward(logits, ids, mask)
        ctx.save_for_backward(logits, ids, mask, lse)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        logits, ids, mask, lse = ctx.saved_tensors
        return _C.gather_logprobs_backward(grad_logp, logits, ids, mask, lse), None, None


def cpp_gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask=None) -> torch.Tensor:
    """Validated inputs (``mask`` bool [B, T] or None) -> log-probs [B, T] via the C++ extension."""
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return CppGatherLogprobs.apply(logits, ids.long(), mask)
