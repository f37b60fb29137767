"""The eager reference ops (docs/math.md §1-4) pinned independently: hand-computed cases, a NumPy/SciPy
computation of the same formulas, float64 gradcheck, and every bad-input case of docs/math.md §6."""
import math

import numpy as np
import pytest
import torch
from devices import TRITON_DEVICE
from scipy.special import log_softmax as np_log_softmax
from scipy.special import logsumexp as np_logsumexp

from distreward import ops
from distreward.ops import registry


def numpy_moments(z, c):
    p = np.exp(np_log_softmax(z, axis=-1))
    mean = (p * c).sum(-1)
    return mean, np.sqrt((p * (c - mean[:, None]) ** 2).sum(-1))


def numpy_gaussian_kl(z, mu, sigma, c):
    q = np.exp(-((c[None] - mu[:, None]) ** 2) / (2 * sigma**2))
    q /= q.sum(-1, keepdims=True)
    log_p = np_log_softmax(z, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - log_p), 0.0)
    return terms.sum(-1)


def numpy_pair_loss(zc, zr, mc, mr, kind, sigma, weight, c):
    if kind == "dpl":
        pc, pr = np.exp(np_log_softmax(zc, axis=-1)), np.exp(np_log_softmax(zr, axis=-1))
        k = c.shape[0]
        w = np.tril(np.ones((k, k)), -1) + 0.5 * np.eye(k)
        pref = -np.log(np.einsum("ni,ij,nj->n", pc, w, pr))
    else:
        ec, er = numpy_moments(zc, c)[0], numpy_moments(zr, c)[0]
        pref = np.log1p(np.exp(-(ec - er)))
    if kind != "bt_mean":
        pref = pref + weight * 0.5 * (numpy_gaussian_kl(zc, mc, sigma, c) + numpy_gaussian_kl(zr, mr, sigma, c))
    return pref.mean()


def numpy_gather(z, ids):
    log_p = z - np_logsumexp(z, axis=-1, keepdims=True)
    return np.take_along_axis(log_p, ids[..., None], -1)[..., 0]


# ---------------------------------------------------------------- hand-computed cases

def test_bin_centers_are_linspace_0_1():
    c = ops.bin_centers(10)
    assert c.dtype == torch.float32 and c.shape == (10,)
    assert c[0] == 0 and c[-1] == 1
    torch.testing.assert_close(c[1] - c[0], torch.tensor(1 / 9))


def test_uniform_logits_give_the_mean_of_the_centers():
    c = ops.bin_centers(10)
    mean, std = ops.dist_moments(torch.zeros(3, 10), c, backend="eager")
    torch.testing.assert_close(mean, torch.full((3,), 0.5))
    torch.testing.assert_close(std, torch.full((3,), c.std(unbiased=False).item()))


def test_one_hot_distribution_has_zero_std_and_finite_gradient():
    logits = torch.full((2, 10), -1e4)
    logits[0, 3] = 1e4
    logits[1, 9] = 1e4
    logits.requires_grad_(True)
    mean, std = ops.dist_moments(logits, backend="eager")
    torch.testing.assert_close(mean, torch.tensor([3 / 9, 1.0]))
    assert torch.equal(std, torch.zeros(2))
    (mean + std).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_kl_of_the_label_distribution_to_itself_is_zero():
    c, sigma = ops.bin_centers(10), 0.15
    target = torch.tensor([0.0, 0.37, 1.0])
    log_q = -(c - target[:, None]) ** 2 / (2 * sigma**2)  # logits whose softmax is q itself
    kl = ops.gaussian_kl(log_q, target, sigma, backend="eager")
    torch.testing.assert_close(kl, torch.zeros(3), atol=1e-6, rtol=0)


def test_pair_loss_of_equal_rows_is_log_2():
    logits = torch.randn(5, 10)
    for kind in ("bt_mean", "dpl"):  # dpl of equal rows: P(c > r) + P(tie) / 2 = 1/2 by symmetry
        loss = ops.pair_loss(logits, logits.clone(), kind=kind, backend="eager",
                             target_chosen=torch.rand(5), target_rejected=torch.rand(5), score_weight=0.0)
        torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))


def test_bt_kl_adds_the_weighted_mean_label_kl():
    zc, zr, tc, tr = torch.randn(4, 10), torch.randn(4, 10), torch.rand(4), torch.rand(4)
    pref = ops.pair_loss(zc, zr, tc, tr, kind="bt_mean", backend="eager")
    kl = 0.5 * (ops.gaussian_kl(zc, tc, 0.2, backend="eager") + ops.gaussian_kl(zr, tr, 0.2, backend="eager"))
    loss = ops.pair_loss(zc, zr, tc, tr, kind="bt_kl", sigma=0.2, score_weight=3.0, backend="eager")
    torch.testing.assert_close(loss, pref + 3.0 * kl.mean())


