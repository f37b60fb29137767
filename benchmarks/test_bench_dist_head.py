"""``pair_loss`` through the public call, against its raw Triton kernel, eager and ``torch.compile``.

Every docs/math.md §3 kind (bt_kl, bt_mean, dpl) in fp32 and bf16, forward ("fwd", no autograd) and
forward+backward ("fwd_bwd"), N = 1k to 4M pairs of K = 10 logits. Rows:

- ``public``: ``ops.pair_loss(backend="auto")``, validation included (the Triton kernel on CUDA);
- ``raw kernel``: ``kernels.dist_head.triton_pair_loss``, below the validation;
- ``eager``: ``ops.pair_loss(backend="eager")``; ``compiled``: ``torch.compile`` of the eager reference.

Each benchmark records its median (pytest-benchmark), GB/s (bytes that must move / median) and the
share of the card's peak bandwidth; one table per (kind, dtype, mode) is printed at the end.
``test_issue_targets`` checks issue 12's targets, ``test_auto_picks_the_faster_backend`` the ``auto``
choice, ``test_fused_tile_size`` sweeps the kernel's rows per program.

    pytest benchmarks/test_bench_dist_head.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-json=dist_head.json

CUDA only: without a GPU (or under TRITON_INTERPRET=1) every benchmark skips, saying why. On a CPU
``eager`` is the only bin-op backend: ``triton`` runs there only in the interpreter.
"""
from collections import defaultdict

import pytest
import torch

from distreward import ops
from distreward.ops import reference

dist_head = pytest.importorskip("distreward.kernels.dist_head", reason="the fused kernels need triton")

BINS, SIGMA, SCORE_WEIGHT = 10, 0.1, 1.0
ROWS = [1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 22]
DTYPES = [torch.float32, torch.bfloat16]


def public(*args):
    return ops.pair_loss(*args[:4], kind=args[4], sigma=args[5], score_weight=args[6], centers=args[7])


def eager(*args):
    return ops.pair_loss(*args[:4], kind=args[4], sigma=args[5], score_weight=args[6], centers=args[7],
                         backend="eager")


IMPLEMENTATIONS = {"public": public, "raw kernel": dist_head.triton_pair_loss, "eager": eager,
                   "compiled": torch.compile(reference.pair_loss, dynamic=False)}
RESULTS = defaultdict(dict)  # (kind, dtype, mode) -> {(impl, n_rows): (seconds, GB/s, share of peak)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.fixture(scope="module", autouse=True)
def print_tables(request):
    """After the module: one table per (kind, dtype, mode), rows = implementations, columns = N."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for (kind, dtype, mode), cells in sorted(RESULTS.items()):
        rows = sorted({n for _, n in cells})
        reporter.write_line(f"\npair_loss {kind} {dtype} {mode}, K = {BINS}: median us (GB/s, % of peak)")
        reporter.write_line("| impl | " + " | ".join(f"N={n}" for n in rows) + " |")
        reporter.write_line("|---" * (len(rows) + 1) + "|")
        for impl in IMPLEMENTATIONS:
            entries = [f"{cells[impl, n][0] * 1e6:.1f} ({cells[impl, n][1]:.0f} GB/s, {cells[impl, n][2]:.0%})"
                       if (impl, n) in cells else "-" for n in rows]
            reporter.write_line(f"| {impl} | " + " | ".join(entries) + " |")


@pytest.fixture(autouse=True)
def one_compiled_graph_per_shape():
    """Static shapes are torch.compile's best case: let every (N, dtype, kind, mode) have its own graph."""
    with torch._dynamo.config.patch(recompile_limit=256):
        yield


def make_step(loss_fn, n_rows: int, dtype: torch.dtype, kind: str, backward: bool, device="cuda"):
    """A callable that runs ``loss_fn`` on fixed random pairs (and its backward, returning the logit gradients)."""
    g = torch.Generator(device=device).manual_seed(0)
    chosen, rejected = (torch.randn(n_rows, BINS, generator=g, device=device).mul_(3).to(dtype).requires_grad_(backward)
                        for _ in range(2))
    targets = torch.rand(n_rows, generator=g, device=device), torch.rand(n_rows, generator=g, device=device)
    centers = ops.bin_centers(BINS, device=device)

    def step():
        loss = loss_fn(chosen, rejected, *targets, kind, SIGMA, SCORE_WEIGHT, centers)
        return torch.autograd.grad(loss, (chosen, rejected)) if backward else loss

    return step


