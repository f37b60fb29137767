"""The fused Triton dist-head kernels (``backend="triton"``, kernels/dist_head.py) against the eager
reference: values and autograd gradients of ``dist_moments``, ``gaussian_kl`` and every ``pair_loss``
kind over N, K, dtypes, logit magnitudes, targets, sigma, score weights and memory layouts, a float64
gradcheck of the kernels themselves, and bad input. CI runs them on the CPU with TRITON_INTERPRET=1."""
import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from distreward import ops  # noqa: E402
from distreward.kernels import dist_head  # noqa: E402
from devices import BIN_GRAD_RTOL, TRITON_DEVICE as DEVICE  # noqa: E402

GRAD_RTOL = BIN_GRAD_RTOL


@dataclass
class Case:
    rows: int
    bins: int
    dtype: torch.dtype
    scale: float  # logits ~ scale * N(0, 1)
    layout: str  # "contiguous", "strided" (every other column) or "transposed" (a [K, N] tensor's .T)
    sigma: float
    score_weight: float

    def __str__(self):
        dtype = str(self.dtype).removeprefix("torch.")
        return f"N{self.rows}-K{self.bins}-{dtype}-x{self.scale:g}-{self.layout}-s{self.sigma}-w{self.score_weight:g}"


# Every axis value of the issue appears at least once; N = 4097 runs in few large programs.
CASES = [
    Case(1, 10, torch.float32, 1.0, "contiguous", 0.1, 2.0),
    Case(7, 2, torch.bfloat16, 30.0, "strided", 0.02, 2.0),
    Case(7, 33, torch.float16, 1e4, "transposed", 1.0, 0.0),
    Case(1000, 10, torch.bfloat16, 1e4, "contiguous", 0.1, 0.0),
    Case(1000, 33, torch.float32, 3.0, "strided", 0.02, 2.0),
    Case(4097, 10, torch.float32, 1e4, "transposed", 1.0, 2.0),
    Case(4097, 2, torch.float16, 3.0, "contiguous", 0.1, 2.0),
]


def make_logits(case: Case, generator: torch.Generator) -> torch.Tensor:
    """[N, K] logits of ``case.dtype`` in ``case.layout``, requiring grad."""
    n, k = case.rows, case.bins
    values = torch.randn(n, k, generator=generator) * case.scale
    if case.layout == "strided":
        storage = torch.zeros(n, 2 * k, dtype=case.dtype, device=DEVICE)
        storage[:, ::2] = values.to(case.dtype)
        logits = storage[:, ::2]
    elif case.layout == "transposed":
        logits = values.T.contiguous().to(device=DEVICE, dtype=case.dtype).T
    else:
        logits = values.to(device=DEVICE, dtype=case.dtype)
    assert logits.is_contiguous() == (case.layout == "contiguous")
    return logits.requires_grad_(True)


def make_targets(case: Case, generator: torch.Generator) -> torch.Tensor:
    """[N] targets in [0, 1] with the end points 0 and 1 among them (strided unless contiguous)."""
    step = 1 if case.layout == "contiguous" else 2
    target = torch.rand(case.rows * step, generator=generator).to(DEVICE)[::step]
    target[::3] = 0.0
    target[1::3] = 1.0
    return target


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype
    rtol = GRAD_RTOL[expected.dtype]
    atol = rtol * float(expected.abs().max()) + 1e-30
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-5)


