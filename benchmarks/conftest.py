"""Fixtures and options of ``pytest benchmarks`` (timing: benchmarks/interleave.py).

Every benchmark is parametrized by device ("cpu", "cuda"); the CUDA ones skip, saying why, on a machine
without CUDA or when ``TRITON_INTERPRET=1`` would time the CPU interpreter instead of the GPU. At the end
the session prints one table per (op, device) and writes them to ``--bench-out`` .md / .json.

    pytest benchmarks --bench-out benchmarks/results/cpu     # the tables of docs/performance.md
    pytest benchmarks --bench-quick                           # tiny sizes, 2 rounds, no thresholds: a smoke run

CPU candidates run on ``--bench-threads`` threads (default 1).
"""
import logging
import os

# Before torch allocates anything: every large CPU allocation gets transparent huge pages, as the C++ gather's own
# gradient does. Without it each candidate's fresh 384 MB tensor costs about 200 ms of 4 KiB page faults on a KVM
# guest, varying tenfold under load, which swamped the differences being measured.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from interleave import Report

REPORT = Report()


def pytest_addoption(parser):
    group = parser.getgroup("distreward benchmarks")
    group.addoption("--bench-out", default=".benchmarks/latest",
                    help="write the tables to OUT.md and every sample to OUT.json (default .benchmarks/latest)")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch (and OpenMP) threads (default 1: on a shared 2-core machine two threads stall at every "
                         "parallel region's barrier when one is descheduled, so eager's many ops took 3-10x longer)")
    group.addoption("--bench-quick", action="store_true",
                    help="tiny sizes and 2 rounds, thresholds not checked: proves the benchmarks run, measures nothing")


def pytest_configure(config):
    logging.getLogger("torch.__trace").setLevel(logging.INFO)  # its DEBUG records flood failure reports
    torch.set_num_threads(config.getoption("--bench-threads"))  # the C++ kernels share torch's OpenMP runtime
    REPORT.stem = config.getoption("--bench-out")  # rewritten after every row: a run cut short keeps its rows


def pytest_terminal_summary(terminalreporter, config):
    if not REPORT.rows:
        return
    terminalreporter.write_line("\n".join(REPORT.tables()))
    terminalreporter.write_line(f"\nbenchmark tables written to {REPORT.stem}.md (samples in the .json beside it)")


@pytest.fixture
def report() -> Report:
    return REPORT


@pytest.fixture
def quick(request) -> bool:
    """True under --bench-quick: tiny sizes, 2 rounds, thresholds skipped."""
    return request.config.getoption("--bench-quick")


@pytest.fixture
def check_thresholds(quick):
    """``check_thresholds(failures)``: assert no threshold failed, unless --bench-quick measured nothing worth checking."""
    def check(failures: list):
        if failures and quick:
            pytest.skip(f"--bench-quick: thresholds not checked ({len(failures)} would fail at these tiny sizes)")
        assert not failures, "; ".join(failures)

    return check


@pytest.fixture
def device(request) -> torch.device:
    """The device of a test parametrized with ``device`` ("cpu" or "cuda"); skips CUDA where it cannot be timed."""
    name = request.param
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter, not on the GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


@pytest.fixture
def card_bandwidth(device) -> float:
    """The card's peak memory bandwidth in bytes/s (double data rate x memory clock x bus width)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        pytest.skip(f"torch {torch.__version__} does not report the memory clock and bus width of {props.name}")
    return 2 * clock_khz * 1e3 * bus_bits / 8


@pytest.fixture(autouse=True)
def one_compiled_graph_per_shape():
    """Static shapes are torch.compile's best case: let every case have its own graph."""
    with torch._dynamo.config.patch(recompile_limit=256):
        yield