def bytes_moved(n_rows: int, dtype: torch.dtype, kind: str, backward: bool) -> int:
    """Both [N, K] logits read, both fp32 targets read (not by bt_mean), with backward both [N, K] gradients written."""
    logits = 2 * n_rows * BINS * dtype.itemsize
    return logits + (0 if kind == "bt_mean" else 2 * n_rows * 4) + (logits if backward else 0)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("n_rows", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_pair_loss(gpu_benchmark, card_bandwidth, benchmark, kind, dtype, n_rows, impl, mode):
    backward = mode == "fwd_bwd"
    step = make_step(IMPLEMENTATIONS[impl], n_rows, dtype, kind, backward)
    moved = bytes_moved(n_rows, dtype, kind, backward)
    gpu_benchmark(step, moved, f"pair_loss {kind} {_name(dtype)} {mode} N={n_rows}")
    if benchmark.stats:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        share = benchmark.extra_info["share_of_peak"] = moved / seconds / card_bandwidth
        RESULTS[kind, _name(dtype), mode][impl, n_rows] = (seconds, moved / seconds / 1e9, share)


def median_seconds(step) -> float:
    """Median CUDA time of ``step`` (L2 flushed between runs) after a warm-up; triton.testing.do_bench."""
    from triton.testing import do_bench

    return do_bench(step, warmup=50, rep=200, return_mode="median") * 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("kind", ops.LOSS_KINDS)
def test_issue_targets(card_bandwidth, kind, dtype):
    """Issue 12 point 3, fwd+bwd through the public call: >= torch.compile at every N, under 60 us at
    N = 65536, >= 80% of the card's bandwidth at N = 4M; the public call within 1.1x the raw kernel."""
    times = {(name, n): median_seconds(make_step(fn, n, dtype, kind, True))
             for name, fn in IMPLEMENTATIONS.items() if name != "eager" for n in ROWS}
    report = "; ".join(f"{name} N={n}: {t * 1e6:.1f} us" for (name, n), t in times.items())
    for n in ROWS:
        assert times["public", n] <= times["compiled", n], report
        assert times["public", n] <= 1.1 * times["raw kernel", n] + 5e-6, report  # + one host read of the flag
    assert times["public", 1 << 16] < 60e-6, report
    achieved = bytes_moved(1 << 22, dtype, kind, True) / times["public", 1 << 22]
    assert achieved >= 0.8 * card_bandwidth, f"N = 4M: {achieved / card_bandwidth:.0%} of peak; {report}"


@pytest.mark.parametrize("n_rows", ROWS, ids=lambda n: f"N{n}")
def test_auto_picks_the_faster_backend(cuda_device, n_rows):
    """backend="auto" on CUDA takes the Triton kernel; measured: it is within 10% of the faster of triton and eager."""
    def call(backend):
        return lambda *args: ops.pair_loss(*args[:4], kind=args[4], sigma=args[5], score_weight=args[6],
                                           centers=args[7], backend=backend)

    times = {backend: median_seconds(make_step(call(backend), n_rows, torch.float32, "bt_kl", True))
             for backend in ("auto", "triton", "eager")}
    assert times["auto"] <= 1.1 * min(times["triton"], times["eager"]), times


@pytest.mark.parametrize("tile_elements", [512, 1024, 2048, 4096, 8192])
def test_fused_tile_size(gpu_benchmark, monkeypatch, tile_elements):
    """bt_kl fwd+bwd at N = 4M, fp32, for several rows-per-program budgets (dist_head.GPU_TILE_ELEMENTS)."""
    monkeypatch.setattr(dist_head, "GPU_TILE_ELEMENTS", tile_elements)
    step = make_step(dist_head.triton_pair_loss, 1 << 22, torch.float32, "bt_kl", True)
    group = "raw kernel pair_loss bt_kl float32 fwd_bwd N=4194304 by tile elements"
    gpu_benchmark(step, bytes_moved(1 << 22, torch.float32, "bt_kl", True), group)
