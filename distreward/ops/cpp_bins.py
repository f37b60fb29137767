"""``backend="cpp"`` of the bin ops: the fused OpenMP kernels of csrc/bin_ops.cpp, registered with PyTorch's
dispatcher as ``torch.ops.distreward.bin_moments_forward`` / ``bin_gaussian_kl_forward`` /
``bin_pair_loss_forward`` and their ``_backward`` ops. As :mod:`distreward.ops.cpp` does for the gather, this
module adds their fake (meta) implementations for ``torch.compile`` and registers each forward op's backward
formula. Import it only when the C++ backend is used: it raises ImportError where the extension did not build.

The functions below take the reference's arguments (distreward/ops/reference.py) plus ``validate``: the
kernel then raises, as it writes a non-finite result, and this module turns that into
:class:`~distreward.ops.validation.BadValues` for the public op to name the bad input.
"""
import torch

from distreward import _C  # noqa: F401  (loading the library registers the ops)
from distreward.ops import loss_kinds
from distreward.ops import validation as check
from distreward.ops.reference import compute_dtype, label_sides

_ops = torch.ops.distreward
BAD_VALUES = "non-finite result"  # what the kernels' ValueError says (csrc/bin_ops.cpp, kBadValues)


def _rows(logits, dtype=None):
    return logits.new_empty(logits.shape[:1], dtype=dtype or compute_dtype(logits))


@torch.library.register_fake("distreward::bin_moments_forward")
def _moments_fake(logits, centers, validate):
    return _rows(logits), _rows(logits)


@torch.library.register_fake("distreward::bin_moments_backward")
def _moments_backward_fake(grad_mean, grad_std, logits, centers):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("distreward::bin_gaussian_kl_forward")
def _kl_fake(logits, target, row_sigma, sigma, centers, validate):
    return _rows(logits)


@torch.library.register_fake("distreward::bin_gaussian_kl_backward")
def _kl_backward_fake(grad_kl, logits, target, row_sigma, sigma, centers):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("distreward::bin_pair_loss_forward")
def _pair_fake(logits_chosen, logits_rejected, target_chosen, target_rejected, sigma_chosen, sigma_rejected,
               scalar_sigma_chosen, scalar_sigma_rejected, centers, kind, score_weight, temperature, with_grad,
               validate):
    dtype = compute_dtype(logits_chosen)
    grad_shape = (logits_chosen.shape[0] if with_grad else 0, logits_chosen.shape[1])
    return (logits_chosen.new_empty((), dtype=dtype), logits_chosen.new_empty(grad_shape, dtype=dtype),
            logits_chosen.new_empty(grad_shape, dtype=dtype))


@torch.library.register_fake("distreward::bin_pair_loss_backward")
def _pair_backward_fake(grad_loss, grad_chosen, grad_rejected, dtype):
    return grad_chosen.new_empty(grad_chosen.shape, dtype=dtype), grad_rejected.new_empty(grad_rejected.shape,
                                                                                          dtype=dtype)


def _moments_setup(ctx, inputs, output):
    logits, centers, _ = inputs
    ctx.save_for_backward(logits, centers)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros [N])


def _moments_backward(ctx, grad_mean, grad_std):
    if grad_mean is None and grad_std is None:
        return None, None, None
    logits, centers = ctx.saved_tensors
    return _ops.bin_moments_backward(grad_mean, grad_std, logits, centers), None, None


def _kl_setup(ctx, inputs, output):
    logits, target, row_sigma, sigma, centers, _ = inputs
    ctx.save_for_backward(logits, target, row_sigma, centers)
    ctx.sigma = sigma


def _kl_backward(ctx, grad_kl):
    logits, target, row_sigma, centers = ctx.saved_tensors
    return (_ops.bin_gaussian_kl_backward(grad_kl, logits, target, row_sigma, ctx.sigma, centers),
            None, None, None, None, None)


