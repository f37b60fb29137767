"""Every public op at its launch floor (issue #23): per public call on CPU, forward and backward, the fused
kernels launched (Triton launches, counted by wrapping the interpreter's launcher, and ``distreward::`` C++
ops), the other device ops dispatched (a ``TorchDispatchMode`` recording aten ops; views, which launch
nothing, left out), the allocations among them, and the host syncs (``item`` / ``is_nonzero`` / ``nonzero``
...). Each row is pinned exactly, so a future extra op or sync fails here.

``validate=False`` is what a CUDA call does by default (no host read); the CPU default validates, which
costs the C++ kernels nothing and the interpreted Triton kernels one flag read (see docs/performance.md).
``python tests/test_launch_floor.py`` prints the table.
"""
import contextlib
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from distreward import ops  # noqa: E402
from distreward.ops.registry import unavailable  # noqa: E402

TRITON = unavailable("triton", "cpu") is None
CPP = unavailable("cpp", "cpu") is None
SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "masked_select", "allclose"}
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}  # uninitialised: no kernel


class OpCounter(TorchDispatchMode):
    """Records every non-view aten op and ``distreward::`` op dispatched, and Triton launches (the ops the
    interpreter itself runs to emulate a launch are not the caller's and are left out)."""

    active = None

    def __init__(self):
        super().__init__()
        self.names, self.launches, self._inside_launch = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_launch and not func.is_view:
            self.names.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        OpCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        OpCounter.active = None
        return super().__exit__(*exc)

    def row(self) -> dict:
        """{"kernels": fused launches, "allocations": n, "ops": other device ops (sorted names), "syncs": n}."""
        names = [name for name in self.names if name.split(".")[1] not in SYNCS]
        kernels = self.launches + sum(name.startswith("distreward.") for name in names)
        others = [name.split(".")[1] for name in names if not name.startswith("distreward.")]
        return {"kernels": kernels, "allocations": sum(name in ALLOCATIONS for name in others),
                "ops": sorted(name for name in others if name not in ALLOCATIONS),
                "syncs": len(self.names) - len(names)}


@contextlib.contextmanager
def counting_triton_launches():
    """Wrap the Triton interpreter's launcher so the active OpCounter counts launches."""
    if not TRITON:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    launch = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        counter = OpCounter.active
        if counter is None:
            return launch(self, *args, **kwargs)
        counter.launches += 1
        counter._inside_launch += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            counter._inside_launch -= 1

    InterpretedFunction.run = counted
    try:
        yield
    finally:
        InterpretedFunction.run = launch


def measure(forward, inputs, grad_of=lambda out: out):
    """(forward row, backward row) of ``forward()`` -> outputs, the backward being the gradient of ``grad_of``'s
    outputs (upstream gradients made outside the count) with respect to ``inputs``."""
    forward()  # first call: caches (centers, imports) are filled outside the count
    with counting_triton_launches():
        with OpCounter() as counter:
            out = forward()
        forward_row = counter.row()
        wanted = [o for o in (grad_of(out) if isinstance(grad_of(out), tuple) else (grad_of(out),))]
        upstream = [torch.rand_like(o) for o in wanted]
        with OpCounter() as counter:
            torch.autograd.grad(wanted, inputs, upstream)
        return forward_row, counter.row()


