"""Fused Triton dist-head kernel (kernels/dist_head.py) vs the eager reference vs ``torch.compile`` of it.

``pair_loss`` forward ("fwd", no autograd) and forward+backward ("fwd_bwd") over N = 1k to 4M pairs of
K = 10 logits. Each benchmark records its time (pytest-benchmark), peak memory beyond the inputs and
achieved GB/s (bytes that must move / median time) in ``extra_info``; ``test_issue_targets`` checks
issue 3's targets and ``test_fused_tile_size`` sweeps the kernel's rows per program. The ops are
called below their input validation, which costs every backend the same.

    pytest benchmarks/test_bench_dist_head.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-json=dist_head.json

CUDA only: without a GPU every benchmark skips, saying why.
"""
import pytest
import torch

from distreward import ops
from distreward.ops import reference

dist_head = pytest.importorskip("distreward.kernels.dist_head", reason="the fused kernels need triton")

BINS, SIGMA, SCORE_WEIGHT = 10, 0.1, 1.0
ROWS = [1 << 10, 1 << 16, 1 << 20, 1 << 22]
VARIANTS = [("bt_kl", torch.float32), ("bt_kl", torch.bfloat16), ("dpl", torch.float32)]


def fused(*args):
    return dist_head.triton_pair_loss(*args)


eager = reference.pair_loss
compiled = torch.compile(reference.pair_loss, dynamic=False)
IMPLEMENTATIONS = {"fused": fused, "eager": eager, "compiled": compiled}


@pytest.fixture(autouse=True)
def one_compiled_graph_per_shape():
    """Static shapes are torch.compile's best case: let every (N, dtype, mode) have its own graph."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def make_step(loss_fn, n_rows: int, dtype: torch.dtype, kind: str, backward: bool, device="cuda"):
    """A callable that runs ``loss_fn`` on fresh random pairs (and its backward, returning the logit gradients)."""
    g = torch.Generator(device=device).manual_seed(0)
    chosen, rejected = (torch.randn(n_rows, BINS, generator=g, device=device).mul_(3).to(dtype).requires_grad_(backward)
                        for _ in range(2))
    targets = torch.rand(n_rows, generator=g, device=device), torch.rand(n_rows, generator=g, device=device)
    centers = ops.bin_centers(BINS, device=device)

    def step():
        loss = loss_fn(chosen, rejected, *targets, kind, SIGMA, SCORE_WEIGHT, centers)
        return torch.autograd.grad(loss, (chosen, rejected)) if backward else loss

    return step


def bytes_moved(n_rows: int, dtype: torch.dtype, backward: bool) -> int:
    """Both [N, K] logits and both fp32 targets read, and with backward both [N, K] gradients written."""
    logits = 2 * n_rows * BINS * dtype.itemsize
    return logits + 2 * n_rows * 4 + (logits if backward else 0)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("n_rows", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("kind, dtype", VARIANTS, ids=lambda v: str(v).removeprefix("torch."))
def test_pair_loss(gpu_benchmark, kind, dtype, n_rows, impl, mode):
    backward = mode == "fwd_bwd"
    step = make_step(IMPLEMENTATIONS[impl], n_rows, dtype, kind, backward)
    group = f"pair_loss {kind} {str(dtype).removeprefix('torch.')} {mode} N={n_rows}"
    gpu_benchmark(step, bytes_moved(n_rows, dtype, backward), group)


def median_seconds(step) -> float:
    """Median CUDA time of ``step`` (L2 flushed between runs) after a warm-up; triton.testing.do_bench."""
    from triton.testing import do_bench

    return do_bench(step, warmup=50, rep=200, return_mode="median") * 1e-3


def test_issue_targets(card_bandwidth):
    """bt_kl fwd+bwd, fp32, K = 10: >= 8x eager and >= torch.compile at N = 65536; >= 80% of the card's
    memory bandwidth at N = 4M."""
    times = {name: median_seconds(make_step(fn, 1 << 16, torch.float32, "bt_kl", True))
             for name, fn in IMPLEMENTATIONS.items()}
    report = ", ".join(f"{name} {t * 1e6:.1f} us" for name, t in times.items())
    assert times["eager"] >= 8 * times["fused"], f"N = 65536: {report}"
    assert times["compiled"] >= times["fused"], f"N = 65536: {report}"
    seconds = median_seconds(make_step(fused, 1 << 22, torch.float32, "bt_kl", True))
    achieved = bytes_moved(1 << 22, torch.float32, True) / seconds
    assert achieved >= 0.8 * card_bandwidth, (f"N = 4M: {achieved / 1e9:.0f} GB/s is {achieved / card_bandwidth:.0%} "
                                              f"of the card's {card_bandwidth / 1e9:.0f} GB/s")


@pytest.mark.parametrize("tile_elements", [512, 1024, 2048, 4096, 8192])
def test_fused_tile_size(gpu_benchmark, monkeypatch, tile_elements):
    """bt_kl fwd+bwd at N = 4M, fp32, for several rows-per-program budgets (dist_head.GPU_TILE_ELEMENTS)."""
    monkeypatch.setattr(dist_head, "GPU_TILE_ELEMENTS", tile_elements)
    step = make_step(fused, 1 << 22, torch.float32, "bt_kl", True)
    group = "fused pair_loss bt_kl float32 fwd_bwd N=4194304 by tile elements"
    gpu_benchmark(step, bytes_moved(1 << 22, torch.float32, True), group)