def _pair_setup(ctx, inputs, output):
    _, grad_chosen, grad_rejected = output
    ctx.save_for_backward(grad_chosen, grad_rejected)
    ctx.dtype = inputs[0].dtype
    ctx.mark_non_differentiable(grad_chosen, grad_rejected)
    ctx.set_materialize_grads(False)


def _pair_backward(ctx, grad_loss, _grad_chosen, _grad_rejected):
    grad_chosen, grad_rejected = ctx.saved_tensors
    if grad_loss is None or not grad_chosen.shape[0]:  # no gradient asked for in the forward
        return (None,) * 14
    return (*_ops.bin_pair_loss_backward(grad_loss, grad_chosen, grad_rejected, ctx.dtype),) + (None,) * 12


torch.library.register_autograd("distreward::bin_moments_forward", _moments_backward, setup_context=_moments_setup)
torch.library.register_autograd("distreward::bin_gaussian_kl_forward", _kl_backward, setup_context=_kl_setup)
torch.library.register_autograd("distreward::bin_pair_loss_forward", _pair_backward, setup_context=_pair_setup)


def _checked(op: str, kernel, *args):
    """``kernel(*args)``; its bad-value ValueError as check.BadValues (the public op then names the input)."""
    try:
        return kernel(*args)
    except ValueError as error:
        if BAD_VALUES in str(error):
            raise check.BadValues(op) from error
        raise


def _sigma_args(sigma):
    """A width (number or tensor [N]) as the kernels' (row_sigma or None, scalar sigma)."""
    return (sigma, 1.0) if isinstance(sigma, torch.Tensor) else (None, float(sigma))


def dist_moments(logits: torch.Tensor, centers: torch.Tensor, validate: bool = False):
    """logits [N, K] CPU (fp32/bf16/fp16/fp64, any strides), centers [K] -> (mean [N], std [N]) fp32 (fp64 for
    fp64 logits); differentiable in the logits."""
    return _checked("dist_moments", _ops.bin_moments_forward, logits, centers, validate)


def gaussian_kl(logits: torch.Tensor, target: torch.Tensor, sigma, centers: torch.Tensor, validate: bool = False):
    """logits [N, K] -> KL(q || softmax(logits)) [N] fp32 (fp64) for the labels of ``target`` [N] (width ``sigma``: a
    number or a tensor [N]) or ``target`` [N, K] (q itself); differentiable in the logits."""
    return _checked("gaussian_kl", _ops.bin_gaussian_kl_forward, logits, target, *_sigma_args(sigma), centers,
                    validate)


def pair_loss(logits_chosen, logits_rejected, target_chosen, target_rejected, kind="bt_kl", sigma=0.1,
              score_weight=1.0, centers=None, temperature=1.0, validate: bool = False) -> torch.Tensor:
    """Mean docs/math.md §3 loss ``kind`` over N pairs of logits [N, K] -> scalar fp32 (fp64), as
    reference.pair_loss; the forward kernel also writes the gradient when one is needed, the backward scales it."""
    if logits_chosen.dtype != logits_rejected.dtype:  # the kernel takes one dtype: the wider compute dtype
        dtype = torch.promote_types(compute_dtype(logits_chosen), compute_dtype(logits_rejected))
        logits_chosen, logits_rejected = logits_chosen.to(dtype), logits_rejected.to(dtype)
    scored = loss_kinds.row(kind, loss_kinds.LOSS_KINDS).reads_targets and score_weight != 0
    (row_c, sigma_c), (row_r, sigma_r) = (_sigma_args(side) for side in label_sides(sigma))
    with_grad = torch.is_grad_enabled() and (logits_chosen.requires_grad or logits_rejected.requires_grad)
    loss, _, _ = _checked("pair_loss", _ops.bin_pair_loss_forward, logits_chosen, logits_rejected,
                          target_chosen if scored else None, target_rejected if scored else None, row_c, row_r,
                          sigma_c, sigma_r, centers, kind, float(score_weight), float(temperature), with_grad,
                          validate)
    return loss
