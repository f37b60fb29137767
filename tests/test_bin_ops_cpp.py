"""The C++ bin ops (csrc/bin_ops.cpp, ``backend="cpp"``) against the eager reference: values and gradients on
random and adversarial inputs, fp64 gradcheck, ``torch.library.opcheck``, the ``validate`` contract and
thread-count independence.

Tolerances: fp32 values rtol 1e-5 (atol 1e-6), gradients atol 1e-6 on the gradient of the *sum* of the losses
(the pair loss's mean gradient scaled by N); bf16 / fp16 inputs compute in fp32 like the reference, gradients
come back in the input dtype (rtol 1e-2); fp64 gradcheck at its defaults.
"""
import pytest
import torch

from distreward import ops
from distreward.ops import reference

pytestmark = pytest.mark.skipif(ops.backends("cpu")["cpp"] is not None, reason="the C++ extension did not build")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def logits(n, k, dtype=torch.float32, scale=2.0, seed=0):
    return (torch.randn(n, k, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).requires_grad_()


def labels(n, k, form, seed=10):
    """(target_chosen, target_rejected, sigma) for the label form "means", "row sigma", "q" or "mixed" (q on the
    chosen side, means with a per-row width on the rejected one)."""
    g = _gen(seed)
    means = (torch.rand(n, generator=g), torch.rand(n, generator=g))
    widths = (torch.rand(n, generator=g) * 0.3 + 0.02, torch.rand(n, generator=g) * 0.3 + 0.02)
    q = (torch.softmax(torch.randn(n, k, generator=g) * 2, -1), torch.softmax(torch.randn(n, k, generator=g) * 2, -1))
    return {"means": (*means, 0.1), "row sigma": (*means, widths), "q": (*q, 0.1),
            "mixed": (q[0], means[1], (0.2, widths[1]))}[form]


def both(fn, *leaves):
    """fn's outputs and gradients of their sum w.r.t. ``leaves`` for backend cpp and eager."""
    results = {}
    for backend in ("cpp", "eager"):
        out = fn(backend)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves)
        results[backend] = (outs, grads)
    return results


def assert_close(results, rtol=1e-5, atol=1e-6, grad_scale=1.0, grad_rtol=1e-5):
    (outs, grads), (ref_outs, ref_grads) = results["cpp"], results["eager"]
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == ref.dtype and grad.shape == ref.shape
        torch.testing.assert_close(grad.double() * grad_scale, ref.double() * grad_scale, rtol=grad_rtol, atol=atol)