def leaf(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(dtype).requires_grad_()


def bin_cases(backend: str, **options):
    """name -> (forward, inputs, grad_of) of the public bin ops on ``backend``."""
    n, k = 64, 10
    g = torch.Generator().manual_seed(1)
    zc, zr, z = leaf(n, k, seed=2), leaf(n, k, seed=3), leaf(n, k, seed=4)
    tc, tr = torch.rand(n, generator=g), torch.rand(n, generator=g)
    qc, qr = torch.softmax(torch.randn(n, k, generator=g), -1), torch.softmax(torch.randn(n, k, generator=g), -1)
    sc, sr = torch.rand(n, generator=g) * 0.2 + 0.05, torch.rand(n, generator=g) * 0.2 + 0.05
    cases = {}
    for kind in ops.LOSS_KINDS:
        cases[f"pair_loss {kind}"] = (lambda kind=kind: ops.pair_loss(zc, zr, tc, tr, kind=kind, backend=backend,
                                                                      **options), (zc, zr), lambda o: o)
    cases["pair_loss bt_kl q [N, K]"] = (lambda: ops.pair_loss(zc, zr, qc, qr, backend=backend, **options),
                                         (zc, zr), lambda o: o)
    cases["pair_loss bt_kl sigma [N]"] = (lambda: ops.pair_loss(zc, zr, tc, tr, sigma=(sc, sr), backend=backend,
                                                                **options), (zc, zr), lambda o: o)
    cases["dist_moments"] = (lambda: ops.dist_moments(z, backend=backend, **options), (z,), lambda o: o)
    cases["dist_moments, mean only"] = (lambda: ops.dist_moments(z, backend=backend, **options), (z,),
                                        lambda o: o[0])
    cases["gaussian_kl"] = (lambda: ops.gaussian_kl(z, tc, backend=backend, **options), (z,), lambda o: o)
    return cases


def gather_cases(backend: str, **options):
    b, t, v = 2, 8, 64
    logits = leaf(b, t, v, seed=5)
    ids = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(6))
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(7)) > 0.3
    return {"gather_logprobs": (lambda: ops.gather_logprobs(logits, ids, backend=backend, **options), (logits,),
                                lambda o: o),
            "gather_logprobs, mask": (lambda: ops.gather_logprobs(logits, ids, mask, backend=backend, **options),
                                      (logits,), lambda o: o)}


def chunk_cases(backend: str):
    """One chunk of sequence_logprobs: the fused LM head + gather of a plain nn.Linear head."""
    from distreward.sequence import chunk_logprobs_function

    torch.manual_seed(8)
    head = torch.nn.Linear(16, 64, bias=False)
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace())
    hidden = leaf(12, 16, seed=9)
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(10))
    chunk = chunk_logprobs_function(model, backend)
    return {"sequence_logprobs chunk": (lambda: chunk(hidden, ids), (hidden, head.weight), lambda o: o)}


def row(kernels: int, allocations: int, ops=(), syncs: int = 0) -> dict:
    return {"kernels": kernels, "allocations": allocations, "ops": sorted(ops), "syncs": syncs}


# The floors: one kernel each way, the outputs' allocations, no host sync; the pair loss's forward zeroes its
# accumulator (the kernel adds into it), and a validating call of an interpreted Triton kernel zeroes a flag and
# reads it (a pair loss reads its loss instead). On CUDA, validate=False is the default.
# The C++ bin ops allocate inside their one op and check values in their own loop: no other op, no sync.
CPP_BIN_OPS = {None: (row(1, 0), row(1, 0)), False: (row(1, 0), row(1, 0))}
PAIR_LOSS = {"triton": {None: (row(1, 2, ["zeros"], 1), row(1, 2)), False: (row(1, 2, ["zeros"]), row(1, 2))},
             "cpp": CPP_BIN_OPS}
ROW_OPS = {"triton": {None: (row(1, 2, ["zeros"], 1), row(1, 1)), False: (row(1, 2), row(1, 1))}, "cpp": CPP_BIN_OPS}
GAUSSIAN_KL = {"triton": {None: (row(1, 1, ["zeros"], 1), row(1, 1)), False: (row(1, 1), row(1, 1))},
               "cpp": CPP_BIN_OPS}
GATHER = {"triton": {None: (row(1, 2, ["zeros"], 1), row(1, 1)), False: (row(1, 2), row(1, 1))},
          "cpp": {None: (row(1, 0), row(1, 0)), False: (row(1, 0), row(1, 0))}}
CHUNK = {"triton": (row(1, 2, ["mm"]), row(1, 0, ["mm"] * 3)), "cpp": (row(1, 0, ["mm"]), row(1, 0, ["mm"] * 3))}
FUSED = [pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs triton under TRITON_INTERPRET=1")),
         pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="the C++ extension did not build"))]


def fused_bin_backends():
    return [backend for backend in FUSED if backend.values[0] == "triton" or "cpp" in ops._PAIR_LOSS]


