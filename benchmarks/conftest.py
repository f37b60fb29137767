"""Fixtures for ``pytest benchmarks`` (pytest-benchmark) on a CUDA GPU.

Every benchmark that uses them skips, saying why, on a machine without CUDA or when
``TRITON_INTERPRET=1`` would time the CPU interpreter instead of the GPU.
"""
import os

import pytest
import torch


@pytest.fixture
def cuda_device() -> torch.device:
    """The current CUDA device; skips the test where there is none to time."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter, not on the GPU")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def card_bandwidth(cuda_device) -> float:
    """The card's peak memory bandwidth in bytes/s (double data rate x memory clock x bus width)."""
    props = torch.cuda.get_device_properties(cuda_device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        pytest.skip(f"torch {torch.__version__} does not report the memory clock and bus width of {props.name}")
    return 2 * clock_khz * 1e3 * bus_bits / 8


@pytest.fixture
def gpu_benchmark(cuda_device, benchmark, request):
    """``gpu_benchmark(step, bytes_moved, group)`` times ``step`` plus a CUDA synchronise with pytest-benchmark.

    Three warm-up calls run first (``torch.compile`` compiles there). ``extra_info`` records
    ``peak_memory_mib``, what one call allocates at its peak beyond what was allocated before it,
    and ``gb_per_s``, ``bytes_moved`` (the bytes the op must read and write) over the median time.
    Each case also prints its median at once, so a run cut short keeps what it measured.
    """
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def run(step, bytes_moved: int, group: str):
        def synchronised():
            step()
            torch.cuda.synchronize()

        for _ in range(3):
            synchronised()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
        synchronised()
        benchmark.extra_info["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**20
        benchmark.extra_info["bytes_moved"] = bytes_moved
        benchmark.group = group
        benchmark(synchronised)
        if benchmark.stats:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            benchmark.extra_info["gb_per_s"] = bytes_moved / median / 1e9
            if reporter is not None:  # None in pytest-xdist workers
                with capture.global_and_fixture_disabled():
                    reporter.write_line(f"\n{request.node.name}: median {median * 1e6:.1f} us, "
                                        f"{benchmark.extra_info['gb_per_s']:.0f} GB/s, "
                                        f"peak {benchmark.extra_info['peak_memory_mib']:.0f} MiB")

    return run