def eager_and_triton(op, *args, **kwargs):
    return op(*args, **kwargs, backend="eager"), op(*args, **kwargs, backend="triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dist_moments_match_eager(case):
    g = torch.Generator().manual_seed(case.rows + case.bins)
    logits = make_logits(case, g)
    centers = ops.bin_centers(case.bins, device=DEVICE)
    (mean, std), (fused_mean, fused_std) = eager_and_triton(ops.dist_moments, logits, centers)
    assert_values_close(fused_mean, mean)
    assert_values_close(fused_std, std)
    upstream = (torch.randn(case.rows, generator=g).to(DEVICE), torch.randn(case.rows, generator=g).to(DEVICE))
    grad = torch.autograd.grad((mean, std), logits, upstream)[0]
    fused_grad = torch.autograd.grad((fused_mean, fused_std), logits, upstream)[0]
    assert_grads_close(fused_grad, grad)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gaussian_kl_matches_eager(case):
    g = torch.Generator().manual_seed(case.rows * case.bins)
    logits, target = make_logits(case, g), make_targets(case, g)
    kl, fused_kl = eager_and_triton(ops.gaussian_kl, logits, target, case.sigma)
    assert_values_close(fused_kl, kl)
    upstream = torch.randn(case.rows, generator=g).to(DEVICE)
    grad = torch.autograd.grad(kl, logits, upstream)[0]
    assert_grads_close(torch.autograd.grad(fused_kl, logits, upstream)[0], grad)


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_pair_loss_matches_eager(case, kind):
    g = torch.Generator().manual_seed(case.rows + 7 * case.bins)
    chosen, rejected = make_logits(case, g), make_logits(case, g)
    target_chosen, target_rejected = make_targets(case, g), make_targets(case, g).flip(0)
    loss, fused_loss = eager_and_triton(ops.pair_loss, chosen, rejected, target_chosen, target_rejected,
                                        kind=kind, sigma=case.sigma, score_weight=case.score_weight)
    assert fused_loss.shape == ()
    assert_values_close(fused_loss, loss)
    grads = torch.autograd.grad(loss, (chosen, rejected))
    for fused_grad, grad in zip(torch.autograd.grad(fused_loss, (chosen, rejected)), grads):
        assert_grads_close(fused_grad, grad)


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_many_small_programs_and_a_scaled_upstream_gradient(kind, monkeypatch):
    """Ragged last program, per-program partial sums, and grad_output != 1 rescaling the saved gradients."""
    monkeypatch.setattr(dist_head, "INTERPRETER_TILE_ELEMENTS", 1 << 13)
    monkeypatch.setattr(dist_head, "GPU_TILE_ELEMENTS", 1 << 9)
    g = torch.Generator().manual_seed(11)
    case = Case(1000, 10, torch.float32, 4.0, "contiguous", 0.1, 1.0)
    chosen, rejected = make_logits(case, g), make_logits(case, g)
    targets = make_targets(case, g), make_targets(case, g)
    losses = eager_and_triton(ops.pair_loss, chosen, rejected, *targets, kind=kind)
    assert_values_close(losses[1], losses[0])
    (grad_c, grad_r), (fused_c, fused_r) = (torch.autograd.grad(2.5 * loss, (chosen, rejected)) for loss in losses)
    assert_grads_close(fused_c, grad_c)
    assert_grads_close(fused_r, grad_r)
    (mean, std), (fused_mean, fused_std) = eager_and_triton(ops.dist_moments, chosen)
    assert_values_close(fused_std, std)
    kl, fused_kl = eager_and_triton(ops.gaussian_kl, chosen, targets[0])
    assert_values_close(fused_kl, kl)


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_strided_centers_of_another_range_are_read_in_place(kind):
    """Centers [K] with stride 2 over [1, 5] (the kernels take their stride instead of copying them)."""
    g = torch.Generator().manual_seed(13)
    case = Case(33, 10, torch.float32, 2.0, "contiguous", 0.5, 1.0)
    chosen, rejected = make_logits(case, g), make_logits(case, g)
    centers = torch.linspace(1.0, 5.0, 20, device=DEVICE)[::2]
    targets = make_targets(case, g), make_targets(case, g)
    losses = eager_and_triton(ops.pair_loss, chosen, rejected, *targets, kind=kind, sigma=0.5, centers=centers)
    assert_values_close(losses[1], losses[0])
    for fused_grad, grad in zip(*(torch.autograd.grad(loss, (chosen, rejected)) for loss in reversed(losses))):
        assert_grads_close(fused_grad, grad)
    (mean, std), (fused_mean, fused_std) = eager_and_triton(ops.dist_moments, chosen, centers)
    assert_values_close(fused_mean, mean)
    assert_values_close(fused_std, std)


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.bfloat16), (torch.float16, torch.float64)], ids=str)
def test_pair_rows_of_different_dtypes(dtypes):
    """Found by the fuzz: a float64 chosen row made the bfloat16 rejected gradient garbage (a cast the interpreter
    gets wrong); each gradient comes back in its row's dtype."""
    g = torch.Generator().manual_seed(17)
    chosen, rejected = ((torch.randn(5, 10, generator=g) * 3).to(device=DEVICE, dtype=dtype).requires_grad_(True)
                        for dtype in dtypes)
    targets = torch.rand(5, generator=g).to(DEVICE), torch.rand(5, generator=g).to(DEVICE)
    losses = eager_and_triton(ops.pair_loss, chosen, rejected, *targets)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-5, atol=1e-5)
    for fused_grad, grad in zip(*(torch.autograd.grad(loss, (chosen, rejected)) for loss in reversed(losses))):
        torch.testing.assert_close(fused_grad.float(), grad.float(), rtol=2e-2, atol=2e-2 * float(grad.abs().max()))