def options(validate):
    return {} if validate is None else {"validate": validate}


@pytest.mark.parametrize("validate", [None, False])
@pytest.mark.parametrize("backend", fused_bin_backends())
@pytest.mark.parametrize("name", list(bin_cases("eager")))
def test_bin_ops_are_at_their_floor(name, backend, validate):
    expected = (PAIR_LOSS if name.startswith("pair_loss") else ROW_OPS if name.startswith("dist_moments")
                else GAUSSIAN_KL)[backend][validate]
    assert measure(*bin_cases(backend, **options(validate))[name]) == expected


@pytest.mark.parametrize("validate", [None, False])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(gather_cases("eager")))
def test_gather_is_at_its_floor(name, backend, validate):
    assert measure(*gather_cases(backend, **options(validate))[name]) == GATHER[backend][validate]


@pytest.mark.parametrize("backend", FUSED)
def test_a_sequence_logprobs_chunk_is_one_matmul_and_one_kernel_each_way(backend):
    assert measure(*chunk_cases(backend)["sequence_logprobs chunk"]) == CHUNK[backend]


def test_the_counter_sees_what_it_counts():
    """A sync, an allocation, an op and a C++ kernel launch are each counted where they belong."""
    x = torch.randn(3)
    with OpCounter() as counter:
        torch.empty(2)
        y = (x * 2).sum()
        bool(y > 0)
    assert counter.row() == row(0, 1, ["gt", "mul", "sum"], 1)
    if CPP:
        with OpCounter() as counter:
            ops.gather_logprobs(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), backend="cpp")
        assert counter.row()["kernels"] == 1


def test_a_bad_value_unchecked_at_the_call_stops_training_at_the_steps_own_read(tmp_path):
    """validate=False (a CUDA call's default) reads nothing back; train_loop's one read of the loss per step finds
    the NaN that a bad input leaves and stops with a one-line ValueError."""
    from torch.utils.data import DataLoader, TensorDataset

    from distreward.trainer_utils import TrainingConfig, make_accelerator, train_loop

    config = TrainingConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1)
    features = torch.randn(8, 3, generator=torch.Generator().manual_seed(11))
    features[5, 1] = float("nan")  # the second micro-batch holds a bad row
    data = DataLoader(TensorDataset(features, torch.rand(8)), batch_size=4)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 10)

    def compute_loss(model, batch):
        x, target = batch
        return ops.pair_loss(model(x), model(x.flip(0)), target, target.flip(0), validate=False), {}

    with pytest.raises(ValueError, match=r"^the training loss is nan at micro-step 2 \("):
        train_loop(config, make_accelerator(config), model, data, compute_loss)


def all_rows():
    """{(call, backend, validate): (forward row, backward row)} for every backend this build has."""
    rows = {}
    fused = [name for name, ok in (("triton", TRITON), ("cpp", CPP)) if ok]
    for backend in fused:
        if backend == "cpp" and "cpp" not in ops._PAIR_LOSS:
            continue
        for validate in (None, False):
            for name, case in bin_cases(backend, **options(validate)).items():
                rows[(name, backend, validate)] = measure(*case)
    for backend in ["eager"] + fused:
        for validate in (None, False):
            for name, case in gather_cases(backend, **options(validate)).items():
                rows[(name, backend, validate)] = measure(*case)
    for backend in fused:
        for name, case in chunk_cases(backend).items():
            rows[(name, backend, None)] = measure(*case)
    return rows


def format_row(row: dict) -> str:
    ops_text = ", ".join(row["ops"]) or "-"
    return f"{row['kernels']} / {row['allocations']} / {ops_text} / {row['syncs']}"


if __name__ == "__main__":
    print("| call | backend | validate | fwd: kernels / allocations / other ops / syncs | bwd |")
    print("|---|---|---|---|---|")
    for (name, backend, validate), (fwd, bwd) in all_rows().items():
        print(f"| {name} | {backend} | {validate} | {format_row(fwd)} | {format_row(bwd)} |")
    sys.exit(0)
