"""The label forms of docs/math.md §2 beyond one number sigma and label means [N]: per-row widths sigma [N]
and given label distributions q [N, K], in ``ops.gaussian_kl`` and every ``ops.pair_loss`` kind (each side's
form chosen independently, sigma as a tuple per side), on the eager reference and the Triton kernels
(interpreted on the CPU under TRITON_INTERPRET=1, compiled on CUDA): values and gradients of one backend
against the other and of each new form against the old one it generalises, float64 gradchecks, adversarial
inputs (logits of +-1e4, bf16 and fp16, odd K, non-contiguous tensors, exact zeros and one-hot q), a seeded
fuzz of good and bad label inputs, and bad input naming its argument."""
import importlib.util
import re
from dataclasses import dataclass

import pytest
import torch
from devices import BIN_GRAD_RTOL, TRITON_DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distreward import ops
from distreward.ops import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the fused kernels need triton")
BACKENDS = ["eager", pytest.param("triton", marks=needs_triton)]
# Where each backend's inputs live: the Triton kernels take CUDA tensors unless interpreted (tests/devices.py).
DEVICE = TRITON_DEVICE if HAS_TRITON else "cpu"

# Both backends compute in float32 from the same inputs; only the order of the K-term sums and the exp/log
# implementations differ, a few float32 ulps of the largest term (as tests/test_dist_head_triton.py allows).
VALUE_RTOL, VALUE_ATOL = 2e-5, 1e-5
GRAD_RTOL = BIN_GRAD_RTOL


# ---------------------------------------------------------------- inputs

@dataclass
class Case:
    rows: int
    bins: int
    dtype: torch.dtype
    scale: float  # logits ~ scale * N(0, 1)
    layout: str  # of every input: "contiguous", "strided" (every other element) or "transposed" (2-D: a .T)

    def __str__(self):
        return f"N{self.rows}-K{self.bins}-{str(self.dtype).removeprefix('torch.')}-x{self.scale:g}-{self.layout}"


CASES = [
    Case(1, 10, torch.float32, 1.0, "contiguous"),
    Case(7, 3, torch.bfloat16, 30.0, "strided"),
    Case(9, 17, torch.float16, 1e4, "transposed"),
    Case(33, 64, torch.float32, 1e4, "strided"),
    Case(65, 10, torch.bfloat16, 1e4, "contiguous"),
    Case(130, 2, torch.float16, 3.0, "transposed"),
    Case(20, 10, torch.float32, 3.0, "transposed"),
]


def in_layout(values: torch.Tensor, layout: str, dtype=torch.float32) -> torch.Tensor:
    """``values`` (CPU) on DEVICE in ``dtype``, laid out as ``layout`` (a 1-D "transposed" stays strided)."""
    if layout == "strided" or (layout == "transposed" and values.dim() == 1):
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=dtype, device=DEVICE)
        wide[..., ::2] = values.to(device=DEVICE, dtype=dtype)
        return wide[..., ::2]
    if layout == "transposed":
        return values.T.contiguous().to(device=DEVICE, dtype=dtype).T
    return values.to(device=DEVICE, dtype=dtype)


def make_logits(case: Case, g: torch.Generator) -> torch.Tensor:
    logits = in_layout(torch.randn(case.rows, case.bins, generator=g) * case.scale, case.layout, case.dtype)
    assert logits.is_contiguous() == (case.layout == "contiguous")
    return logits.requires_grad_(True)


def make_means(case: Case, g: torch.Generator) -> torch.Tensor:
    """Label means [N] in [0, 1], the end points among them."""
    values = torch.rand(case.rows, generator=g)
    values[::3], values[1::3] = 0.0, 1.0
    return in_layout(values, case.layout)


def make_sigmas(case: Case, g: torch.Generator) -> torch.Tensor:
    """Per-row widths [N], log-uniform over [0.02, 2] with both ends among them."""
    values = 0.02 * 100.0 ** torch.rand(case.rows, generator=g)
    values[::4], values[1::4] = 0.02, 2.0
    return in_layout(values, case.layout)


