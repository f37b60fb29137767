"""``backend="cpp"`` of :func:`distreward.ops.gather_logprobs`: the fused C++ gather as an autograd Function."""
import torch

from distreward import _C


class CppGatherLogprobs(torch.autograd.Function):
    """logits [B, T, V], ids [B, T] int64, mask [B, T] bool -> log-probs [B, T] fp32."""

    @staticmethod
    def forward(ctx, logits, ids, mask):
        out = _C.gather_logprobs_forward(logits, ids, mask)
        ctx.save_for_backward(logits, ids, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, ids, mask = ctx.saved_tensors
        probs = torch.softmax(logits.float(), dim=-1)
        grad = -probs
        grad.scatter_add_(-1, ids.unsqueeze(-1), torch.ones_like(ids, dtype=grad.dtype).unsqueeze(-1))
        grad *= (grad_out * mask).unsqueeze(-1)
        return grad.to(logits.dtype), None, None


def cpp_gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask=None) -> torch.Tensor:
    """Validated inputs -> log-probs [B, T] fp32 via the C++ extension."""
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return CppGatherLogprobs.apply(logits, ids.long(), mask)