def test_one_hot_rows_have_zero_std_and_finite_gradient():
    """exp underflow makes p one-hot: std = 0 exactly, and its gradient is 0 (not NaN), as reference.safe_sqrt."""
    logits = torch.full((3, 10), -1e4, device=DEVICE)
    logits[:, 4] = 1e4
    logits[2] = torch.linspace(-3, 3, 10)
    logits.requires_grad_(True)
    (mean, std), (fused_mean, fused_std) = eager_and_triton(ops.dist_moments, logits)
    assert fused_std[0] == 0 and fused_std[1] == 0 and fused_std[2] > 0
    assert_values_close(fused_std, std)
    grad = torch.autograd.grad(std.sum(), logits, retain_graph=True)[0]  # an expanded (stride 0) upstream gradient
    fused_grad = torch.autograd.grad(fused_std.sum(), logits, retain_graph=True)[0]
    assert torch.isfinite(fused_grad).all() and not fused_grad[:2].any()
    assert_grads_close(fused_grad, grad)
    assert_grads_close(torch.autograd.grad(fused_mean[2], logits)[0], torch.autograd.grad(mean[2], logits)[0])


def test_dpl_of_far_apart_one_hot_rows_is_finite_in_log_space():
    """pc on bin 0, pr on bin K-1: P(chosen beats rejected) = exp(-2e4), so the loss is 2e4, not inf."""
    chosen = torch.full((2, 10), -1e4, device=DEVICE)
    chosen[:, 0] = 1e4
    rejected = chosen.flip(1).clone().requires_grad_(True)
    chosen.requires_grad_(True)
    unused_targets = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    loss = ops.pair_loss(chosen, rejected, *unused_targets, kind="dpl", score_weight=0.0, backend="triton")
    torch.testing.assert_close(loss, torch.tensor(2e4, device=DEVICE))
    # the (0, 0) and (K-1, K-1) ties share the probability: d loss / d z = (p - responsibility) / N
    expected = torch.zeros(2, 10, device=DEVICE)
    expected[:, 0], expected[:, -1] = 0.25, -0.25
    grad_c, grad_r = torch.autograd.grad(loss, (chosen, rejected))
    torch.testing.assert_close(grad_c, expected)
    torch.testing.assert_close(grad_r, -expected)


