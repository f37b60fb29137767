"""Hypothesis fuzz of the public bin ops (``dist_moments``, ``gaussian_kl``, ``pair_loss`` of every kind)
on the eager, C++ and Triton (interpreter) backends: random shapes (empty ones included), strides, dtypes,
NaN and +-inf, targets outside [0, 1], a "meta" tensor standing for a wrong device, wrong bin counts and
centers, bad settings. Every call must either return finite values equal to the float64 reference on
the same values, or raise ValueError/IndexError where the input is invalid; never another exception.

A short, derandomised sample runs by default; ``DISTREWARD_FUZZ_EXAMPLES=10000`` sets the cases per
op and backend.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distreward import ops
from distreward.ops import reference
from devices import BIN_GRAD_RTOL

EXAMPLES = int(os.environ.get("DISTREWARD_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NAN, INF = float("nan"), float("inf")
GRAD_RTOL = BIN_GRAD_RTOL


def _backends():
    """Every backend of the bin ops that runs on CPU tensors here: eager, cpp (the C++ extension) and triton (under
    TRITON_INTERPRET=1); the others are skipped with the registry's reason."""
    reasons = ops.backends("cpu")
    return [pytest.param(backend, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
            for backend, reason in reasons.items()]


# ---------------------------------------------------------------- inputs

def _layout(draw, values: torch.Tensor, dtype) -> torch.Tensor:
    """``values`` in ``dtype``: contiguous, every other element of a wider tensor, or (2-D) a transpose."""
    layout = draw(st.sampled_from(["contiguous", "contiguous", "strided", "transposed"]))
    if layout == "strided":
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=dtype)
        wide[..., ::2] = values.to(dtype)
        return wide[..., ::2]
    if layout == "transposed" and values.dim() == 2:
        return values.T.contiguous().to(dtype).T
    return values.to(dtype)


def _choose(draw, faulty: bool, good: list, bad: list):
    """One of ``good``, or of ``good + bad`` in a faulty example (half of them: the rest are well-formed)."""
    return draw(st.sampled_from(good + bad if faulty else good))


def _device(draw, faulty: bool, x):
    """Now and then (faulty examples only) the tensor moves to the meta device: a wrong device with no values."""
    return x.to("meta") if _choose(draw, faulty, [False] * 9, [True]) else x


@st.composite
def logits(draw, faulty: bool, rows: int, bins: int):
    """[rows, bins] logits: any float dtype, scales up to 1e4; faulty: int64, NaN / +-inf entries or -inf rows."""
    dtype = _choose(draw, faulty, list(FLOATS) * 3, [torch.int64])
    if dtype == torch.int64:
        return torch.zeros(rows, bins, dtype=dtype)
    seed = draw(st.integers(0, 2**31 - 1))
    values = torch.randn(rows, bins, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values *= draw(st.sampled_from([1.0, 30.0, 1e4]))
    for _ in range(_choose(draw, faulty, [0] * 3, [1, 2])):
        if rows and bins:
            row, column = draw(st.integers(0, rows - 1)), draw(st.integers(0, bins - 1))
            special = draw(st.sampled_from(["nan", "inf", "-inf", "-inf row"]))
            if special == "-inf row":
                values[row] = -INF
            else:
                values[row, column] = float(special)
    return _device(draw, faulty, _layout(draw, values, dtype))


@st.composite
def targets(draw, faulty: bool, rows: int):
    """[rows] targets in [0, 1] (end points included); faulty: out of range, NaN, inf, None or misshapen."""
    shape = _choose(draw, faulty, ["ok"] * 4, ["none", "longer", "2-d", "int"])
    if shape == "none":
        return None
    if shape == "int":
        return torch.zeros(rows, dtype=torch.int64)
    length = rows + 1 if shape == "longer" else rows
    values = torch.rand(length, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))),
                        dtype=torch.float64)
    values[::4] = 0.0
    values[1::4] = 1.0
    if length and _choose(draw, faulty, [False] * 3, [True]):
        values[draw(st.integers(0, length - 1))] = draw(st.sampled_from([-0.01, 1.5, NAN, INF, -INF]))
    if shape == "2-d":
        values = values[:, None]
    return _device(draw, faulty, _layout(draw, values, draw(st.sampled_from(FLOATS))))


