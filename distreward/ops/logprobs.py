"""The rollout log-prob gather's backends and its one dispatch table, used by
:func:`distreward.ops.gather_logprobs` and :func:`distreward.sequence_logprobs` alike.

A fused backend is a pair of kernels with one contract, ``gather_logprobs_forward(logits, ids, mask)
-> (logp, lse)`` (mask None: every row live) and ``gather_logprobs_backward(grad_logp, logits, ids, mask, lse, in_place=False) ->
grad``: :mod:`distreward.ops.cpp` (the C++ extension, through PyTorch's dispatcher) on CPU,
:mod:`distreward.kernels.logprobs` (Triton) on CUDA. Each is imported on first use, so a missing C++
build leaves the Triton path (and eager) working, and the kernels import nothing from ``ops``.
Neither direction materialises a ``[B, T, V]`` tensor besides the gradient itself.
"""
import torch

from distreward.ops import reference
from distreward.ops import validation as check

# backend="auto": on the CPU the C++ kernel was faster than eager at every size measured, from 1x1x8
# (0.19 vs 0.25 ms forward+backward, call overhead) to 8x256x49152 (2-core AMD EPYC, loaded;
# benchmarks/test_bench_gather.py::test_auto_choice prints both). On CUDA Triton: through the public call
# 3.0x (fp32) and 8.1x (bf16) eager forward, 2.2x and 4.6x forward+backward at 8x1024x49152 (H100, docs/performance.md).
AUTO = {"cpu": "cpp", "cuda": "triton"}


def gather_kernels(backend: str):
    """The (forward, backward) kernel pair of the fused ``backend`` ("cpp" or "triton"), imported now."""
    if backend == "cpp":
        from distreward.ops import cpp as kernels
    else:
        from distreward.kernels import logprobs as kernels
    return kernels.gather_logprobs_forward, kernels.gather_logprobs_backward


_IMPORT_ERRORS = {}  # fused backend -> None or why its kernels did not import


def unavailable(backend: str):
    """None when the fused ``backend``'s kernels import, else why not (a failed build, no triton)."""
    if backend not in _IMPORT_ERRORS:
        try:
            gather_kernels(backend)
            _IMPORT_ERRORS[backend] = None
        except ImportError as error:
            _IMPORT_ERRORS[backend] = f"{type(error).__name__}: {error}"
    return _IMPORT_ERRORS[backend]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``backend`` ("auto", "eager", "triton" or "cpp") -> the one that runs on ``device``; ValueError when
    it is unknown, cannot run there, or did not build."""
    check.check_choice("backend", backend, ("auto",) + tuple(GATHER))
    if backend == "auto":
        fused = AUTO.get(device.type)
        return fused if fused and not unavailable(fused) else "eager"
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got {device}")
    if backend != "eager" and unavailable(backend):
        raise ValueError(f"backend={backend!r} is not available: {unavailable(backend)}")
    if backend == "triton":  # here, before any model forward: not from inside a checkpointed chunk
        from distreward.kernels import logprobs as kernels
        kernels.check_device(device)
    return backend


class FusedGatherLogprobs(torch.autograd.Function):
    """logits [B, T, V] (any strides), ids [B, T] int64, mask [B, T] bool or None, kernels (forward, backward),
    optionally a zeroed int32 ``flag`` [] the forward kernel sets on a bad row (Triton) -> (logp, lse) [B, T] fp32
    (fp64 for fp64 logits), lse not differentiable (no zero gradient is made for it). Saves only the [B, T]
    logsumexp besides the inputs, so the backward is a single pass over the logits."""

    @staticmethod
    def forward(ctx, logits, ids, mask, kernels, flag=None):
        forward_kernel, _ = kernels
        logp, lse = forward_kernel(logits, ids, mask, *(() if flag is None else (flag,)))
        ctx.save_for_backward(logits, ids, mask, lse)
        ctx.kernels = kernels
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return logp, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_lse):
        if grad_logp is None:
            return None, None, None, None, None
        logits, ids, mask, lse = ctx.saved_tensors
        _, backward_kernel = ctx.kernels
        return backward_kernel(grad_logp, logits, ids, mask, lse), None, None, None, None


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
    forward, _ = gather_kernels("cpp")
    return forward(logits, ids, mask)[0]  # the kernel checks ids and rows itself, in its own loop


def _triton(logits, ids, mask, validate):
    flag = torch.zeros((), dtype=torch.int32, device=logits.device) if validate else None
    logp, lse = FusedGatherLogprobs.apply(logits, ids, mask, gather_kernels("triton"), flag)
    if validate and bool(flag):  # only then are ids and rows scanned, for the position to name
        check.check_gather_values(ids, mask, lse, logits.shape[-1])
    return logp


# backend -> f(logits [B, T, V], ids [B, T] int64, mask [B, T] bool or None, validate) -> logp [B, T], inputs
# validated by check_gather_inputs; each raises ValueError / IndexError on bad values under validate (the C++
# kernel always: its check reads no device memory).
GATHER = {"eager": _eager, "triton": _triton, "cpp": _cpp}
