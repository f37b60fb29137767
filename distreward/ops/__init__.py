"""Public ops of docs/math.md §6, each with ``backend="auto" | "eager" | "triton" | "cpp"``.

``eager`` is the plain-PyTorch reference (:mod:`distreward.ops.reference`). ``auto`` picks the
fused path for the tensor's device: the Triton kernels for CUDA tensors, the C++ extension for CPU
tensors (:mod:`distreward.ops.cpp_bins` for the bin ops; :mod:`distreward.ops.logprobs` holds the
gather's dispatch table), and the reference otherwise (the scalar losses; no C++ build). Which backend
exists, runs here and is picked is :mod:`distreward.ops.registry`'s answer (:func:`backends` reports it);
the loss kinds are :mod:`distreward.ops.loss_kinds`' table.

Every op also takes ``validate`` (docs/performance.md, "Value checks"): shapes, dtypes and devices are
always checked on the host; values (NaN / inf logits, targets outside [0, 1], bad widths or label
distributions, ids outside the vocabulary) through the kernels, which make a bad row's results NaN and
flag it. ``validate=True`` reads that flag at once and raises ``ValueError`` / ``IndexError`` naming the
bad input (one host sync on CUDA); ``False`` leaves the NaN results (no sync: the training loop's per-step
read of the loss raises); ``None``, the default, validates CPU tensors (no device sync there: the C++
kernels check in their own loop) and not CUDA ones.
"""
import functools
import math

import torch

from distreward.ops import logprobs, loss_kinds, reference, registry
from distreward.ops import validation as check
from distreward.ops.loss_kinds import LOSS_KINDS, REWARD_LOSS_KINDS, SCALAR_LOSS_KINDS

LOSS_KIND_TABLE = loss_kinds.TABLE  # kind -> LossKind(scalar, reads_targets, margin)
BACKENDS = registry.BACKENDS


