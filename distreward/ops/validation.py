"""Input checks shared by every backend of :mod:`distreward.ops` (docs/math.md §6).

Each check raises ``ValueError`` (``IndexError`` for token ids) naming the argument, so a bad call
fails loudly instead of returning a silently wrong number. The ops check shapes, dtypes and devices on
the host before any kernel runs, and the values through the kernels themselves: a bad value makes its
rows' results NaN in every backend (a label distribution whose row does not sum to 1 included), and a
backend asked to validate flags a non-finite result as it writes it (:class:`BadValues`); only then is
the culprit looked for (:func:`diagnose`). Whether a call validates: :func:`validating`.
"""
import math

import torch

from distreward.ops.reference import LABEL_SUM_TOLERANCE

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_type(name: str, x, ndim: int) -> None:
    """``x`` must be a floating tensor with ``ndim`` dimensions (its metadata only)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_no_nan_or_posinf(name: str, x: torch.Tensor) -> None:
    if x.numel() and bool(torch.isnan(x).any() | torch.isposinf(x).any()):
        raise ValueError(f"{name} contains NaN or +inf")


class BadValues(ValueError):
    """Raised by a backend called with ``validate=True`` when a result came out NaN or infinite: the public op
    then names the bad input (:func:`diagnose`)."""


def validating(validate, device: torch.device) -> bool:
    """Whether a call checks its inputs' values at once. ``validate`` True: always (one host read of a flag the
    kernel wrote: a sync on CUDA); False: never at the call (bad input gives NaN results, which the training
    loop's per-step read of the loss catches); None (the default): on CPU tensors, where the check costs no
    device sync (the C++ kernels check in their own loop), not on CUDA. Never while torch.compile traces."""
    if validate is not None and not isinstance(validate, bool):
        raise ValueError(f"validate must be True, False or None, got {validate!r}")
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" if validate is None else validate


def all_finite(results) -> bool:
    """Whether every entry of the tensors ``results`` is finite (the eager backend's check: host reads)."""
    return all(bool(torch.isfinite(result).all()) for result in results)


def check_logits(name: str, logits, ndim: int = 2, num_bins=None) -> None:
    """Bin logits ``[N, K]`` (K >= 2, or exactly ``num_bins``: 1 for a scalar head's rewards [N, 1]); their
    values are checked through the results (:func:`diagnose`)."""
    check_float_type(name, logits, ndim)
    if logits.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: the bin ops need tensors that hold values")
    if num_bins is not None and logits.shape[-1] != num_bins:
        raise ValueError(f"{name} must have {num_bins} entries in its last dimension, got {logits.shape[-1]}")
    if num_bins is None and logits.shape[-1] < 2:
        raise ValueError(f"{name} must have at least 2 bins in its last dimension, got {logits.shape[-1]}")


def check_centers(centers, num_bins: int, device) -> None:
    """Bin centers ``[K]`` on the logits' device; finiteness is checked through the results."""
    check_float_type("centers", centers, 1)
    if centers.shape[0] != num_bins:
        raise ValueError(f"centers has {centers.shape[0]} entries but the logits have {num_bins} bins")
    if centers.device != device:
        raise ValueError(f"centers is on {centers.device} but the logits are on {device}")


def check_target(name: str, target, rows: int, device, num_bins=None) -> None:
    """Targets on the logits' device: label means ``[N]`` or, where ``num_bins`` is given (a distributional
    loss), label distributions ``[N, K]`` with K = ``num_bins``. Their values (a distribution's row sums
    included) are checked through the results."""
    forms = "label means [N]" if num_bins is None else "label means [N] or label distributions [N, K]"
    if not isinstance(target, torch.Tensor) or target.dim() not in ((1,) if num_bins is None else (1, 2)):
        got = f"shape {tuple(target.shape)}" if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"{name} must be a tensor of {forms}, got {got}")
    check_float_type(name, target, target.dim())
    if target.shape[0] != rows:
        raise ValueError(f"{name} has {target.shape[0]} entries but the logits have {rows} rows")
    if target.dim() == 2 and target.shape[1] != num_bins:
        raise ValueError(f"{name} is a distribution over {target.shape[1]} bins but the logits have {num_bins}")
    if target.device != device:
        raise ValueError(f"{name} is on {target.device} but the logits are on {device}")


def check_sigma(name: str, sigma, rows: int, device) -> None:
    """A label width: a positive finite number, or a float tensor ``[N]`` of per-row widths on the logits' device
    (whose values, > 0 and finite, are checked through the results)."""
    if not isinstance(sigma, torch.Tensor):
        check_positive(name, sigma)
        return
    if sigma.dtype not in FLOAT_DTYPES or sigma.dim() != 1 or sigma.shape[0] != rows:
        raise ValueError(f"{name} must be a positive number or a float tensor [N] = [{rows}] of per-row widths, "
                         f"got a {sigma.dtype} tensor of shape {tuple(sigma.shape)}")
    if sigma.device != device:
        raise ValueError(f"{name} is on {sigma.device} but the logits are on {device}")


def check_sigma_sides(sigma, rows: int, device):
    """``pair_loss``'s ``sigma``: one width (number or tensor [N]) for both sides, or a tuple
    ``(sigma_chosen, sigma_rejected)`` of those. Returns the names to report each side's width under."""
    if not isinstance(sigma, tuple):
        check_sigma("sigma", sigma, rows, device)
        return "sigma", "sigma"
    if len(sigma) != 2:
        raise ValueError(f"sigma as a tuple must be (sigma_chosen, sigma_rejected), got {len(sigma)} entries")
    for name, width in zip(("sigma[0]", "sigma[1]"), sigma):
        check_sigma(name, width, rows, device)
    return "sigma[0]", "sigma[1]"


def _row_sums(distribution: torch.Tensor) -> torch.Tensor:
    """Row sums [N] of a label distribution [N, K], in float32 (float64 for float64)."""
    return distribution.sum(-1, dtype=torch.float64 if distribution.dtype == torch.float64 else torch.float32)


def _check_target_values(name: str, target: torch.Tensor) -> None:
    """Name what is wrong with a target's values: label means outside [0, 1], or a distribution that holds
    a negative or non-finite entry or a row not summing to 1."""
    if target.dim() == 1:
        _check_no_nan_or_posinf(name, target)
        if bool(((target < 0) | (target > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1]")
        return
    if not bool(torch.isfinite(target).all()):
        raise ValueError(f"{name} (a label distribution [N, K]) contains NaN or inf")
    if bool((target < 0).any()):
        raise ValueError(f"{name} (a label distribution [N, K]) must be non-negative")
    total = _row_sums(target)
    bad = ~((total - 1).abs() <= LABEL_SUM_TOLERANCE)  # the rule the kernels apply
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name} (a label distribution [N, K]) must have rows summing to 1 (within "
                         f"{LABEL_SUM_TOLERANCE:g}): row {row} sums to {float(total[row]):.6g}")


def diagnose(op: str, logits: dict, targets: dict, centers, sigmas=None):
    """Raise the ValueError naming the bad input of a call of ``op`` whose results were not finite.

    Every backend makes the results of a row NaN where its logits hold NaN or +inf or are all -inf,
    its target lies outside [0, 1] (label means) or holds a negative or non-finite entry or does not
    sum to 1 (a label distribution), its per-row sigma is not positive and finite, or a center it uses
    is not finite (``centers`` None: a scalar head's loss, which has none). ``logits``, ``targets`` and
    ``sigmas`` (the per-row width tensors in use) map argument names to the tensors given.
    """
    for name, z in logits.items():
        _check_no_nan_or_posinf(name, z)
        if bool(torch.isneginf(z).all(dim=-1).any()):
            raise ValueError(f"{name} has a row whose logits are all -inf")
    for name, target in targets.items():
        _check_target_values(name, target)
    for name, sigma in (sigmas or {}).items():
        if not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
            raise ValueError(f"{name} must be positive and finite in every row")
    if centers is not None and not bool(torch.isfinite(centers).all()):
        raise ValueError("centers must be finite")
    raise ValueError(f"{op} is not finite for these finite inputs: a -inf logit where the loss needs "
                     "probability, or logits or centers too large for float32")


def check_choice(name: str, value, choices: tuple) -> None:
    """A setting that must be one of ``choices`` (a loss kind, a backend, a shaping, ...)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """A finite scalar setting such as ``sigma`` (> 0) or ``score_weight`` (>= 0)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_gather_inputs(logits, ids, mask, validate=None):
    """Validate ``gather_logprobs`` inputs from their metadata, without a pass over the logits (their
    values are checked through the kernel's [B, T] output: :func:`check_gather_values`); a float mask is
    read for NaN only when the call validates (:func:`validating` of ``validate``).

    Returns (ids int64 [B, T], mask bool [B, T] or None, whether the call validates).
    """
    check_float_type("logits", logits, 3)
    if logits.device.type == "meta":
        raise ValueError("logits are on the meta device: gather_logprobs needs tensors that hold values")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary, got shape {tuple(logits.shape)}")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an int64 (or int32) tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"ids has shape {tuple(ids.shape)} but logits [B, T, V] has {tuple(logits.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"ids is on {ids.device} but logits are on {logits.device}")
    validate = validating(validate, logits.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"mask must be a tensor of shape {tuple(ids.shape)}")
        if mask.device != logits.device:
            raise ValueError(f"mask is on {mask.device} but logits are on {logits.device}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() and validate and bool(torch.isnan(mask).any()):
                raise ValueError("mask contains NaN")
            mask = mask != 0
    return ids.long(), mask, validate


def check_gather_kernel_inputs(logits, ids, mask, *per_row) -> None:
    """What a fused gather kernel takes: logits [B, T, V] (V > 0), ids [B, T] int64, mask [B, T] bool or None and
    ``per_row`` float tensors [B, T] (grad_logp, lse), all on one device. Metadata only."""
    check_float_type("logits", logits, 3)
    rows = tuple(logits.shape[:2])
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary")
    if ids.dtype != torch.int64 or tuple(ids.shape) != rows:
        raise ValueError(f"ids must be an int64 tensor [B, T] = {list(rows)}, got {ids.dtype} {list(ids.shape)}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != rows):
        raise ValueError(f"mask must be a bool tensor of shape {list(rows)}, got {mask.dtype} {list(mask.shape)}")
    for x in per_row:
        if not x.is_floating_point() or tuple(x.shape) != rows:
            raise ValueError(f"grad_logp and lse must be float tensors [B, T] = {list(rows)}")
    if any(x is not None and x.device != logits.device for x in (ids, mask) + per_row):
        raise ValueError(f"every tensor must be on the logits' device {logits.device}")


def first_position(flags: torch.Tensor):
    """(b, t) of the first true entry of ``flags`` [B, T]."""
    b, t = (int(i) for i in torch.nonzero(flags)[0])
    return b, t


def check_gather_values(ids: torch.Tensor, mask, lse: torch.Tensor, vocab: int) -> None:
    """After a gather kernel ran: every live id in [0, vocab) (IndexError) and every live row's logsumexp
    ``lse`` [B, T] finite (ValueError): a NaN or +inf logit makes it NaN, a row of only -inf makes it -inf.
    O(B*T), one host read of a combined flag."""
    if not ids.numel():
        return
    bad_ids, bad_rows = (ids < 0) | (ids >= vocab), ~torch.isfinite(lse)
    if mask is not None:
        bad_ids, bad_rows = bad_ids & mask, bad_rows & mask
    if not bool((bad_ids | bad_rows).any()):
        return
    if bool(bad_ids.any()):
        b, t = first_position(bad_ids)
        raise IndexError(f"ids[{b}, {t}] = {int(ids[b, t])} is outside the vocabulary [0, {vocab})")
    b, t = first_position(bad_rows)
    raise ValueError(f"logits[{b}, {t}] contains NaN or +inf, or no finite value (a live row must hold a distribution)")
