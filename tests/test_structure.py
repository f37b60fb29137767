"""The package's structure (issue #26): which layer may import which, and what importing the op layer loads."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The training code: stages, their data and configs, evaluation, serving. The op layer (distreward.ops,
# distreward.kernels) must load none of it.
TRAINING_MODULES = tuple(f"distreward.{name}" for name in (
    "data", "data_config", "pipeline", "train", "experiments", "experiment_report", "evaluation", "rm_metrics",
    "policy_comparison", "plots", "tables", "rollout", "rl_trainer", "rm_trainer", "reward_trainer", "sft_trainer",
    "stage_trainer", "trainer_utils", "serve", "testbed", "integrations"))


def imported_modules(path: pathlib.Path) -> set:
    """Every module ``path`` imports, at the top or inside a function, as an absolute dotted name
    (``from a import b`` gives ``a.b``: b may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import of {node.module!r}"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda path: path.name)
def test_the_triton_kernels_import_nothing_from_distreward(path):
    """kernels/ is shipped as distreward.kernels but stays a leaf: torch and triton only."""
    assert not {name for name in imported_modules(path) if name.split(".")[0] == "distreward"}


def module_file(name: str):
    """The file of the distreward module ``name`` names, or of the module it takes ``name`` from (``a.b.C``:
    a/b.py); None when there is none."""
    parts = name.split(".")[1:]
    for end in range(len(parts), 0, -1):
        for path in (ROOT / "distreward" / pathlib.Path(*parts[:end])).with_suffix(".py"), \
                ROOT / "distreward" / pathlib.Path(*parts[:end]) / "__init__.py":
            if path.is_file():
                return path
    return None


def is_leaf(name: str) -> bool:
    """Whether ``name`` is a distreward module outside the training code that imports nothing from distreward
    (a constants module, say)."""
    path = module_file(name)
    return (path is not None and ".".join(name.split(".")[:2]) not in TRAINING_MODULES
            and not {module for module in imported_modules(path) if module.split(".")[0] == "distreward"})


@pytest.mark.parametrize("path", sorted((ROOT / "distreward" / "ops").glob("*.py")), ids=lambda path: path.name)
def test_the_ops_import_only_the_op_layer(path):
    """distreward.ops imports from distreward only itself, the Triton kernels, the C++ extension and leaf modules
    of no training code."""
    allowed = ("distreward.ops", "distreward.kernels", "distreward._C", "distreward._build_info")
    outside = {name for name in imported_modules(path) if name.split(".")[0] == "distreward"
               and name != "distreward" and not name.startswith(allowed) and not is_leaf(name)}
    assert not outside, f"{path.name} imports {sorted(outside)}"


def test_importing_the_op_layer_loads_no_training_code():
    """distreward.kernels, distreward.ops and the C++ gather (one process: what they load together)."""
    modules = ("distreward.kernels", "distreward.ops", "distreward.ops.cpp")
    script = f"import {', '.join(modules)}, sys; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert loaded.issuperset(modules)
    training = sorted(name for name in loaded if ".".join(name.split(".")[:2]) in TRAINING_MODULES)
    assert not training, f"importing the op layer loads {training}"
    assert "transformers.trainer" not in loaded


def distreward_imports(name: str) -> set:
    """The distreward modules (and matplotlib / argparse) that distreward/``name``.py imports."""
    return {module for module in imported_modules(ROOT / "distreward" / f"{name}.py")
            if module.split(".")[0] in ("distreward", "matplotlib", "argparse")}


def test_evaluation_is_split_by_job():
    """RM metrics, policy comparison, plots and text tables are modules of their own; metrics and comparisons
    neither plot nor parse a command line; ``distreward.evaluation`` is the CLI only."""
    for numbers in ("rm_metrics", "policy_comparison", "tables"):
        imports = distreward_imports(numbers)
        assert not {name for name in imports if name.startswith(("matplotlib", "argparse", "distreward.plots",
                                                                 "distreward.evaluation"))}, (numbers, imports)
    assert not {name for name in distreward_imports("policy_comparison") if name.startswith("distreward")}
    assert "matplotlib" in distreward_imports("plots") and "argparse" in distreward_imports("evaluation")
    tree = ast.parse((ROOT / "distreward" / "evaluation.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert functions == {"run_settings_path", "compare_runs", "main"}


def test_the_evaluation_command_still_runs():
    done = subprocess.run([sys.executable, "-m", "distreward.evaluation", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m distreward.evaluation"), done.stderr


def test_data_loading_is_apart_from_its_config():
    """distreward/data.py loads data and knows no training settings; the stages' shared data settings are
    distreward/data_config.py's."""
    tree = ast.parse((ROOT / "distreward" / "data.py").read_text())
    assert not [node.name for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Config")]
    assert not {name for name in distreward_imports("data") if "trainer" in name}
    config = ast.parse((ROOT / "distreward" / "data_config.py").read_text())
    assert [node.name for node in config.body if isinstance(node, ast.ClassDef)] == ["PreferenceTrainingConfig"]


def test_the_extension_is_a_pybind11_module_that_registers_the_torch_library_ops():
    """distreward._C is defined once with PYBIND11_MODULE (no hand-written PyInit); the ops stay TORCH_LIBRARY ops."""
    sources = {path.name: path.read_text() for path in sorted((ROOT / "csrc").glob("*.cpp"))}
    assert [name for name, text in sources.items() if "PYBIND11_MODULE(_C, " in text] == ["extension.cpp"]
    assert not [name for name, text in sources.items() if "PyInit_" in text or "<Python.h>" in text]
    assert [name for name, text in sources.items() if "TORCH_LIBRARY(distreward, " in text] == ["logprobs.cpp"]