@st.composite
def centers(draw, faulty: bool, bins: int):
    """None (the default linspace(0, 1, K)) or centers over another range; faulty: miscounted, int or not finite."""
    kind = _choose(draw, faulty, ["none", "range"], ["count", "special", "int"])
    if kind == "none":
        return None
    count = max(0, bins + draw(st.sampled_from([-1, 1]))) if kind == "count" else bins
    if kind == "int":
        return torch.arange(count)
    low = draw(st.floats(-10, 10))
    values = torch.linspace(low, low + draw(st.floats(0.1, 10)), count, dtype=torch.float64)
    if kind == "special" and count:
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    return _device(draw, faulty, _layout(draw, values, draw(st.sampled_from(FLOATS))))


@st.composite
def settings_of(draw, faulty: bool, kinds: tuple = ("bt_kl",)):
    """(rows, bins, kind, sigma, score_weight); faulty: bins outside 2..64, unknown kind, bad sigma or weight."""
    rows = draw(st.integers(0, 48))
    bins = _choose(draw, faulty, [2, 3, 10, 16, 33, 64], [65, 1, 0])
    kind = _choose(draw, faulty, list(kinds), ["hinge"])
    sigma = _choose(draw, faulty, [0.02, 0.1, 0.5, 1.0], [0.0, -1.0, NAN, INF, True, "0.1"])
    score_weight = _choose(draw, faulty, [0.0, 1.0, 2.5], [-1.0, NAN, None])
    return rows, bins, kind, sigma, score_weight


# ---------------------------------------------------------------- the rules, restated independently