def test_better_chosen_gives_lower_loss():
    c = ops.bin_centers(10)
    high, low = 5 * c.expand(2, 10), -5 * c.expand(2, 10)
    right = ops.pair_loss(high, low, kind="bt_mean", backend="eager")
    wrong = ops.pair_loss(low, high, kind="bt_mean", backend="eager")
    assert right < math.log(2) < wrong


def test_gather_of_uniform_logits_is_minus_log_vocab():
    out = ops.gather_logprobs(torch.zeros(2, 3, 7), torch.randint(0, 7, (2, 3)), backend="eager")
    torch.testing.assert_close(out, torch.full((2, 3), -math.log(7)))


# ---------------------------------------------------------------- against NumPy

@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("num_bins", [2, 10, 33])
def test_moments_and_kl_match_numpy(scale, num_bins):
    g = torch.Generator().manual_seed(num_bins)
    z = torch.randn(64, num_bins, generator=g, dtype=torch.float64) * scale
    mu = torch.rand(64, generator=g, dtype=torch.float64)
    mu[:2] = torch.tensor([0.0, 1.0])
    c = ops.bin_centers(num_bins, dtype=torch.float64)
    mean, std = ops.dist_moments(z, c, backend="eager")
    np_mean, np_std = numpy_moments(z.numpy(), c.numpy())
    np.testing.assert_allclose(mean.numpy(), np_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), np_std, rtol=1e-8, atol=1e-12)
    for sigma in (0.02, 0.1, 1.0):
        kl = ops.gaussian_kl(z, mu, sigma, c, backend="eager")
        np.testing.assert_allclose(kl.numpy(), numpy_gaussian_kl(z.numpy(), mu.numpy(), sigma, c.numpy()),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_pair_loss_matches_numpy(kind):
    g = torch.Generator().manual_seed(1)
    zc, zr = (torch.randn(33, 10, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    tc, tr = (torch.rand(33, generator=g, dtype=torch.float64) for _ in range(2))
    c = ops.bin_centers(10, dtype=torch.float64)
    loss = ops.pair_loss(zc, zr, tc, tr, kind=kind, sigma=0.3, score_weight=2.0, centers=c, backend="eager")
    expected = numpy_pair_loss(zc.numpy(), zr.numpy(), tc.numpy(), tr.numpy(), kind, 0.3, 2.0, c.numpy())
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-10)


def test_gather_matches_numpy_with_mask():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 20
    ids = torch.randint(0, 17, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    out = ops.gather_logprobs(z, ids, mask, backend="eager")
    expected = np.where(mask.numpy(), numpy_gather(z.numpy(), ids.numpy()), 0.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    z = (torch.randn(16, 10) * 8).to(dtype)
    mean, std = ops.dist_moments(z, backend="eager")
    assert mean.dtype == std.dtype == torch.float32
    ref_mean, ref_std = ops.dist_moments(z.float(), backend="eager")
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std, ref_std)
    logp = ops.gather_logprobs(z.view(2, 8, 10), torch.zeros(2, 8, dtype=torch.long), backend="eager")
    assert logp.dtype == torch.float32


def test_masked_rows_of_minus_inf_give_zero_and_no_gradient():
    z = torch.randn(2, 3, 6, dtype=torch.float64)
    z[0, 1] = -math.inf
    z.requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    out = ops.gather_logprobs(z, torch.zeros(2, 3, dtype=torch.long), mask, backend="eager")
    assert out[0, 1] == 0
    out.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad[0, 1], torch.zeros(6, dtype=torch.float64))


# ---------------------------------------------------------------- gradients

def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    zc, zr = (torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tc, tr = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    c = ops.bin_centers(10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: ops.dist_moments(z, c, backend="eager"), (zc,))
    assert torch.autograd.gradcheck(lambda z: ops.gaussian_kl(z, tc, 0.1, c, backend="eager"), (zc,))
    for kind in ops.LOSS_KINDS:
        assert torch.autograd.gradcheck(
            lambda a, b: ops.pair_loss(a, b, tc, tr, kind=kind, centers=c, backend="eager"), (zc, zr))
    z = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids, mask = torch.randint(0, 11, (2, 3), generator=g), torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert torch.autograd.gradcheck(lambda x: ops.gather_logprobs(x, ids, mask, backend="eager"), (z,))


def test_gather_gradient_is_onehot_minus_softmax():
    z = torch.randn(2, 4, 9, requires_grad=True)
    ids = torch.randint(0, 9, (2, 4))
    upstream = torch.randn(2, 4)
    (ops.gather_logprobs(z, ids, backend="eager") * upstream).sum().backward()
    expected = upstream[..., None] * (torch.nn.functional.one_hot(ids, 9) - torch.softmax(z.detach(), -1))
    torch.testing.assert_close(z.grad, expected)


# ---------------------------------------------------------------- bad input (docs/math.md §6)

GOOD = torch.randn(4, 10)
TARGET = torch.rand(4)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.dist_moments(torch.randn(4, 10, 2)), "logits"),
    (lambda: ops.dist_moments(torch.randint(0, 3, (4, 10))), "logits"),
    (lambda: ops.dist_moments(torch.randn(4, 1)), "logits"),
    (lambda: ops.dist_moments(torch.tensor([[0.0, float("nan")]])), "logits"),
    (lambda: ops.dist_moments(GOOD, torch.linspace(0, 1, 9)), "centers"),
    (lambda: ops.dist_moments(GOOD, backend="cuda"), "backend"),
    (lambda: ops.pair_loss(GOOD[:, :1], GOOD[:, :1], kind="scalar_bt", backend="cpp"), "backend"),
    (lambda: ops.gaussian_kl(GOOD, TARGET + 1.0), "target"),
    (lambda: ops.gaussian_kl(GOOD, torch.rand(3)), "target"),
    (lambda: ops.gaussian_kl(GOOD, torch.full((4,), float("nan"))), "target"),
    (lambda: ops.gaussian_kl(GOOD, TARGET, sigma=0.0), "sigma"),
    (lambda: ops.gaussian_kl(GOOD, TARGET, sigma=float("nan")), "sigma"),
    (lambda: ops.pair_loss(GOOD, torch.randn(4, 9), TARGET, TARGET), "logits_chosen"),
    (lambda: ops.pair_loss(GOOD, GOOD, TARGET, -TARGET - 0.1), "target_rejected"),
    (lambda: ops.pair_loss(GOOD, GOOD, None, TARGET), "target_chosen"),
    (lambda: ops.pair_loss(GOOD, GOOD, TARGET, TARGET, kind="mse"), "kind"),
    (lambda: ops.pair_loss(GOOD, GOOD, TARGET, TARGET, score_weight=-1.0), "score_weight"),
    (lambda: ops.pair_loss(GOOD[:0], GOOD[:0], TARGET[:0], TARGET[:0]), "pair"),
    (lambda: ops.gather_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), "logits"),
    (lambda: ops.gather_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)), "ids"),
    (lambda: ops.gather_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3)), "ids"),
    (lambda: ops.gather_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(3, 2)), "mask"),
    (lambda: ops.bin_centers(1), "num_bins"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad_id", [-1, 5, 10**9])
def test_ids_outside_the_vocabulary_raise_index_error_naming_the_position(bad_id):
    ids = torch.zeros(2, 3, dtype=torch.long)
    ids[1, 2] = bad_id
    with pytest.raises(IndexError, match=r"ids\[1, 2\]"):
        ops.gather_logprobs(torch.randn(2, 3, 5), ids, backend="eager")


def test_bad_ids_at_masked_positions_are_ignored():
    ids = torch.tensor([[0, -100], [4, 1]])
    mask = torch.tensor([[1, 0], [1, 1]])
    out = ops.gather_logprobs(torch.randn(2, 2, 5), ids, mask, backend="eager")
    assert out[0, 1] == 0


def test_auto_keeps_rows_wider_than_the_fused_head_on_eager():
    dist_head = pytest.importorskip("distreward.kernels.dist_head")
    cuda = torch.device("cuda")  # what auto picks for CUDA tensors; none are made
    assert registry.resolve("pair_loss", "auto", cuda, dist_head.TRITON_MAX_BINS + 1) == "eager"
    assert registry.resolve("pair_loss", "auto", cuda, dist_head.TRITON_MAX_BINS) == "triton"


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_every_backend_of_pair_loss_matches_eager_or_is_refused(kind, backend):
    """Each name in ops.BACKENDS either computes the eager value or raises ValueError naming the backend."""
    g = torch.Generator().manual_seed(4)
    zc, zr, tc, tr = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g), torch.rand(5), torch.rand(5)
    expected = ops.pair_loss(zc, zr, tc, tr, kind=kind, backend="eager")
    if backend not in ("auto", *ops._PAIR_LOSS):
        with pytest.raises(ValueError, match="backend"):
            ops.pair_loss(zc, zr, tc, tr, kind=kind, backend=backend)
    else:
        on = device_of(backend)
        loss = ops.pair_loss(*(x.to(on) for x in (zc, zr, tc, tr)), kind=kind, backend=backend)
        torch.testing.assert_close(loss.cpu(), expected)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_unknown_loss_kind_raises_in_every_backend(backend):
    """Both through ops.pair_loss and from the backend's own implementation (the kernel launcher included)."""
    z, t = torch.randn(4, 10), torch.rand(4)
    with pytest.raises(ValueError, match="kind"):
        ops.pair_loss(z, z, t, t, kind="hinge", backend=backend)
    if backend in ops._PAIR_LOSS:
        if backend == "triton":
            pytest.importorskip("distreward.kernels.dist_head")
        with pytest.raises(ValueError, match="kind"):
            ops._PAIR_LOSS[backend](z, z, t, t, "hinge", 0.1, 1.0, ops.bin_centers(10), validate=False)