def make_distribution(case: Case, g: torch.Generator, style: str) -> torch.Tensor:
    """Label distributions [N, K] (float32, rows summing to 1 up to float32 rounding): "soft" (all positive),
    "zeros" (about half the bins exactly 0, never all) or "one_hot"."""
    n, k = case.rows, case.bins
    if style == "one_hot":
        q = torch.nn.functional.one_hot(torch.randint(0, k, (n,), generator=g), k).double()
    else:
        q = torch.softmax(2.0 * torch.randn(n, k, generator=g, dtype=torch.float64), dim=-1)
        if style == "zeros":
            keep = torch.rand(n, k, generator=g) < 0.5
            keep[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = True
            q = torch.where(keep, q, 0.0)
        q = q / q.sum(-1, keepdim=True)
    return in_layout(q, case.layout)


def make_target(case: Case, g: torch.Generator, form: str) -> torch.Tensor:
    return make_means(case, g) if form == "means" else make_distribution(case, g, form)


def make_sigma(case: Case, g: torch.Generator, form: str):
    """A float, a tensor [N], or a tuple (chosen, rejected) of those: "float", "row", "float,row", "row,row"."""
    sides = tuple(0.1 if side == "float" else make_sigmas(case, g) for side in form.split(","))
    return sides if len(sides) == 2 else sides[0]


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert bool(torch.isfinite(actual).all())
    torch.testing.assert_close(actual, expected, rtol=VALUE_RTOL, atol=VALUE_ATOL)


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, rtol=None, term: float = 0.0):
    """Close to a few units in the last place of the input dtype, relative to the largest entry or to ``term``,
    the size of the terms each entry sums (where the result is far smaller than its terms, as when rows are
    near one-hot, the rounding of the terms is what remains)."""
    assert actual.dtype == expected.dtype
    rtol = GRAD_RTOL[expected.dtype] if rtol is None else rtol
    atol = rtol * (float(expected.abs().max()) + term) + 1e-30
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def eager_and_triton(op, *args, **kwargs):
    return op(*args, **kwargs, backend="eager"), op(*args, **kwargs, backend="triton")


# ---------------------------------------------------------------- Triton against eager

