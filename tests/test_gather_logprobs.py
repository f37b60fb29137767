"""The fused rollout log-prob gathers (``backend="cpp"``: csrc/logprobs.cpp, ``backend="triton"``:
kernels/logprobs.py) against the eager reference: values and gradients over V, odd B and T, dtypes,
logit magnitudes, -inf logits, memory layouts and masks; float64 gradchecks; what autograd saves; bad
ids and shapes, through ``ops.gather_logprobs`` and straight into the extension. CI runs the Triton
kernels on the CPU with TRITON_INTERPRET=1."""
import os
from dataclasses import dataclass

import pytest
import torch
from devices import TRITON_DEVICE

from distreward import ops
from distreward.ops import cpp as cpp_logprobs
from distreward.ops import logprobs as fused_logprobs
from distreward.ops import registry

triton_logprobs = pytest.importorskip("distreward.kernels.logprobs")

DEVICES = {"cpp": "cpu", "triton": TRITON_DEVICE}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


@dataclass
class Case:
    batch: int
    steps: int
    vocab: int
    dtype: torch.dtype
    scale: float  # logits ~ scale * N(0, 1)
    layout: str  # "contiguous", "strided" (every other vocab entry), "transposed" ([T, B, V].transpose) or "expanded"
    mask: str  # "none", "full" (all ones) or "partial" (about 1/3 zeros, masked rows all -inf)
    neg_inf: bool = False  # -inf logits inside live rows, the first chunk of some rows entirely

    def __str__(self):
        return (f"B{self.batch}-T{self.steps}-V{self.vocab}-{str(self.dtype)[6:]}-x{self.scale:g}-{self.layout}"
                f"-mask_{self.mask}{'-neginf' if self.neg_inf else ''}")


CASES = [
    Case(3, 5, 2, torch.float32, 1.0, "contiguous", "partial"),
    Case(3, 7, 1000, torch.float16, 30.0, "transposed", "none"),
    Case(3, 5, 1000, torch.bfloat16, 1e4, "strided", "partial", neg_inf=True),
    Case(5, 3, 1000, torch.float32, 1e4, "expanded", "full"),
    Case(3, 5, 5000, torch.float32, 3.0, "contiguous", "partial", neg_inf=True),
    Case(3, 5, 49152, torch.float32, 1e4, "transposed", "partial"),
    Case(3, 3, 49152, torch.bfloat16, 3.0, "contiguous", "full", neg_inf=True),
    Case(1, 5, 49152, torch.float16, 1.0, "strided", "partial"),
]