DIST_BACKENDS = [backend for backend in ops.BACKENDS if backend == "auto" or backend in ops._PAIR_LOSS]


def device_of(backend: str) -> str:
    """Where a backend's inputs live here: the Triton kernels take CUDA tensors unless interpreted."""
    if backend == "triton":
        pytest.importorskip("distreward.kernels.dist_head")
        return TRITON_DEVICE
    return "cpu"


def _with(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


@pytest.mark.parametrize("backend", DIST_BACKENDS)
@pytest.mark.parametrize("call, match", [  # call(backend, logits, target, centers), all on the backend's device
    (lambda b, z, t, c: ops.dist_moments(_with(z, (2, 3), float("inf")), backend=b), "logits contains"),
    (lambda b, z, t, c: ops.dist_moments(_with(z, 1, -float("inf")), backend=b), "logits has a row"),
    (lambda b, z, t, c: ops.dist_moments(z, _with(c, 4, float("nan")), backend=b), "centers"),
    (lambda b, z, t, c: ops.gaussian_kl(z, t, centers=_with(c, 0, -float("inf")), backend=b), "centers"),
    (lambda b, z, t, c: ops.gaussian_kl(z, _with(t, 3, 1.0001), backend=b), "target must lie"),
    (lambda b, z, t, c: ops.gaussian_kl(_with(z, (0, 0), -float("inf")), t, sigma=10.0, backend=b), "not finite"),
    (lambda b, z, t, c: ops.pair_loss(z, _with(z, (3, 9), float("nan")), t, t, kind="dpl", backend=b),
     "logits_rejected contains"),
    (lambda b, z, t, c: ops.pair_loss(z, z, t, _with(t, 0, float("inf")), backend=b), "target_rejected"),
    (lambda b, z, t, c: ops.pair_loss(z, z, t, _with(t, 0, -0.5), kind="dpl", backend=b), "target_rejected"),
    (lambda b, z, t, c: ops.pair_loss(z, z, kind="bt_mean", centers=_with(c, 1, float("inf")), backend=b), "centers"),
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy (the Triton interpreter) warns on the NaN
def test_bad_values_raise_value_error_naming_the_argument_in_every_backend(call, match, backend):
    on = device_of(backend)
    with pytest.raises(ValueError, match=match):
        call(backend, GOOD.to(on), TARGET.to(on), ops.bin_centers(10, device=on))


def test_valid_calls_make_no_extra_pass_over_their_inputs(monkeypatch):
    """The values are checked through the results (one read); the inputs are read again only to name a culprit."""
    def fail(*args):
        raise AssertionError("an input was scanned for bad values")

    monkeypatch.setattr(ops.check, "_check_no_nan_or_posinf", fail)
    z = _with(GOOD, (0, 1), -float("inf"))  # -inf logits are valid where the loss needs no probability there
    ops.dist_moments(z)
    ops.pair_loss(z, GOOD, TARGET, TARGET, kind="bt_mean")
    ops.pair_loss(GOOD, GOOD, TARGET, TARGET, kind="dpl")
    ops.gaussian_kl(GOOD, TARGET)


def test_targets_are_unused_and_unread_with_score_weight_zero():
    bad = torch.full((4,), 7.0)
    loss = ops.pair_loss(GOOD, GOOD, bad, bad, kind="bt_kl", score_weight=0.0, backend="eager")
    torch.testing.assert_close(loss, ops.pair_loss(GOOD, GOOD, kind="bt_mean", backend="eager"))