def bin_centers(num_bins: int = 10, low: float = 0.0, high: float = 1.0, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bin centers ``linspace(low, high, num_bins)`` [K]."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    if not float(low) < float(high):
        raise ValueError(f"low must be below high, got low={low}, high={high}")
    return torch.linspace(float(low), float(high), num_bins, device=device, dtype=dtype)


def bin_edges(num_bins: int = 10, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Edges [K + 1] fp64 of the K bins centred on ``bin_centers(num_bins, low, high)``: each bin is
    ``[c_k - w / 2, c_k + w / 2)`` with ``w = (high - low) / (K - 1)`` the spacing of the centers (docs/math.md §1)."""
    width = (float(high) - float(low)) / (bin_centers(num_bins, low, high).numel() - 1)
    return torch.linspace(float(low) - width / 2, float(high) + width / 2, num_bins + 1, dtype=torch.float64)


def _head_kernel(name: str, flagged: bool):
    """The fused Triton op ``name`` of kernels/dist_head.py, imported on first call (Triton is optional), as a
    bin-op implementation: under ``validate`` it raises check.BadValues when a result is not finite, read from
    a flag the kernel writes (``flagged``) or from the scalar loss itself."""
    def run(*args, validate: bool, **kwargs):
        flag = torch.zeros((), dtype=torch.int32, device=args[0].device) if validate and flagged else None
        results = getattr(registry.kernels(name.removeprefix("triton_"), "triton"), name)(
            *args, **kwargs, **({"flag": flag} if flagged else {}))
        if validate and (bool(flag) if flagged else not math.isfinite(results.item())):
            raise check.BadValues(name)
        return results

    return run


def _eager(function):
    """The reference ``function`` as a bin-op implementation: under ``validate`` it raises check.BadValues when a
    result is not finite (host reads of every result)."""
    def run(*args, validate: bool, **kwargs):
        results = function(*args, **kwargs)
        if validate and not check.all_finite(results if isinstance(results, tuple) else (results,)):
            raise check.BadValues(function.__name__)
        return results

    return run


def _cpp_kernel(name: str):
    """The fused C++ op ``name`` of distreward/ops/cpp_bins.py (csrc/bin_ops.cpp) as a bin-op implementation: the
    kernel itself raises check.BadValues under ``validate`` as it writes a non-finite result."""
    def run(*args, validate: bool, **kwargs):
        return getattr(registry.kernels(name, "cpp"), name)(*args, validate=validate, **kwargs)

    return run


# One dispatch table per bin op: backend -> implementation with the reference's signature and a keyword
# ``validate`` (raise check.BadValues on a non-finite result); which entry runs is the registry's choice
# (distreward/ops/backends.py).
_DIST_MOMENTS = {"eager": _eager(reference.dist_moments), "triton": _head_kernel("triton_dist_moments", True),
                 "cpp": _cpp_kernel("dist_moments")}
_GAUSSIAN_KL = {"eager": _eager(reference.gaussian_kl), "triton": _head_kernel("triton_gaussian_kl", True),
                "cpp": _cpp_kernel("gaussian_kl")}
def _triton_pair_loss(logits_chosen, logits_rejected, target_chosen, target_rejected, kind, *args, **kwargs):
    """The Triton pair loss, given ``kind``'s row of the loss-kind table (ValueError for an unknown kind or a
    temperature the kind does not take)."""
    loss = loss_kinds.row(kind, LOSS_KINDS)
    loss_kinds.check_temperature(kind, kwargs.get("temperature", 1.0))
    return _head_kernel("triton_pair_loss", False)(logits_chosen, logits_rejected, target_chosen, target_rejected,
                                                  loss, *args, **kwargs)


_PAIR_LOSS = {"eager": _eager(reference.pair_loss), "triton": _triton_pair_loss, "cpp": _cpp_kernel("pair_loss")}
_SCALAR_PAIR_LOSS = {"eager": _eager(reference.scalar_pair_loss)}
_TABLES = {"dist_moments": _DIST_MOMENTS, "gaussian_kl": _GAUSSIAN_KL, "pair_loss": _PAIR_LOSS,
           "scalar_pair_loss": _SCALAR_PAIR_LOSS}


def _dist_implementation(table: dict, backend: str, logits: torch.Tensor):
    """``table``'s entry for the backend the registry resolves ``backend`` to for its op on ``logits`` [N, K]."""
    op = next(name for name, entries in _TABLES.items() if entries is table)
    return table[registry.resolve(op, backend, logits.device, logits.shape[-1])]


def backends(device="cpu") -> dict:
    """{"eager" | "triton" | "cpp": None where that backend runs on tensors of ``device`` here, else why not}
    (distreward/ops/registry.py; ``backend="auto"`` picks the fused one of the device when it is available)."""
    return registry.report(device)


@functools.lru_cache(maxsize=None)
def _default_centers(num_bins: int, device: torch.device) -> torch.Tensor:
    """``bin_centers(num_bins)`` float32 on ``device``, made once (not an inference-mode tensor, which autograd
    could not save). Internal: passed to the kernels, never handed to the caller."""
    with torch.inference_mode(False):
        return bin_centers(num_bins, device=device)


def _centers_for(logits: torch.Tensor, centers):
    if centers is None:
        if torch.compiler.is_compiling():  # a cached tensor made while tracing would be a fake one
            return bin_centers(logits.shape[-1], device=logits.device)
        return _default_centers(logits.shape[-1], logits.device)
    check.check_centers(centers, logits.shape[-1], logits.device)
    return centers


def _checked(op: str, run, logits: dict, targets: dict, centers, sigmas=None):
    """``run()``'s results; when it raises check.BadValues, the ValueError naming the bad input instead."""
    try:
        return run()
    except check.BadValues:
        pass
    check.diagnose(op, logits, targets, centers, sigmas)


def dist_moments(logits: torch.Tensor, centers=None, backend: str = "auto", validate=None):
    """logits [N, K] (fp32/bf16/fp16) -> (mean [N], std [N]) fp32 of softmax(logits) over ``centers`` [K]
    (None: ``bin_centers(K)``); ``validate`` as in the module doc."""
    check.check_logits("logits", logits)
    centers = _centers_for(logits, centers)
    run = _dist_implementation(_DIST_MOMENTS, backend, logits)
    checking = check.validating(validate, logits.device)
    return _checked("dist_moments", lambda: run(logits, centers, validate=checking), {"logits": logits}, {}, centers)


def _sigmas_in_use(names: tuple, sigmas: tuple, targets: tuple) -> dict:
    """The per-row width tensors that label means [N] use (name -> tensor): what diagnose may blame."""
    return {name: sigma for name, sigma, target in zip(names, sigmas, targets)
            if isinstance(sigma, torch.Tensor) and target.dim() == 1}


def gaussian_kl(logits: torch.Tensor, target: torch.Tensor, sigma=0.1, centers=None,
                backend: str = "auto", validate=None) -> torch.Tensor:
    """logits [N, K] -> KL(q || softmax(logits)) [N] fp32 for the label distribution q (docs/math.md §2).

    ``target`` [N] label means in [0, 1]: q = Gaussian(target, sigma) over the centers, ``sigma`` a positive
    number or a float tensor [N] of per-row widths. ``target`` [N, K]: q itself (rows non-negative, summing
    to 1 within 1e-3); ``sigma`` is then unused. ``validate`` as in the module doc.
    """
    check.check_logits("logits", logits)
    rows, device = logits.shape[0], logits.device
    check.check_target("target", target, rows, device, num_bins=logits.shape[-1])
    check.check_sigma("sigma", sigma, rows, device)
    centers = _centers_for(logits, centers)
    run = _dist_implementation(_GAUSSIAN_KL, backend, logits)
    checking = check.validating(validate, device)
    return _checked("gaussian_kl", lambda: run(logits, target, sigma, centers, validate=checking),
                    {"logits": logits}, {"target": target}, centers, _sigmas_in_use(("sigma",), (sigma,), (target,)))


def pair_loss(logits_chosen: torch.Tensor, logits_rejected: torch.Tensor, target_chosen=None, target_rejected=None,
              kind: str = "bt_kl", sigma=0.1, score_weight: float = 1.0, centers=None,
              backend: str = "auto", temperature: float = 1.0, validate=None) -> torch.Tensor:
    """Mean docs/math.md §3 loss over N pairs: logits [N, K] each -> scalar fp32.

    Each target is label means [N] in [0, 1] or a label distribution [N, K] (as in :func:`gaussian_kl`; the
    two sides independently). ``sigma`` is a positive number or a float tensor [N] for both sides, or a tuple
    ``(sigma_chosen, sigma_rejected)`` of those; a side whose target is [N, K] does not use its sigma.
    ``kind`` is "bt_mean" (targets unused), "bt_kl" (default) or "dpl"; with ``score_weight=0`` the
    targets' values are unused too (and not read). ``temperature`` (> 0) divides the Bradley-Terry
    margin (dpl takes only 1). The scalar kinds "scalar_bt" and "scalar_reg" take a scalar head's
    rewards as logits [N, 1] and label means [N] only (eager only; ``sigma`` and ``centers`` unused).
    ``validate`` as in the module doc.
    """
    check.check_choice("kind", kind, REWARD_LOSS_KINDS)
    check.check_positive("temperature", temperature)
    loss_kinds.check_temperature(kind, temperature)
    scalar, reads_targets = LOSS_KIND_TABLE[kind].scalar, LOSS_KIND_TABLE[kind].reads_targets
    for name, logits in (("logits_chosen", logits_chosen), ("logits_rejected", logits_rejected)):
        check.check_logits(name, logits, num_bins=1 if scalar else None)
    if logits_chosen.shape != logits_rejected.shape:
        raise ValueError(f"logits_chosen {tuple(logits_chosen.shape)} and logits_rejected "
                         f"{tuple(logits_rejected.shape)} must have the same shape")
    if logits_chosen.device != logits_rejected.device:
        raise ValueError("logits_chosen and logits_rejected must be on the same device")
    if logits_chosen.shape[0] == 0:
        raise ValueError("pair_loss needs at least one pair (logits have 0 rows)")
    rows, device = logits_chosen.shape[0], logits_chosen.device
    sigma_names = check.check_sigma_sides(sigma, rows, device)
    check.check_positive("score_weight", score_weight, allow_zero=True)
    with_targets = reads_targets and score_weight != 0
    if reads_targets:
        num_bins = None if scalar else logits_chosen.shape[-1]  # the scalar kinds take label means [N] only
        check.check_target("target_chosen", target_chosen, rows, device, num_bins)
        check.check_target("target_rejected", target_rejected, rows, device, num_bins)
    checking = check.validating(validate, device)
    if scalar:
        implementation = _dist_implementation(_SCALAR_PAIR_LOSS, backend, logits_chosen)
        centers = None

        def run():
            return implementation(logits_chosen[:, 0], logits_rejected[:, 0], target_chosen, target_rejected,
                                     kind, score_weight, temperature, validate=checking)
    else:
        centers = _centers_for(logits_chosen, centers)
        implementation = _dist_implementation(_PAIR_LOSS, backend, logits_chosen)

        def run():
            return implementation(logits_chosen, logits_rejected, target_chosen, target_rejected, kind, sigma,
                                  score_weight, centers, temperature=temperature, validate=checking)
    targets, sigmas = {}, {}
    if with_targets:
        targets = {"target_chosen": target_chosen, "target_rejected": target_rejected}
        if not scalar:
            sigmas = _sigmas_in_use(sigma_names, reference.label_sides(sigma), (target_chosen, target_rejected))
    return _checked("pair_loss", run, {"logits_chosen": logits_chosen, "logits_rejected": logits_rejected},
                    targets, centers, sigmas)


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask=None, backend: str = "auto",
                    validate=None) -> torch.Tensor:
    """logits [B, T, V] (fp32/bf16/fp16/fp64), ids [B, T] int64 / int32, mask [B, T] or None -> log-probs [B, T]
    fp32 (fp64 for fp64 logits).

    ``logp[b, t] = logits[b, t, ids[b, t]] - logsumexp(logits[b, t])``; 0 (and no gradient) where mask is 0.
    Under ``validate`` (module doc) live ids outside [0, V) raise IndexError, live rows with a NaN or +inf logit
    (or no finite one) ValueError: flagged by the kernel as it writes the [B, T] output, no extra pass over the
    logits; without, such rows' log-probs are NaN. The C++ kernel (CPU) always checks.
    """
    ids, mask, checking = check.check_gather_inputs(logits, ids, mask, validate)
    return logprobs.GATHER[registry.resolve("gather_logprobs", backend, logits.device)](logits, ids, mask, checking)


__all__ = ["bin_centers", "bin_edges", "dist_moments", "gaussian_kl", "pair_loss", "gather_logprobs", "reference",
           "LOSS_KINDS", "SCALAR_LOSS_KINDS", "REWARD_LOSS_KINDS", "LOSS_KIND_TABLE", "BACKENDS", "backends"]