@pytest.mark.parametrize("form", ["means", "row sigma", "q", "mixed"])
@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
@pytest.mark.parametrize("n, k", [(37, 10), (300, 3), (17, 17)])
def test_pair_loss_matches_eager(kind, form, n, k):
    zc, zr = logits(n, k, seed=1), logits(n, k, seed=2)
    tc, tr, sigma = labels(n, k, form)
    temperature = 1.0 if kind == "dpl" else 0.7
    results = both(lambda b: ops.pair_loss(zc, zr, tc, tr, kind=kind, sigma=sigma, score_weight=0.8,
                                           temperature=temperature, backend=b), zc, zr)
    assert_close(results, grad_scale=n)


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_pair_loss_large_logits_and_zero_score_weight(kind):
    """Logits of +-1e4 (one-hot softmax: dpl's sum underflows in linear space and is redone in log space)."""
    zc, zr = logits(64, 10, scale=1e4, seed=3), logits(64, 10, scale=1e4, seed=4)
    tc, tr, _ = labels(64, 10, "means")
    for weight in (1.0, 0.0):
        results = both(lambda b: ops.pair_loss(zc, zr, tc, tr, kind=kind, score_weight=weight, backend=b), zc, zr)
        assert torch.isfinite(results["cpp"][0][0]).all()
        assert_close(results, rtol=1e-5, grad_scale=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    zc, zr, z = logits(41, 10, dtype, seed=5), logits(41, 10, dtype, seed=6), logits(41, 10, dtype, seed=7)
    tc, tr, _ = labels(41, 10, "means")
    for kind in ops.LOSS_KINDS:
        assert_close(both(lambda b: ops.pair_loss(zc, zr, tc, tr, kind=kind, backend=b), zc, zr),
                     grad_scale=41, grad_rtol=1e-2, atol=1e-3)
    assert_close(both(lambda b: ops.dist_moments(z, backend=b), z), grad_rtol=1e-2, atol=1e-3)
    assert_close(both(lambda b: ops.gaussian_kl(z, tc, backend=b), z), grad_rtol=1e-2, atol=1e-3)


def test_non_contiguous_inputs():
    base_c, base_r = logits(20, 30, seed=8), logits(30, 20, seed=9)
    zc, zr = base_c[:, ::3], base_r.t()[:20, :10]  # [20, 10]: strided bins; transposed
    assert not zc.is_contiguous() and not zr.is_contiguous()
    q = torch.softmax(torch.randn(10, 40, generator=_gen(11)), 0).t()[::2]  # [20, 10], columns strided
    tr = torch.rand(40, generator=_gen(12))[::2]
    sigma = (torch.rand(40, generator=_gen(13)) * 0.2 + 0.05)[1::2]
    for kind in ops.LOSS_KINDS:
        assert_close(both(lambda b: ops.pair_loss(zc, zr, q, tr, kind=kind, sigma=sigma, backend=b), base_c, base_r),
                     grad_scale=20)
    assert_close(both(lambda b: ops.dist_moments(zc, backend=b), base_c))
    assert_close(both(lambda b: ops.gaussian_kl(zr, tr, sigma, backend=b), base_r))


@pytest.mark.parametrize("form", ["means", "row sigma", "q"])
def test_gaussian_kl_and_moments_match_eager(form):
    z = logits(53, 10, seed=14)
    target, _, sigma = labels(53, 10, form)
    sigma = sigma[0] if isinstance(sigma, tuple) else sigma
    centers = torch.linspace(-1, 2, 10)
    assert_close(both(lambda b: ops.gaussian_kl(z, target, sigma, centers=centers, backend=b), z))
    assert_close(both(lambda b: ops.dist_moments(z, centers=centers, backend=b), z))
    assert_close(both(lambda b: ops.dist_moments(z, backend=b)[0], z))  # std unused: no gradient for it


def test_label_distributions_with_zero_and_subnormal_entries():
    """log q of a given q through the kernels' own log: exact zeros (their terms count 0) and subnormals."""
    z = logits(6, 4, seed=29)
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0], [1e-40, 1.0, 0.0, 0.0], [1e-30, 1e-20, 0.25, 0.75],
                      [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert_close(both(lambda b: ops.gaussian_kl(z, q, backend=b), z))


def test_one_hot_rows_have_std_zero_and_a_finite_gradient():
    z = torch.tensor([[0.0, -1e4, -1e4], [1.0, 2.0, 3.0]], requires_grad=True)
    assert_close(both(lambda b: ops.dist_moments(z, backend=b), z))


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_gradcheck_fp64(kind):
    zc, zr = logits(6, 4, torch.float64, seed=15), logits(6, 4, torch.float64, seed=16)
    g = _gen(17)
    tc, tr = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1), torch.rand(6, generator=g,
                                                                                                dtype=torch.float64)
    sigma = (0.3, torch.rand(6, generator=g, dtype=torch.float64) * 0.3 + 0.1)
    assert torch.autograd.gradcheck(lambda a, b: ops.pair_loss(a, b, tc, tr, kind=kind, sigma=sigma, backend="cpp"),
                                    (zc, zr))


def test_gradcheck_fp64_row_ops():
    z = logits(6, 5, torch.float64, seed=18)
    g = _gen(19)
    target = torch.rand(6, generator=g, dtype=torch.float64)
    sigma = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    q = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda a: ops.dist_moments(a, backend="cpp"), (z,))
    assert torch.autograd.gradcheck(lambda a: ops.gaussian_kl(a, target, sigma, backend="cpp"), (z,))
    assert torch.autograd.gradcheck(lambda a: ops.gaussian_kl(a, q, backend="cpp"), (z,))


