"""The one registry of the ops' backends: which exist, which are available here and why not, and what
``backend="auto"`` picks per op and device. Every op of :mod:`distreward.ops`, ``sequence_logprobs`` and the
configs ask it; nothing else tests backend names or imports a fused backend's module to see whether it works.

- ``eager``: the plain-PyTorch reference (:mod:`distreward.ops.reference`), always available.
- ``triton``: the kernels of ``kernels/`` (``distreward.kernels``): Triton importable, CUDA tensors, or any
  tensors when ``TRITON_INTERPRET=1`` was set before the start (the interpreter, slow, for tests).
- ``cpp``: the C++ extension ``distreward._C`` (csrc/), CPU tensors; unavailable where it did not build.

``auto`` picks ``AUTO[device type]`` when the op has that backend and it is available (the Triton bin ops only
for rows of at most ``TRITON_MAX_BINS`` bins), else ``eager``.
"""
import os

import torch

from distreward.ops import validation as check

BACKENDS = ("auto", "eager", "triton", "cpp")
FUSED = ("triton", "cpp")  # the backends with kernels of their own
# The fused backend auto picks per device type: on the CPU the C++ kernels beat eager and torch.compile of the
# reference at every size measured, on CUDA the Triton kernels beat eager (docs/performance.md).
AUTO = {"cpu": "cpp", "cuda": "triton"}


# Each fused module's import, as an import statement (torch.compile traces those, not importlib's calls).
def _triton_bin_ops():
    from distreward.kernels import dist_head
    return dist_head


def _cpp_bin_ops():
    from distreward.ops import cpp_bins
    return cpp_bins


def _triton_gather():
    from distreward.kernels import logprobs
    return logprobs


def _cpp_gather():
    from distreward.ops import cpp
    return cpp


_BIN_OPS = {"triton": _triton_bin_ops, "cpp": _cpp_bin_ops}
# op -> fused backend -> the import of the module holding its kernels, launchers and autograd (run on first use)
KERNELS = {
    "dist_moments": _BIN_OPS,
    "gaussian_kl": _BIN_OPS,
    "pair_loss": _BIN_OPS,
    "scalar_pair_loss": {},  # the scalar heads' losses: eager only
    "gather_logprobs": {"triton": _triton_gather, "cpp": _cpp_gather},
}
_LOADED = {}  # import -> the module, or why it did not import (no triton, no C++ build, one older than csrc/)


def _load(module):
    if module not in _LOADED:
        try:
            _LOADED[module] = module()
        except (ImportError, RuntimeError) as error:
            _LOADED[module] = f"{type(error).__name__}: {error}"
    return _LOADED[module]


def _import_error(module):
    """None when ``module`` imports, else why not."""
    loaded = _load(module)
    return loaded if isinstance(loaded, str) else None


def kernels(op: str, backend: str):
    """The module of ``op``'s fused ``backend``; ImportError where it did not import."""
    loaded = _load(KERNELS[op][backend])
    if isinstance(loaded, str):
        raise ImportError(loaded)
    return loaded


def is_fused(backend: str) -> bool:
    """Whether a resolved ``backend`` runs kernels of its own (not the eager reference)."""
    return backend in FUSED


def unavailable(backend: str, device=None, op=None):
    """None when ``backend`` runs here (for ``op``'s kernels, on tensors of ``device``; None: this machine's
    default device), else why not, phrased to follow the backend's name ("needs CPU tensors, got cuda:0")."""
    check.check_choice("backend", backend, BACKENDS)
    if backend in ("auto", "eager"):
        return None
    modules = (KERNELS[op],) if op is not None else KERNELS.values()
    if not any(backend in table for table in modules):
        return f"is not available for {op} (choose from {', '.join(('auto', 'eager') + tuple(KERNELS[op]))})"
    for table in modules:
        reason = _import_error(table[backend]) if backend in table else None
        if reason:
            return f"is not available: {reason}"
    if backend == "cpp":
        return None if device is None or torch.device(device).type == "cpu" else f"needs CPU tensors, got {device}"
    if device is None and not torch.cuda.is_available() and not _interpreting():
        return ("needs a CUDA GPU (or TRITON_INTERPRET=1 set before the start, which runs the kernels slowly on "
                "the CPU)")
    if device is not None and torch.device(device).type != "cuda" and not _interpreting():
        return f"needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}"
    return None


def _interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter, which takes tensors on any device."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device, num_bins=None) -> str:
    """``backend`` ("auto", "eager", "triton" or "cpp") -> the one that runs ``op`` on tensors of ``device``
    (``num_bins``: the bin ops' row width, for auto); ValueError when it is unknown, has no kernels for ``op``,
    cannot run on ``device`` or did not build."""
    check.check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        fused = AUTO.get(device.type)
        if fused not in KERNELS[op] or _import_error(KERNELS[op][fused]):
            return "eager"
        widest = getattr(kernels(op, fused), "TRITON_MAX_BINS", None)
        return "eager" if widest is not None and num_bins is not None and num_bins > widest else fused
    reason = unavailable(backend, device, op)
    if reason:
        raise ValueError(f"backend={backend!r} {reason}")
    return backend


def report(device="cpu") -> dict:
    """{backend: None if it runs on tensors of ``device`` here, else why not} for eager, triton and cpp."""
    return {backend: unavailable(backend, torch.device(device)) for backend in BACKENDS[1:]}