def make_inputs(case: Case, device: str, generator: torch.Generator):
    """(logits [B, T, V] in ``case.layout`` requiring grad, ids [B, T] int64, mask [B, T] bool or None)."""
    b, t, v = case.batch, case.steps, case.vocab
    values = torch.randn(b, t, v, generator=generator) * case.scale
    ids = torch.randint(0, v, (b, t), generator=generator)
    mask = None if case.mask == "none" else torch.ones(b, t, dtype=torch.bool)
    if case.mask == "partial":
        mask[:, ::3] = False
        mask[-1, -1] = True
        values[~mask] = float("-inf")  # masked rows never count, even when they hold no distribution
        ids[0, 0] = -1  # masked out-of-vocabulary id: must be ignored, never read
    if case.neg_inf:
        values[:, :, : v // 2] = float("-inf")  # half the vocabulary filtered out (top-k / top-p style)
        values[:, :, 0] = 0.0  # and an all -inf stretch that starts after the first entry
        ids = torch.where(ids < v // 2, ids + v // 2, ids)
    if case.layout == "strided":
        storage = torch.zeros(b, t, 2 * v, dtype=case.dtype)
        storage[..., ::2] = values.to(case.dtype)
        logits = storage[..., ::2]
    elif case.layout == "transposed":
        logits = values.transpose(0, 1).contiguous().to(case.dtype).transpose(0, 1)
    elif case.layout == "expanded":
        values[1:] = values[0]
        ids[1:] = ids[0]
        logits = values[:1].to(case.dtype).expand(b, t, v)
    else:
        logits = values.to(case.dtype)
    assert logits.is_contiguous() == (case.layout == "contiguous")
    logits = logits.to(device).detach().requires_grad_(True)
    return logits, ids.to(device), None if mask is None else mask.to(device)


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol = GRAD_RTOL[expected.dtype]
    atol = rtol * float(expected.abs().max()) + 1e-30
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_eager(case, backend):
    g = torch.Generator().manual_seed(case.batch * case.steps + case.vocab)
    logits, ids, mask = make_inputs(case, DEVICES[backend], g)
    expected = ops.gather_logprobs(logits, ids, mask, backend="eager")
    actual = ops.gather_logprobs(logits, ids, mask, backend=backend)
    assert actual.dtype == torch.float32 and actual.shape == (case.batch, case.steps)
    # Both sides compute in fp32 from the same values; |logp| reaches ~2 * scale.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert bool((actual[~mask] == 0).all())
    upstream = torch.randn(case.batch, case.steps, generator=g).to(logits.device)
    (grad,) = torch.autograd.grad(expected, logits, upstream)
    (fused_grad,) = torch.autograd.grad(actual, logits, upstream)
    assert_grads_close(fused_grad, grad)
    if mask is not None:
        assert bool((fused_grad.expand(logits.shape)[~mask] == 0).all())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_rows_spanning_many_chunks(backend, monkeypatch):
    """Triton's online max / sum-exp merges across chunks too (the C++ one does at V > 2048 above)."""
    monkeypatch.setattr(triton_logprobs, "INTERPRETER_BLOCK_V", 256)
    case = Case(2, 3, 1000, torch.float32, 10.0, "contiguous", "partial", neg_inf=True)
    logits, ids, mask = make_inputs(case, DEVICES[backend], torch.Generator().manual_seed(3))
    logits.data[0, 1, 600:] += 50.0  # the running max rises in a later chunk
    expected = ops.gather_logprobs(logits, ids, mask, backend="eager")
    torch.testing.assert_close(ops.gather_logprobs(logits, ids, mask, backend=backend), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gradcheck_float64(backend, layout):
    case = Case(2, 3, 7, torch.float64, 2.0, layout, "partial")
    logits, ids, mask = make_inputs(case, DEVICES[backend], torch.Generator().manual_seed(5))
    logits.data[~mask] = 0.0  # finite differences need finite masked rows
    assert torch.autograd.gradcheck(lambda x: ops.gather_logprobs(x, ids, mask, backend=backend), (logits,))
    assert ops.gather_logprobs(logits, ids, mask, backend=backend).dtype == torch.float64


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_autograd_saves_no_vocab_sized_tensor(backend):
    """Besides the logits themselves, only [B, T] tensors are kept for backward."""
    logits, ids, mask = make_inputs(Case(3, 5, 1000, torch.float32, 1.0, "contiguous", "partial"),
                                    DEVICES[backend], torch.Generator().manual_seed(7))
    out = ops.gather_logprobs(logits, ids, mask, backend=backend)
    saved = out.grad_fn.saved_tensors
    assert any(s.data_ptr() == logits.data_ptr() for s in saved)
    assert all(s.data_ptr() == logits.data_ptr() or s.numel() == 3 * 5 for s in saved)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_in_place_into_the_logits(backend, dtype):
    """``gather_logprobs_backward(..., in_place=True)`` overwrites the logits with their gradient."""
    kernels = cpp_logprobs if backend == "cpp" else triton_logprobs
    case = Case(3, 5, 1000, dtype, 5.0, "contiguous", "partial", neg_inf=True)
    logits, ids, mask = make_inputs(case, DEVICES[backend], torch.Generator().manual_seed(8))
    logits = logits.detach()
    upstream = torch.randn(3, 5, device=logits.device)
    logp, lse = kernels.gather_logprobs_forward(logits, ids, mask)
    expected = kernels.gather_logprobs_backward(upstream, logits, ids, mask, lse)
    assert kernels.gather_logprobs_backward(upstream, logits, ids, mask, lse, in_place=True) is logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gather_logprobs_backward(upstream.T, logits.transpose(0, 1), ids.T, mask.T, lse.T, in_place=True)


def test_auto_uses_the_cpp_extension_on_cpu(monkeypatch):
    calls = []
    cpp_gather = fused_logprobs.GATHER["cpp"]
    monkeypatch.setitem(fused_logprobs.GATHER, "cpp", lambda *args: calls.append(args) or cpp_gather(*args))
    logits = torch.randn(2, 3, 11, requires_grad=True)
    out = ops.gather_logprobs(logits, torch.randint(0, 11, (2, 3)), backend="auto")
    assert len(calls) == 1 and "distreward_gather_logprobs_forward" in out.grad_fn.name()


def test_cpp_many_rows_in_parallel_and_empty_batches():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(64, 33, 300, generator=g)
    ids = torch.randint(0, 300, (64, 33), generator=g)
    mask = torch.rand(64, 33, generator=g) > 0.5
    expected = ops.gather_logprobs(logits, ids, mask, backend="eager")
    torch.testing.assert_close(ops.gather_logprobs(logits, ids, mask, backend="cpp"), expected)
    empty = ops.gather_logprobs(torch.randn(0, 4, 9), torch.zeros(0, 4, dtype=torch.long), backend="cpp")
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_int32_ids_and_numeric_masks(backend):
    device = DEVICES[backend]
    logits = torch.randn(2, 3, 11, device=device)
    ids = torch.randint(0, 11, (2, 3), device=device)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], device=device)
    expected = ops.gather_logprobs(logits, ids, mask.bool(), backend="eager")
    torch.testing.assert_close(ops.gather_logprobs(logits, ids.int(), mask, backend=backend), expected)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bad_ids_name_the_position(backend):
    device = DEVICES[backend]
    logits = torch.randn(2, 3, 11, device=device)
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    ids[1, 2] = 11
    with pytest.raises(IndexError, match=r"ids\[1, 2\] = 11"):
        ops.gather_logprobs(logits, ids, backend=backend, validate=True)
    ids[1, 2] = -1
    with pytest.raises(IndexError, match=r"ids\[1, 2\] = -1"):
        ops.gather_logprobs(logits, ids, backend=backend, validate=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_bad_shapes_and_dtypes_raise_value_error(backend):
    device = DEVICES[backend]
    logits, ids = torch.randn(2, 3, 11, device=device), torch.zeros(2, 3, dtype=torch.long, device=device)
    bad_calls = {
        "logits": (torch.randn(6, 11, device=device), ids, None),
        "ids has shape": (logits, ids[:, :2], None),
        "ids must be": (logits, ids.float(), None),
        "mask must be": (logits, ids, torch.ones(3, 2, dtype=torch.bool, device=device)),
        "NaN": (torch.full((2, 3, 11), float("nan"), device=device), ids, None),
    }
    for message, args in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            ops.gather_logprobs(*args, backend=backend, validate=True)


def test_extension_rechecks_its_inputs():
    """Called directly through the dispatcher, the C++ ops raise ValueError / IndexError naming the problem
    instead of reading outside the logits."""
    forward, backward = torch.ops.distreward.gather_logprobs_forward, torch.ops.distreward.gather_logprobs_backward
    logits = torch.randn(2, 3, 11)
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    lse = torch.zeros(2, 3)
    ids[0, 1] = 11
    with pytest.raises(IndexError, match=r"^ids\[0, 1\] = 11 is outside the vocabulary \[0, 11\)$"):
        forward(logits, ids, mask)
    with pytest.raises(IndexError, match=r"ids\[0, 1\] = 11"):
        backward(torch.ones(2, 3), logits, ids, mask, lse)
    mask[0, 1] = False  # a masked bad id is never read
    assert float(forward(logits, ids, mask)[0][0, 1]) == 0.0
    bad_calls = {
        "ids must be int64": (logits, ids.int(), mask),
        "ids must be int64": (logits, ids.float(), mask),
        r"ids must be \[B, T\] = \[2, 3\], got \[2, 2\]": (logits, ids[:, :2], mask),
        r"mask must be a bool tensor of shape \[2, 3\]": (logits, ids, mask.float()),
        r"logits must be \[B, T, V\], got shape \[3, 11\]": (logits[0], ids, mask),
        "non-empty vocabulary": (torch.randn(2, 3, 0), ids, mask),
        "logits must be float": (logits.long(), ids, mask),
        r"logits\[1, 2\] contains NaN": (logits.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"))), ids, mask),
    }
    for message, args in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            forward(*args)
    with pytest.raises(ValueError, match="lse must be float32"):
        backward(torch.ones(2, 3), logits, ids, mask, lse.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_ops_pass_opcheck(dtype):
    """The schema, fake (meta) implementations and registered autograd agree with the C++ kernels."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 7, generator=g).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    grad = torch.randn(2, 3, generator=g)
    for mask in (torch.tensor([[True, False, True], [True, True, False]]), None):  # None: every row live
        torch.library.opcheck(torch.ops.distreward.gather_logprobs_forward, (logits, ids, mask))
        lse = torch.ops.distreward.gather_logprobs_forward(logits, ids, mask)[1].detach()
        torch.library.opcheck(torch.ops.distreward.gather_logprobs_backward, (grad, logits.detach(), ids, mask, lse))
        torch.library.opcheck(torch.ops.distreward.gather_logprobs_backward_,
                              (grad, logits.detach().clone(), ids, mask, lse))


def test_torch_compile_traces_the_public_gather_in_one_graph():
    """fullgraph=True: no graph break in the public call (validation included), same values and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, i, m: ops.gather_logprobs(x, i, m, backend="cpp"), fullgraph=True,
                             backend="aot_eager")
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 5, 33, generator=g, requires_grad=True)
    ids, mask = torch.randint(0, 33, (2, 5), generator=g), torch.rand(2, 5, generator=g) > 0.3
    expected = ops.gather_logprobs(logits, ids, mask, backend="eager")
    actual = compiled(logits, ids, mask)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(torch.autograd.grad(actual.sum(), logits)[0],
                               torch.autograd.grad(expected.sum(), logits)[0])
    ids[1, 4], mask[1, 4] = 40, True
    with pytest.raises(IndexError, match=r"ids\[1, 4\] = 40"):  # the kernel's own check runs in the graph
        compiled(logits, ids, mask)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_bad_values_are_found_on_the_kernels_output(backend):
    """NaN / +inf in a live row, or a live row of only -inf, raise ValueError naming the row; the same in a
    masked row is ignored. No extra pass over the logits: the row's logsumexp shows it."""
    device = "cpu" if backend == "eager" else DEVICES[backend]
    ids, mask = torch.zeros(2, 3, dtype=torch.long, device=device), torch.ones(2, 3, dtype=torch.bool, device=device)
    for bad in (float("nan"), float("inf")):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(2, 3, 3000, device=device).to(dtype)
            logits[1, 2, 2500] = bad  # in a later chunk than the picked id
            with pytest.raises(ValueError, match=r"logits\[1, 2\] contains NaN or \+inf"):
                ops.gather_logprobs(logits, ids, mask, backend=backend, validate=True)
            mask[1, 2] = False
            assert bool(torch.isfinite(ops.gather_logprobs(logits, ids, mask, backend=backend, validate=True)).all())
            mask[1, 2] = True
    logits = torch.randn(2, 3, 3000, device=device)
    logits[0, 1] = float("-inf")
    logits[0, 1, 2100] = float("nan")  # a NaN among -inf: the C++ kernel skips chunks whose max is -inf
    with pytest.raises(ValueError, match=r"logits\[0, 1\]"):
        ops.gather_logprobs(logits, ids, mask, backend=backend, validate=True)
    logits[0, 1, 2100] = float("-inf")
    with pytest.raises(ValueError, match=r"logits\[0, 1\] .*no finite value"):
        ops.gather_logprobs(logits, ids, mask, backend=backend, validate=True)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_validate_false_leaves_bad_rows_nan_except_in_the_cpp_kernel(backend):
    """validate=False (the CUDA default) reads nothing back: a bad id or a NaN row gives NaN log-probs in that
    row only; the C++ kernel checks in its own loop whatever validate says."""
    device = "cpu" if backend == "eager" else DEVICES[backend]
    logits, ids = torch.randn(2, 3, 50, device=device), torch.zeros(2, 3, dtype=torch.long, device=device)
    logits[0, 1, 7] = float("nan")
    ids[1, 2] = 50
    if backend == "cpp":
        with pytest.raises(IndexError, match=r"ids\[1, 2\] = 50"):
            ops.gather_logprobs(logits, ids, backend=backend, validate=False)
        return
    logp = ops.gather_logprobs(logits, ids, backend=backend, validate=False)
    assert torch.isnan(logp).tolist() == [[False, True, False], [False, False, True]]



@pytest.mark.parametrize("backend", ["auto", "eager", "cpp", "triton"])
def test_empty_vocabulary_and_meta_tensors_raise_value_error(backend):
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        ops.gather_logprobs(torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="meta"):
        ops.gather_logprobs(torch.randn(2, 3, 5, device="meta"), torch.zeros(2, 3, dtype=torch.long, device="meta"),
                            backend=backend)


def test_unknown_or_misplaced_backends_raise_value_error():
    logits, ids = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.gather_logprobs(logits, ids, backend="cuda")
    assert registry.resolve("gather_logprobs", "cpp", torch.device("cpu")) == "cpp"
    with pytest.raises(ValueError, match="needs CPU tensors"):
        registry.resolve("gather_logprobs", "cpp", torch.device("cuda"))


def run_script(script: str, interpret: str) -> None:
    """Run ``script`` in a fresh interpreter (TRITON_INTERPRET is read at import) and expect it to print ok."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET=interpret)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_triton_and_eager_work_without_the_cpp_extension():
    """A failed C++ build (distreward._C does not import) leaves auto on eager and the Triton path working;
    an explicit backend='cpp' says why it is unavailable."""
    script = """
import sys, torch
sys.modules["distreward._C"] = None  # what a missing build looks like: the import raises ImportError
from distreward import ops, sequence_logprobs
from distreward.ops import registry
logits, ids = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
expected = ops.gather_logprobs(logits, ids, backend="eager")
torch.testing.assert_close(ops.gather_logprobs(logits, ids, backend="triton"), expected)
torch.testing.assert_close(ops.gather_logprobs(logits, ids, backend="auto"), expected)
assert registry.resolve("gather_logprobs", "auto", torch.device("cpu")) == "eager"
assert "distreward._C" in ops.backends("cpu")["cpp"] and ops.backends("cpu")["triton"] is None
try:
    ops.gather_logprobs(logits, ids, backend="cpp")
except ValueError as error:
    assert "not available" in str(error) and "distreward._C" in str(error), error
else:
    raise AssertionError("backend='cpp' ran without the extension")
print("ok")
"""
    run_script(script, interpret="1")


def test_triton_on_cpu_tensors_without_the_interpreter_is_refused_before_any_work():
    """Compiled Triton takes only CUDA tensors: the registry refuses CPU ones up front, so
    sequence_logprobs raises before its model forward (not from inside a checkpointed chunk)."""
    script = """
import torch
from distreward.ops import registry
try:
    registry.resolve("gather_logprobs", "triton", torch.device("cpu"))
except ValueError as error:
    assert "needs CUDA tensors" in str(error), error
else:
    raise AssertionError("backend='triton' was accepted for CPU tensors without the interpreter")
print("ok")
"""
    run_script(script, interpret="0")