def test_float64_gradcheck_of_the_kernels():
    g = torch.Generator().manual_seed(5)
    chosen, rejected = (torch.randn(3, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
                        for _ in range(2))
    target_chosen, target_rejected = (torch.rand(3, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    centers = ops.bin_centers(5, device=DEVICE, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: ops.dist_moments(z, centers, backend="triton"), (chosen,), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda z: ops.gaussian_kl(z, target_chosen, 0.3, centers, backend="triton"), (chosen,), fast_mode=True)
    for kind in ops.LOSS_KINDS:
        assert torch.autograd.gradcheck(
            lambda a, b: ops.pair_loss(a, b, target_chosen, target_rejected, kind=kind, centers=centers,
                                       backend="triton"), (chosen, rejected), fast_mode=True)


def test_no_gradient_is_computed_without_autograd():
    chosen, rejected = torch.randn(4, 10, device=DEVICE), torch.randn(4, 10, device=DEVICE)
    targets = torch.rand(4, device=DEVICE), torch.rand(4, device=DEVICE)
    loss = ops.pair_loss(chosen, rejected, *targets, backend="triton")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ops.pair_loss(chosen, rejected, *targets, backend="eager"))
    with torch.no_grad():
        assert not ops.pair_loss(chosen.requires_grad_(True), rejected, *targets, backend="triton").requires_grad


def test_empty_input_gives_empty_moments():
    mean, std = ops.dist_moments(torch.empty(0, 10, device=DEVICE), backend="triton")
    assert mean.shape == std.shape == (0,)


@pytest.mark.parametrize("call, match", [
    (lambda z, t: ops.dist_moments(torch.randn(3, 65, device=DEVICE), backend="triton"), "2 to 64"),
    (lambda z, t: ops.dist_moments(z.masked_fill(z > 1, float("nan")), backend="triton", validate=True), "logits"),
    (lambda z, t: ops.gaussian_kl(z, t + 1.5, backend="triton", validate=True), "target"),
    (lambda z, t: ops.gaussian_kl(z, t, sigma=0.0, backend="triton"), "sigma"),
    (lambda z, t: ops.pair_loss(z, z[:2], t, t, backend="triton"), "same shape"),
    (lambda z, t: ops.pair_loss(z, z, t[:2], t, backend="triton"), "target_chosen"),
    (lambda z, t: ops.pair_loss(z, z, t, t, kind="hinge", backend="triton"), "kind"),
    (lambda z, t: ops.pair_loss(z.long(), z, t, t, backend="triton"), "logits_chosen"),
    (lambda z, t: ops.pair_loss(z, z, t, t, backend="triton", validate="yes"), "validate"),
])
def test_bad_input_raises_value_error(call, match):
    z, t = torch.randn(4, 10, device=DEVICE) * 3, torch.rand(4, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        call(z, t)


def bad_value_calls(z, t, backend, validate):
    """One call per bin op whose input holds a bad value (a NaN logit, a target above 1, a row of q summing to 2)."""
    nan_logits = z.clone()
    nan_logits[1, 3] = float("nan")
    q = torch.softmax(z, -1)
    q[2] *= 2
    return {"dist_moments": lambda: ops.dist_moments(nan_logits, backend=backend, validate=validate),
            "gaussian_kl": lambda: ops.gaussian_kl(z, t + 1.5, backend=backend, validate=validate),
            "pair_loss": lambda: ops.pair_loss(z, z, q, q, backend=backend, validate=validate)}


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("op", ["dist_moments", "gaussian_kl", "pair_loss"])
def test_validate_false_leaves_bad_rows_nan_and_true_names_the_input(op, backend):
    """validate=False (the CUDA default) raises nothing and makes the bad rows NaN (the first result's; the
    others' good rows stay finite); validate=True raises."""
    z, t = torch.randn(4, 10, device=DEVICE) * 3, torch.rand(4, device=DEVICE)
    first, *others = (lambda r: r if isinstance(r, tuple) else (r,))(bad_value_calls(z, t, backend, False)[op]())
    bad_rows = {"dist_moments": [1], "gaussian_kl": [0, 1, 2, 3], "pair_loss": [0]}[op]  # the loss: one "row"
    good = [row not in bad_rows for row in range(first.numel())]
    assert torch.isnan(first.reshape(-1)).tolist() == [not ok for ok in good]
    for other in others:
        assert torch.isfinite(other[good]).all()
    match = {"dist_moments": "logits contains NaN", "gaussian_kl": r"target must lie in \[0, 1\]",
             "pair_loss": "target_chosen .* row 2 sums to 2"}[op]
    with pytest.raises(ValueError, match=match):
        bad_value_calls(z, t, backend, validate=True)[op]()


def test_the_kernels_label_sum_tolerance_is_the_reference_one():
    assert dist_head.LABEL_SUM_TOLERANCE.value == ops.reference.LABEL_SUM_TOLERANCE


def test_one_used_moment_gets_its_gradient_alone():
    """An unused output of dist_moments passes no gradient (none is materialised), in both kernels' branches."""
    logits = torch.randn(6, 10, device=DEVICE, dtype=torch.float64, requires_grad=True)
    for pick in (0, 1):
        fused = torch.autograd.grad(ops.dist_moments(logits, backend="triton")[pick].sum(), logits)[0]
        eager = torch.autograd.grad(ops.dist_moments(logits, backend="eager")[pick].sum(), logits)[0]
        torch.testing.assert_close(fused, eager)


def test_a_retained_pair_loss_graph_gives_the_same_gradient_twice():
    """backward scales the saved gradients into new tensors, so a second pass does not scale them again."""
    chosen, rejected = (torch.randn(5, 10, device=DEVICE, requires_grad=True) for _ in range(2))
    targets = torch.rand(5, device=DEVICE), torch.rand(5, device=DEVICE)
    loss = 3.0 * ops.pair_loss(chosen, rejected, *targets, backend="triton")
    first = torch.autograd.grad(loss, (chosen, rejected), retain_graph=True)
    second = torch.autograd.grad(loss, (chosen, rejected))
    expected = torch.autograd.grad(3.0 * ops.pair_loss(chosen, rejected, *targets, backend="eager"), (chosen, rejected))
    for a, b, c in zip(first, second, expected):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_the_kernel_module_knows_nothing_of_ops():
    """kernels/ sit below distreward.ops: dist_head imports only torch and triton (the loss kind comes as a row of
    ops.LOSS_KIND_TABLE)."""
    tree = ast.parse(Path(dist_head.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"torch", "triton"}, imported


@pytest.mark.skipif(DEVICE != "cuda", reason="backend='auto' picks the Triton kernels for CUDA tensors only")
def test_auto_backend_uses_the_kernels_on_cuda():
    logits = torch.randn(8, 10, device="cuda", requires_grad=True)
    assert type(ops.dist_moments(logits)[0].grad_fn).__name__ == "DistMomentsFunctionBackward"