@needs_triton
@pytest.mark.parametrize("form", ["row-sigma", "soft", "zeros", "one_hot"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gaussian_kl_of_the_new_label_forms_matches_eager(case, form):
    g = torch.Generator().manual_seed(case.rows * case.bins + len(form))
    logits = make_logits(case, g)
    if form == "row-sigma":
        target, sigma = make_means(case, g), make_sigmas(case, g)
    else:
        target, sigma = make_distribution(case, g, form), 0.1
    kl, fused_kl = eager_and_triton(ops.gaussian_kl, logits, target, sigma)
    assert_values_close(fused_kl, kl)
    upstream = torch.randn(case.rows, generator=g).to(DEVICE)
    grad = torch.autograd.grad(kl, logits, upstream)[0]
    # entry (i, k) = upstream_i * (p_ik - q_ik): terms of size |upstream_i|
    assert_grads_close(torch.autograd.grad(fused_kl, logits, upstream)[0], grad, term=float(upstream.abs().max()))


# (target_chosen form, target_rejected form, sigma form): every form on each side, mixed.
PAIR_FORMS = [
    ("means", "soft", "float"),
    ("zeros", "means", "row"),
    ("means", "means", "float,row"),
    ("one_hot", "zeros", "row,row"),  # sigma unused on both sides
    ("means", "means", "row,row"),
    ("soft", "means", "row,float"),
]


@needs_triton
@pytest.mark.parametrize("forms", PAIR_FORMS, ids="-".join)
@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_pair_loss_of_the_new_label_forms_matches_eager(case, kind, forms):
    g = torch.Generator().manual_seed(case.rows + 7 * case.bins + PAIR_FORMS.index(forms))
    chosen, rejected = make_logits(case, g), make_logits(case, g)
    target_chosen, target_rejected = make_target(case, g, forms[0]), make_target(case, g, forms[1])
    sigma = make_sigma(case, g, forms[2])
    loss, fused_loss = eager_and_triton(ops.pair_loss, chosen, rejected, target_chosen, target_rejected,
                                        kind=kind, sigma=sigma, score_weight=1.5)
    assert fused_loss.shape == ()
    assert_values_close(fused_loss, loss)
    grads = torch.autograd.grad(2.5 * loss, (chosen, rejected))  # grad_output != 1 rescales the saved gradients
    term = 2.5 * (1 + 1.5) * 2 / case.rows  # (1 + score_weight) * (1 + the centers' span) / N, times 2.5
    for fused_grad, grad in zip(torch.autograd.grad(2.5 * fused_loss, (chosen, rejected)), grads):
        assert_grads_close(fused_grad, grad, term=term)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_score_weight_zero_reads_no_label_values(kind, backend):
    """With score_weight 0 the labels are unused in every form: not read, so not even a q that sums to 2 or a
    width of -1 is refused, and the loss is the preference term alone (bt_kl's is bt_mean's)."""
    case = Case(9, 10, torch.float32, 3.0, "strided")
    g = torch.Generator().manual_seed(19)
    chosen, rejected = make_logits(case, g), make_logits(case, g)
    unread_q = 2 * make_distribution(case, g, "soft")
    unread_sigma = torch.full((case.rows,), -1.0, device=DEVICE)
    loss = ops.pair_loss(chosen, rejected, unread_q, make_means(case, g), kind=kind, sigma=(0.1, unread_sigma),
                         score_weight=0.0, backend=backend)
    means = make_means(case, g)
    expected = ops.pair_loss(chosen, rejected, means, means, kind=kind, score_weight=0.0, backend="eager")
    if kind == "bt_kl":
        torch.testing.assert_close(expected, ops.pair_loss(chosen, rejected, kind="bt_mean", backend="eager"))
    torch.testing.assert_close(loss, expected, rtol=VALUE_RTOL, atol=VALUE_ATOL)
    exact_grads = torch.autograd.grad(expected, (chosen, rejected))
    for grad, exact in zip(torch.autograd.grad(loss, (chosen, rejected)), exact_grads):
        assert_grads_close(grad, exact)


# ---------------------------------------------------------------- each new form against the old one

# A width tensor of one value vs that value as a float: the factor -1 / (2 sigma^2) is computed in float32 on
# the device instead of in float64 on the host, one float32 rounding (6e-8) apart; measured <= 3e-7 here.
SAME_SIGMA_TOL = 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.25, 2.0])
def test_a_width_tensor_of_one_value_equals_that_float(sigma, backend):
    case = Case(40, 10, torch.float32, 30.0, "strided")
    g = torch.Generator().manual_seed(23)
    logits, rejected = make_logits(case, g), make_logits(case, g)
    target, target_rejected = make_means(case, g), make_means(case, g)
    same = torch.full((case.rows,), sigma, device=DEVICE)
    kl, kl_rows = (ops.gaussian_kl(logits, target, s, backend=backend) for s in (sigma, same))
    torch.testing.assert_close(kl_rows, kl, rtol=SAME_SIGMA_TOL, atol=SAME_SIGMA_TOL)
    assert_grads_close(torch.autograd.grad(kl_rows.sum(), logits)[0], torch.autograd.grad(kl.sum(), logits)[0],
                       rtol=SAME_SIGMA_TOL)
    for kind in ops.LOSS_KINDS:
        losses = [ops.pair_loss(logits, rejected, target, target_rejected, kind=kind, sigma=s, backend=backend)
                  for s in (sigma, same, (same, sigma), (sigma, same.clone()))]
        for loss in losses[1:]:
            torch.testing.assert_close(loss, losses[0], rtol=SAME_SIGMA_TOL, atol=SAME_SIGMA_TOL)


