"""The installed package: the C++ extension imports and the Triton kernels ship inside distreward."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

import distreward


def test_cpp_extension_registers_its_ops_and_computes_a_log_prob():
    import distreward._C  # noqa: F401  (loading the library registers torch.ops.distreward.*)

    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    out, _ = torch.ops.distreward.gather_logprobs_forward(logits, torch.tensor([[2]]), torch.tensor([[True]]))
    torch.testing.assert_close(out, torch.log(torch.tensor([[0.25]])))


def test_the_extension_reports_the_openmp_threads_its_kernels_use():
    """distreward._C (pybind11: its functions carry their signature) shares torch's OpenMP runtime, so
    torch.set_num_threads sets the threads of the kernels' parallel loops."""
    from distreward import _C

    assert _C.omp_max_threads.__doc__.startswith("omp_max_threads() -> int")
    threads = torch.get_num_threads()
    try:
        seen = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            seen.append(_C.omp_max_threads())
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2, 3]


def test_kernels_ship_inside_the_package_not_as_a_top_level_module():
    import distreward.kernels

    assert distreward.kernels.__name__ == "distreward.kernels"
    top_level = importlib.metadata.distribution("distreward").read_text("top_level.txt").split()
    assert top_level == ["distreward"]


def test_the_distreward_console_script_runs_the_command_line():
    from distreward import cli, train

    (script,) = importlib.metadata.distribution("distreward").entry_points.select(group="console_scripts",
                                                                                   name="distreward")
    assert script.load() is cli.main and train.main is cli.main  # python -m distreward.train runs the same


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_distreward_makes_idle_openmp_threads_sleep_unless_told_otherwise(given, expected):
    """Two runs sharing the cores collapse when their OpenMP threads spin (docs/training.md, "Threads"): importing
    distreward sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, and leaves a value the user set."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    script = "import os, distreward; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == expected, done.stderr[-2000:]