def _float_tensor(x, ndim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in FLOATS and x.dim() == ndim


def _logits_ok(z, backend: str) -> bool:
    bins_ok = z.dim() == 2 and z.shape[-1] >= 2 and (backend != "triton" or z.shape[-1] <= 64)
    return _float_tensor(z, 2) and z.device.type == "cpu" and bins_ok


def _target_ok(t, z) -> bool:
    return _float_tensor(t, 1) and t.shape[0] == z.shape[0] and t.device == z.device


def _centers_ok(c, z) -> bool:
    return c is None or (_float_tensor(c, 1) and c.shape[0] == z.shape[-1] and c.device == z.device)


def _setting_ok(value, allow_zero: bool) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return number and (value > 0 or (allow_zero and value == 0))


def _f64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _centers64(c, z):
    """The centers the op uses (float32 linspace(0, 1, K) by default) in float64."""
    return (ops.bin_centers(z.shape[-1]) if c is None else c).double()


def check_call(call, valid: bool, expected):
    """``call()`` returns finite values equal to ``expected`` (a tuple of float64 tensors, computed for a
    structurally ``valid`` input), or raises ValueError/IndexError where the input is not valid.
    Returns the results (None where it raised)."""
    well_defined = valid and all(bool(torch.isfinite(e).all()) for e in expected)
    event("well-defined input" if well_defined else "valid input, non-finite result" if valid else "invalid input")
    try:
        results = call()
    except (ValueError, IndexError) as error:
        assert not well_defined, f"a valid input raised {error!r}"
        return None
    assert valid, "an invalid input returned a value"
    results = results if isinstance(results, tuple) else (results,)
    for result, exact in zip(results, expected, strict=True):
        assert bool(torch.isfinite(result).all()), "a non-finite result was returned"
        exact = exact.detach()
        atol = 1e-4 * (1.0 + float(exact.abs().max())) if exact.numel() else 0.0
        torch.testing.assert_close(result.double(), exact, rtol=1e-4, atol=atol)
    return results


def _leaf(z):
    """A float CPU tensor as a fresh leaf that requires grad (others unchanged)."""
    if isinstance(z, torch.Tensor) and z.is_floating_point() and z.device.type == "cpu":
        return z.detach().requires_grad_(True)
    return z


# ---------------------------------------------------------------- one fuzz per op

@pytest.mark.parametrize("backend", _backends())
@FUZZ
@given(data=st.data(), faulty=st.booleans())
def test_fuzz_dist_moments(backend, data, faulty):
    rows, bins, *_ = data.draw(settings_of(faulty))
    z, c = data.draw(logits(faulty, rows, bins)), data.draw(centers(faulty, bins))
    valid = _logits_ok(z, backend) and _centers_ok(c, z)
    expected = reference.dist_moments(z.double(), _centers64(c, z)) if valid else ()
    check_call(lambda: ops.dist_moments(z, c, backend=backend), valid, expected)


@pytest.mark.parametrize("backend", _backends())
@FUZZ
@given(data=st.data(), faulty=st.booleans())
def test_fuzz_gaussian_kl(backend, data, faulty):
    rows, bins, _, sigma, _ = data.draw(settings_of(faulty))
    z, t = data.draw(logits(faulty, rows, bins)), data.draw(targets(faulty, rows))
    c = data.draw(centers(faulty, bins))
    valid = _logits_ok(z, backend) and _target_ok(t, z) and _centers_ok(c, z) and _setting_ok(sigma, False)
    expected = (reference.gaussian_kl(z.double(), t.double(), sigma, _centers64(c, z)),) if valid else ()
    check_call(lambda: ops.gaussian_kl(z, t, sigma, c, backend=backend), valid, expected)


@pytest.mark.parametrize("backend", _backends())
@FUZZ
@given(data=st.data(), faulty=st.booleans())
def test_fuzz_pair_loss(backend, data, faulty):
    """Values, and the gradients of both logits against the float64 reference's where the call returns."""
    rows, bins, kind, sigma, score_weight = data.draw(settings_of(faulty, ops.LOSS_KINDS))
    chosen = _leaf(data.draw(logits(faulty, rows, bins)))
    rejected = _leaf(data.draw(logits(faulty, rows, _choose(data.draw, faulty, [bins] * 3, [bins + 1]))))
    target_chosen, target_rejected = data.draw(targets(faulty, rows)), data.draw(targets(faulty, rows))
    c = data.draw(centers(faulty, bins))
    valid = (kind in ops.LOSS_KINDS and _logits_ok(chosen, backend) and _logits_ok(rejected, backend)
             and chosen.shape == rejected.shape and rows > 0 and _centers_ok(c, chosen)
             and _setting_ok(sigma, False) and _setting_ok(score_weight, True)
             and (kind == "bt_mean" or (_target_ok(target_chosen, chosen) and _target_ok(target_rejected, chosen))))
    expected = (reference.pair_loss(chosen.double(), rejected.double(), _f64(target_chosen), _f64(target_rejected),
                                    kind, sigma, score_weight, _centers64(c, chosen)),) if valid else ()
    results = check_call(lambda: ops.pair_loss(chosen, rejected, target_chosen, target_rejected, kind=kind,
                                               sigma=sigma, score_weight=score_weight, centers=c, backend=backend),
                         valid, expected)
    if results is not None:
        grads, exact_grads = (torch.autograd.grad(loss, (chosen, rejected)) for loss in (results[0], expected[0]))
        # The coarsest input sets the precision: the labels are computed in float32 unless the targets are float64.
        label_dtypes = {torch.float32 for t in (target_chosen, target_rejected)
                        if kind != "bt_mean" and t.dtype != torch.float64}
        rtol = max(GRAD_RTOL[dtype] for dtype in {chosen.dtype, rejected.dtype} | label_dtypes)
        # Each entry sums terms of size <= (1 + score_weight) * (1 + centers' span) / N: rounding is relative to those.
        span = float(_centers64(c, chosen).max() - _centers64(c, chosen).min())
        term = (1 + score_weight) * (1 + span) / rows
        for grad, exact, z in zip(grads, exact_grads, (chosen, rejected)):
            assert grad.dtype == z.dtype and bool(torch.isfinite(grad).all()), "a non-finite gradient"
            torch.testing.assert_close(grad, exact, rtol=rtol, atol=rtol * (float(exact.abs().max()) + term))