# q given as float32 rounds each q_k (6e-8 relative) and log q is taken of that rounded q instead of coming out
# of the Gaussian's log-softmax: a few float32 ulps of each term of the sum; measured <= 5e-7 relative here.
SAME_LABELS_RTOL, SAME_LABELS_ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_a_distribution_equal_to_the_gaussian_labels_gives_the_same_kl_and_loss(scale, backend):
    """q = the Gaussian labels of label means (sigma 0.02 underflows most bins to exact zeros) as a target [N, K]."""
    case = Case(33, 17, torch.float32, scale, "contiguous")
    g = torch.Generator().manual_seed(29)
    logits, rejected = make_logits(case, g), make_logits(case, g)
    means, means_rejected, widths = make_means(case, g), make_means(case, g), make_sigmas(case, g)
    centers = ops.bin_centers(case.bins, device=DEVICE)
    for sigma in (0.02, 0.3, widths):
        q = reference.label_log_probs(means, sigma, centers).exp()
        if isinstance(sigma, float) and sigma == 0.02:
            assert (q == 0).any()
        kl = ops.gaussian_kl(logits, means, sigma, backend=backend)
        kl_q = ops.gaussian_kl(logits, q, sigma=123.0, backend=backend)  # sigma unused with a given q
        torch.testing.assert_close(kl_q, kl, rtol=SAME_LABELS_RTOL, atol=SAME_LABELS_ATOL)
        assert_grads_close(torch.autograd.grad(kl_q.sum(), logits)[0], torch.autograd.grad(kl.sum(), logits)[0])
        q_rejected = reference.label_log_probs(means_rejected, sigma, centers).exp()
        for kind in ops.LOSS_KINDS:
            loss = ops.pair_loss(logits, rejected, means, means_rejected, kind=kind, sigma=sigma, backend=backend)
            for targets in ((q, q_rejected), (means, q_rejected), (q, means_rejected)):
                mixed = ops.pair_loss(logits, rejected, *targets, kind=kind, sigma=sigma, backend=backend)
                torch.testing.assert_close(mixed, loss, rtol=SAME_LABELS_RTOL, atol=SAME_LABELS_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_of_a_given_q_is_its_formula(backend):
    """KL(q || p) = sum_k q_k (log q_k - log p_k) with the q_k = 0 terms 0, against float64 by hand; a one-hot q
    on a bin whose p underflows (logits +-1e4) gives -log p_k = 2e4, finite in log space."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [1e4, -1e4, 0.0], [3.0, 3.0, 3.0]], device=DEVICE)
    q = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], device=DEVICE)
    log_p = torch.log_softmax(logits.double(), -1)
    qd = q.double()
    expected = torch.where(qd > 0, qd * (qd.clamp_min(1e-300).log() - log_p), 0.0).sum(-1)
    kl = ops.gaussian_kl(logits.requires_grad_(True), q, backend=backend)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=1e-6)
    assert float(kl[1].detach()) == pytest.approx(2e4)
    grad = torch.autograd.grad(kl.sum(), logits)[0]
    torch.testing.assert_close(grad.double(), log_p.exp() - qd, rtol=1e-6, atol=1e-6)  # p - q


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_is_the_derivative_of_the_kl_returned(backend):
    """A q whose rows sum to 1 only within the tolerance (1 -+ 8e-4): the KL is taken of q as given, so its
    gradient is p * sum(q) - q, which is p - q for rows that sum to 1. In float64, to 1e-12."""
    g = torch.Generator().manual_seed(37)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    q = torch.softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1).to(DEVICE)
    q[0, 2] = 0.0
    q[0] /= q[0].sum()
    q[1] *= 1 + 8e-4
    q[2] *= 1 - 8e-4
    p = torch.softmax(logits.detach(), -1)
    kl = ops.gaussian_kl(logits, q, backend=backend)
    grad = torch.autograd.grad(kl.sum(), logits)[0]
    torch.testing.assert_close(grad, p * q.sum(-1, keepdim=True) - q, rtol=1e-12, atol=1e-12)
    assert (grad[1:3] - (p - q)[1:3]).abs().max() > 1e-4  # not p - q there
    means = torch.rand(4, generator=g, dtype=torch.float64).to(DEVICE)
    loss = ops.pair_loss(logits, logits.detach().flip(0), q, means, kind="bt_kl", score_weight=2.0, backend=backend)
    exact = ops.pair_loss(logits, logits.detach().flip(0), q, means, kind="bt_kl", score_weight=2.0, backend="eager")
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(exact, logits)[0],
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- float64 gradchecks

def _gradcheck_inputs(rows=3, bins=5, seed=31):
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = (torch.randn(rows, bins, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
                        for _ in range(2))
    means = torch.rand(rows, generator=g, dtype=torch.float64).to(DEVICE)
    widths = (0.02 * 100.0 ** torch.rand(rows, generator=g, dtype=torch.float64)).to(DEVICE)
    widths[0] = 0.3  # sigma 0.02 is a near one-hot label: keep one row smooth
    q = torch.softmax(torch.randn(rows, bins, generator=g, dtype=torch.float64), -1)
    q[0, 1] = 0.0
    q[0] /= q[0].sum()
    q[-1] *= 1 + 4e-4  # within the tolerance but not 1: the gradient is then p * sum(q) - q, not p - q
    return chosen, rejected, means, widths, q.to(DEVICE), ops.bin_centers(bins, device=DEVICE, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck_of_the_new_label_forms(backend):
    chosen, rejected, means, widths, q, centers = _gradcheck_inputs()
    fast = backend == "triton"  # the interpreter costs ~1 ms a program: the fast check there
    assert torch.autograd.gradcheck(
        lambda z: ops.gaussian_kl(z, means, widths, centers, backend=backend), (chosen,), fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda z: ops.gaussian_kl(z, q, centers=centers, backend=backend), (chosen,), fast_mode=fast)
    for kind in ops.LOSS_KINDS:
        for targets, sigma in (((means, q), (0.2, widths)), ((q, means), widths), ((q, q.flip(0)), 0.1)):
            assert torch.autograd.gradcheck(
                lambda a, b: ops.pair_loss(a, b, *targets, kind=kind, sigma=sigma, centers=centers,
                                           backend=backend), (chosen, rejected), fast_mode=fast)


@needs_triton
def test_the_kernels_pass_no_gradient_to_the_target_or_sigma():
    """The labels are constants to the kernels (their autograd Functions return None for them); the eager
    reference, plain autograd, would differentiate through them as it always has for label means."""
    chosen, rejected, means, widths, q, centers = _gradcheck_inputs()
    widths.requires_grad_(True)
    q.requires_grad_(True)
    loss = ops.pair_loss(chosen, rejected, means, q, sigma=widths, centers=centers, backend="triton")
    loss = loss + ops.gaussian_kl(chosen, means, widths, centers, backend="triton").sum()
    loss = loss + ops.gaussian_kl(rejected, q, centers=centers, backend="triton").sum()
    grads = torch.autograd.grad(loss, (chosen, widths, q), allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None and grads[2] is None


# ---------------------------------------------------------------- bad input

def _with(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


Z = torch.randn(4, 10) * 3
T = torch.rand(4)
Q = torch.full((4, 10), 0.1)
S = torch.full((4,), 0.2)
NEGATIVE_BUT_SUMS_TO_1 = _with(_with(Q, (2, 3), -0.05), (2, 4), 0.25)  # the NaN path catches it, not the sum


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, match", [  # call(backend, logits, label means, q, sigma), all on the backend's device
    (lambda b, z, t, q, s: ops.gaussian_kl(z, _with(q, (1, 2), -0.1), backend=b), "target .* non-negative"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, NEGATIVE_BUT_SUMS_TO_1.to(z.device), backend=b), "target .* non-neg"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, _with(q, (0, 0), float("nan")), backend=b), "target .* NaN"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, _with(q, (3, 9), float("inf")), backend=b), "target .* NaN or inf"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, q * 0.9, backend=b), r"target .* summing to 1 .* row 0 sums to 0.9"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, _with(q, (2, 0), 0.1 + 2e-3), backend=b), "row 2 sums to 1.002"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, q[:, :9] / 0.9, backend=b), "target is a distribution over 9 bins"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, q[:3], backend=b), "target has 3 entries"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, q[None], backend=b), "target must be a tensor of label means"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, (q * 10).long(), backend=b), "target must be float"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, q.to("meta"), backend=b), "target is on meta"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, s[:3], backend=b), r"sigma must be .* \[N\] = \[4\]"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, s[:, None], backend=b), "sigma must be"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, (s * 10).long(), backend=b), "sigma must be"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, s.to("meta"), backend=b), "sigma is on meta"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, _with(s, 1, 0.0), backend=b), "sigma must be positive and finite"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, _with(s, 3, -0.2), backend=b), "sigma must be positive"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, _with(s, 0, float("nan")), backend=b), "sigma must be positive"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, _with(s, 2, float("inf")), backend=b), "sigma must be positive"),
    (lambda b, z, t, q, s: ops.gaussian_kl(z, t, [0.1] * 4, backend=b), "sigma must be a finite number"),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, t, _with(q, (0, 0), -1.0), backend=b), "target_rejected"),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, q * 1.01, t, kind="dpl", backend=b), "target_chosen .* summing"),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, t, t, sigma=(0.1, 0.2, 0.3), backend=b), "sigma as a tuple"),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, t, t, sigma=(0.1, -s), backend=b), re.escape("sigma[1] must be")),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, t, t, sigma=(0.0, s), backend=b), re.escape("sigma[0] must be")),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, t, t, sigma=(s[:2], s), backend=b), re.escape("sigma[0] must be")),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, t, t, sigma=_with(s, 1, 0.0), backend=b), "sigma must be positive"),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, q, t, sigma=(0.1, _with(s, 1, float("nan"))), kind="bt_kl",
                                         backend=b), re.escape("sigma[1] must be positive")),
    (lambda b, z, t, q, s: ops.pair_loss(z, z, q, q[:, :5], backend=b), "target_rejected is a distribution over 5"),
    (lambda b, z, t, q, s: ops.pair_loss(z[:, :1], z[:, :1], q, t, kind="scalar_reg", backend="eager"),
     "target_chosen must be a tensor of label means \\[N\\], got shape"),
    (lambda b, z, t, q, s: ops.pair_loss(z[:, :1], z[:, :1], t, q[:, :1], kind="scalar_reg", backend="eager"),
     "target_rejected must be a tensor of label means"),
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy (the Triton interpreter) warns on the NaN
def test_bad_label_input_raises_value_error_naming_the_argument(call, match, backend):
    with pytest.raises(ValueError, match=match):
        call(backend, Z.to(DEVICE), T.to(DEVICE), Q.to(DEVICE), S.to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_a_side_does_not_use_is_not_checked(backend):
    """A side with a given q ignores its sigma's values; q rows within 1e-3 of summing to 1 are accepted."""
    z, t, q = Z.to(DEVICE), T.to(DEVICE), Q.to(DEVICE)
    bad_widths = torch.tensor([0.0, -1.0, float("nan"), float("inf")], device=DEVICE)
    loss = ops.pair_loss(z, z, q, t, sigma=(bad_widths, 0.1), backend=backend)
    assert torch.isfinite(loss)
    assert torch.isfinite(ops.gaussian_kl(z, q, bad_widths, backend=backend)).all()
    nearly = _with(q, (1, 0), 0.1 + 9e-4)
    assert torch.isfinite(ops.gaussian_kl(z, nearly, backend=backend)).all()
    assert torch.isfinite(ops.pair_loss(z, z, t, t, kind="bt_mean", sigma=(0.1, bad_widths), backend=backend))


def test_valid_label_distributions_cost_no_extra_pass_to_name_a_culprit(monkeypatch):
    """The row-sum guard joins the results (one host read for all): the targets are scanned only on failure."""
    def fail(*args):
        raise AssertionError("a target was scanned for bad values")

    monkeypatch.setattr(ops.check, "_check_target_values", fail)
    monkeypatch.setattr(ops.check, "_check_no_nan_or_posinf", fail)
    ops.gaussian_kl(Z, Q)
    ops.gaussian_kl(Z, T, S)
    ops.pair_loss(Z, Z, Q, T, sigma=(0.1, S))


# ---------------------------------------------------------------- fuzz: any mix of forms, good or bad

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
BAD_WIDTHS = {"zero": 0.0, "NaN": float("nan"), "inf": float("inf"), "negative": -0.1}


@st.composite
def label_target(draw, rows: int, bins: int):
    """(target float64, fault): label means [N] or a q [N, K] (some exact zeros), at most one bad value."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    row = draw(st.integers(0, rows - 1))
    if not draw(st.booleans()):
        target = torch.rand(rows, generator=g, dtype=torch.float64)
        fault = draw(st.sampled_from(["none", "none", "mean outside"]))
        if fault != "none":
            target[row] = draw(st.sampled_from([-0.01, 1.01]))
        return target, fault
    target = torch.softmax(3 * torch.randn(rows, bins, generator=g, dtype=torch.float64), -1)
    target[:, 1:] *= torch.rand(rows, bins - 1, generator=g, dtype=torch.float64) < 0.6  # bin 0 stays positive
    target /= target.sum(-1, keepdim=True)
    fault = draw(st.sampled_from(["none", "none", "q negative", "q NaN", "q sum"]))
    if fault == "q negative":  # the row still sums to 1: the NaN path, not the row-sum guard, must catch it
        target[row, 0] -= 0.5
        target[row, -1] += 0.5
    elif fault == "q NaN":
        target[row, -1] = float("nan")
    elif fault == "q sum":
        target[row] *= draw(st.sampled_from([0.99, 1.01]))
    return target, fault


@st.composite
def label_width(draw, rows: int):
    """(sigma, fault): a float, or a float64 tensor [N] over [0.02, 2] with at most one bad value."""
    sigma = draw(st.sampled_from([0.02, 0.1, 1.0, "tensor"]))
    if sigma != "tensor":
        return sigma, "none"
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sigma = 0.02 * 100.0 ** torch.rand(rows, generator=g, dtype=torch.float64)
    fault = draw(st.sampled_from(["none", "none"] + list(BAD_WIDTHS)))
    if fault != "none":
        sigma[draw(st.integers(0, rows - 1))] = BAD_WIDTHS[fault]
    return sigma, fault


def _reads_a_bad_value(target, target_fault: str, width_fault: str) -> bool:
    """A side's bad value is read unless it is a width on a side whose labels are a given q."""
    return target_fault != "none" or (width_fault != "none" and target.dim() == 1)


def _on(x, dtype):
    return x.to(device=DEVICE, dtype=dtype) if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy (the Triton interpreter) warns on the NaN
def test_fuzz_label_forms(backend, data):
    """Each call returns the float64 reference's value and gradients on the same inputs, or, exactly where a bad
    label value is read, raises ValueError naming a target or sigma."""
    rows, bins = data.draw(st.integers(1, 24)), data.draw(st.sampled_from([2, 3, 10, 17, 64]))
    kind = data.draw(st.sampled_from(ops.LOSS_KINDS))
    score_weight = data.draw(st.sampled_from([0.0, 1.0, 2.5]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    label_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    targets, target_faults = zip(*(data.draw(label_target(rows, bins)) for _ in range(2)))
    if data.draw(st.booleans()):  # one width for both sides
        sigma, width_fault = data.draw(label_width(rows))
        width_faults = (width_fault, width_fault)
    else:
        sigma, width_faults = zip(*(data.draw(label_width(rows)) for _ in range(2)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scale = data.draw(st.sampled_from([1.0, 30.0, 1e4]))
    leaves = [(torch.randn(rows, bins, generator=g, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)
              .requires_grad_(True) for _ in range(2)]
    targets = [_on(t, label_dtype) for t in targets]
    sigma = tuple(_on(s, label_dtype) for s in sigma) if isinstance(sigma, tuple) else _on(sigma, label_dtype)

    def call():
        return ops.pair_loss(*leaves, *targets, kind=kind, sigma=sigma, score_weight=score_weight, backend=backend)

    if kind != "bt_mean" and score_weight != 0 and any(map(_reads_a_bad_value, targets, target_faults, width_faults)):
        with pytest.raises(ValueError, match="target_chosen|target_rejected|sigma"):
            call()
        return
    loss = call()
    float64_leaves = [z.detach().double().requires_grad_(True) for z in leaves]
    float64_sigma = tuple(_on(s, torch.float64) for s in sigma) if isinstance(sigma, tuple) else \
        _on(sigma, torch.float64)
    exact = reference.pair_loss(*float64_leaves, *(t.double() for t in targets), kind, float64_sigma, score_weight,
                                ops.bin_centers(bins, device=DEVICE, dtype=torch.float64))
    # float32 math (and float32 labels) against float64 on the same values, relative to the loss's size.
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-4 * (1 + abs(float(exact.detach()))))
    grads, exact_grads = torch.autograd.grad(loss, leaves), torch.autograd.grad(exact, float64_leaves)
    # As tests/test_fuzz_dist_head.py: the coarsest input (logits, or float32 labels) sets the precision, and each
    # entry sums terms of size <= (1 + score_weight) * (1 + the centers' span 1) / N.
    rtol = max(GRAD_RTOL[dtype], GRAD_RTOL[label_dtype] if kind != "bt_mean" else 0.0)
    term = (1 + score_weight) * 2 / rows
    for grad, exact_grad in zip(grads, exact_grads):
        assert grad.dtype == dtype and bool(torch.isfinite(grad).all())
        torch.testing.assert_close(grad.double(), exact_grad, rtol=rtol,
                                   atol=rtol * (float(exact_grad.abs().max()) + term))
