"""``backend="cpp"`` of the log-prob gather: the C++ kernels of csrc/logprobs.cpp, registered with
PyTorch's dispatcher as ``torch.ops.distreward.gather_logprobs_forward`` / ``gather_logprobs_backward`` /
``gather_logprobs_backward_`` (in place). Importing ``distreward._C`` registers them; this module adds
their fake (meta) implementations for ``torch.compile`` and the forward op's backward formula, as
pytorch/extension-cpp does. Import it only when the C++ backend is used: it raises ImportError where
the extension did not build. The kernels check their own inputs (ValueError / IndexError), ids and NaN
/ inf included, so errors come back through torch's own error translation.
"""
import torch

from distreward import _C  # noqa: F401  (loading the library registers the ops)
from distreward.ops import validation as check
from distreward.ops.reference import compute_dtype

_ops = torch.ops.distreward


@torch.library.register_fake("distreward::gather_logprobs_forward")
def _forward_fake(logits, ids, mask):
    check.check_gather_kernel_inputs(logits, ids, mask)
    logp = logits.new_empty(ids.shape, dtype=compute_dtype(logits))
    return logp, torch.empty_like(logp)


@torch.library.register_fake("distreward::gather_logprobs_backward")
def _backward_fake(grad_logp, logits, ids, mask, lse):
    check.check_gather_kernel_inputs(logits, ids, mask, grad_logp, lse)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("distreward::gather_logprobs_backward_")
def _backward_in_place_fake(grad_logp, logits, ids, mask, lse):
    check.check_gather_kernel_inputs(logits, ids, mask, grad_logp, lse)


def _setup_context(ctx, inputs, output):
    logits, ids, mask = inputs
    ctx.save_for_backward(logits, ids, mask, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # lse's gradient stays None instead of a zero [B, T] tensor


def _backward(ctx, grad_logp, _grad_lse):
    if grad_logp is None:
        return None, None, None
    logits, ids, mask, lse = ctx.saved_tensors
    return _ops.gather_logprobs_backward(grad_logp, logits, ids, mask, lse), None, None


torch.library.register_autograd("distreward::gather_logprobs_forward", _backward, setup_context=_setup_context)


def gather_logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, mask):
    """logits [B, T, V] CPU (fp32/bf16/fp16/fp64, any strides), ids [B, T] int64, mask [B, T] bool or None (every
    row live) -> (logp, lse) [B, T] fp32 (fp64 for fp64 logits), 0 where mask is False; differentiable in logp.
    Raises IndexError / ValueError for a live id outside [0, V) or a live row without a finite logsumexp."""
    return _ops.gather_logprobs_forward(logits, ids, mask)


def gather_logprobs_backward(grad_logp, logits, ids, mask, lse, in_place: bool = False) -> torch.Tensor:
    """grad_logp [B, T] -> grad_logits [B, T, V] = grad_logp * (onehot(ids) - softmax(logits)), 0 on masked
    rows (mask None: none), contiguous in the logits' dtype; written over the (contiguous) logits themselves when ``in_place``."""
    if not in_place:
        return _ops.gather_logprobs_backward(grad_logp, logits, ids, mask, lse)
    _ops.gather_logprobs_backward_(grad_logp, logits, ids, mask, lse)
    return logits