def test_opcheck():
    from distreward.ops import cpp_bins  # noqa: F401  (registers the fakes and autograd)

    distreward = torch.ops.distreward
    z, z2 = logits(9, 5, seed=20), logits(9, 5, seed=21)
    centers, target, sigma = ops.bin_centers(5), torch.rand(9, generator=_gen(22)), torch.rand(9) * 0.2 + 0.05
    q = torch.softmax(torch.randn(9, 5, generator=_gen(23)), -1)
    cases = [
        (distreward.bin_moments_forward.default, (z, centers, False)),
        (distreward.bin_moments_backward.default, (torch.rand(9), None, z.detach(), centers)),
        (distreward.bin_gaussian_kl_forward.default, (z, target, sigma, 0.1, centers, False)),
        (distreward.bin_gaussian_kl_forward.default, (z, q, None, 0.1, centers, False)),
        (distreward.bin_gaussian_kl_backward.default, (torch.rand(9), z.detach(), target, None, 0.1, centers)),
        (distreward.bin_pair_loss_backward.default, (torch.tensor(2.0), torch.rand(9, 5), torch.rand(9, 5),
                                                     torch.bfloat16)),
    ]
    for kind in ops.LOSS_KINDS:
        cases.append((distreward.bin_pair_loss_forward.default,
                      (z, z2, q, target, None, sigma, 0.1, 1.0, centers, kind, 1.0, 1.0, True, False)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_traces_the_public_bin_ops_in_one_graph():
    """fullgraph=True (aot_eager: the fakes and the registered backward, without inductor's compile time)."""
    torch._dynamo.reset()
    zc, zr = logits(33, 10, seed=30), logits(33, 10, seed=31)
    tc, tr, sigma = labels(33, 10, "mixed")

    def loss(a, b, backend):
        mean, std = ops.dist_moments(a, backend=backend)
        kl = ops.gaussian_kl(b, tr, backend=backend)
        return ops.pair_loss(a, b, tc, tr, sigma=sigma, backend=backend) + kl.sum() + mean.sum() + std.sum()

    compiled = torch.compile(lambda a, b: loss(a, b, "cpp"), fullgraph=True, backend="aot_eager")
    actual, expected = compiled(zc, zr), loss(zc, zr, "eager")
    torch.testing.assert_close(actual, expected)
    for grad, ref in zip(torch.autograd.grad(actual, (zc, zr)), torch.autograd.grad(expected, (zc, zr))):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_auto_picks_cpp_on_cpu_and_the_result_does_not_depend_on_the_thread_count():
    n = 40000  # above the size the kernels go parallel at
    zc, zr = logits(n, 10, seed=24), logits(n, 10, seed=25)
    tc, tr, _ = labels(n, 10, "means")
    loss = ops.pair_loss(zc, zr, tc, tr)
    assert "distreward_bin_pair_loss" in type(loss.grad_fn).__name__
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = ops.pair_loss(zc, zr, tc, tr, kind="bt_kl")
            runs.append((out, *torch.autograd.grad(out, (zc, zr)), *ops.dist_moments(zc)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def bad_cases(n=12, k=10):
    """name -> (call taking validate, message the public op raises under validate=True)."""
    z, zr = logits(n, k, seed=26).detach(), logits(n, k, seed=27).detach()
    nan_z = z.clone()
    nan_z[3, 4] = float("nan")
    g = _gen(28)
    q, target = torch.softmax(torch.randn(n, k, generator=g), -1), torch.rand(n, generator=g)
    bad_q = q.clone()
    bad_q[5] *= 1.5
    outside = target.clone()
    outside[2] = 1.5
    sigma = torch.rand(n, generator=g) * 0.2 + 0.05
    bad_sigma = sigma.clone()
    bad_sigma[7] = 0.0
    return {
        "pair_loss NaN logits": (lambda v: ops.pair_loss(nan_z, zr, target, target, validate=v),
                                 "logits_chosen contains NaN"),
        "pair_loss bad q row": (lambda v: ops.pair_loss(z, zr, bad_q, target, validate=v),
                                r"target_chosen .* row 5 sums to"),
        "pair_loss target outside": (lambda v: ops.pair_loss(z, zr, q, outside, kind="dpl", validate=v),
                                     r"target_rejected must lie in \[0, 1\]"),
        "pair_loss bad row sigma": (lambda v: ops.pair_loss(z, zr, target, target, sigma=(sigma, bad_sigma),
                                                            validate=v), r"sigma\[1\] must be positive"),
        "dist_moments NaN logits": (lambda v: ops.dist_moments(nan_z, validate=v)[0], "logits contains NaN"),
        "gaussian_kl bad q row": (lambda v: ops.gaussian_kl(z, bad_q, validate=v), r"target .* row 5 sums to"),
    }


@pytest.mark.parametrize("name", list(bad_cases()))
def test_bad_input_raises_under_validate_and_is_nan_without(name):
    call, message = bad_cases()[name]
    with pytest.raises(ValueError, match=message):
        call(True)
    with pytest.raises(ValueError, match=message):
        call(None)  # the CPU default validates
    result = call(False)
    assert torch.isnan(result).any()
    if result.dim():  # per-row results: only the bad row is NaN
        assert int(torch.isnan(result).sum()) == 1


def test_the_kernels_own_flag_is_what_raises():
    """Called directly, the op raises its own ValueError under validate and returns NaN without."""
    from distreward.ops import cpp_bins

    z = torch.randn(4, 10)
    z[1, 0] = float("inf")
    centers = ops.bin_centers(10)
    with pytest.raises(ValueError, match=cpp_bins.BAD_VALUES):
        torch.ops.distreward.bin_moments_forward(z, centers, True)
    mean, std = torch.ops.distreward.bin_moments_forward(z, centers, False)
    assert torch.isnan(mean[1]) and torch.isfinite(mean[[0, 2, 3]]).all()
    assert torch.equal(mean.isnan(), reference.dist_moments(z, centers)[0].isnan())
