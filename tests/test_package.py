"""The installed package: the C++ extension imports and the Triton kernels ship inside distreward."""
import importlib.metadata
import os
import subprocess
import sys

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


def test_importing_distreward_leaves_the_openmp_wait_policy_to_the_user():
    """A library import sets no process-wide OpenMP policy (docs/training.md, "Threads": the PASSIVE policy it once
    set made a run alone at two threads half as fast)."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    script = "import os, distreward; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "unset", done.stderr[-2000:]
