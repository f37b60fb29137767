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
    "data", "data_config", "pipeline", "cli", "train", "experiments", "experiment_report", "evaluation", "rm_metrics",
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
    assert "matplotlib" in distreward_imports("plots")
    assert "distreward.cli.argument_parser" in distreward_imports("evaluation")
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


# The run files and the defaults (issue #26 item 3): each named once.
RUN_FILES = ROOT / "distreward" / "run_files.py"
DEFAULTED_PARAMETERS = {"sigma": "SIGMA", "num_bins": "NUM_BINS", "beta": "BETA", "alpha": "ALPHA",
                        "quantile_level": "QUANTILE_LEVEL"}


def run_file_names() -> set:
    """The file names distreward/run_files.py defines (its ``*_NAME`` constants)."""
    names = set()
    for node in ast.parse(RUN_FILES.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            names.update(node.value.value for target in node.targets if target.id.endswith("_NAME"))
    return names


def test_run_files_are_named_in_run_files_only():
    """No module but distreward/run_files.py writes a run file's name ("eval.json", "metrics.jsonl", ...) as a
    string: each reads the name there."""
    names = run_file_names()
    assert {"eval.json", "metrics.jsonl", "report.json", "sft_config.json", "rm_config.json"} <= names
    literals = [f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
                for path in sorted((ROOT / "distreward").rglob("*.py")) if path != RUN_FILES
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
                and node.value in names]
    assert not literals


def test_each_stage_has_one_finished_mark():
    """The command line (--resume of a finished run) and the pipeline (reusing a stage) ask run_files."""
    from distreward import cli, pipeline, run_files

    assert set(run_files.FINISHED_MARKS) == set(cli.STAGES)
    for module in (pipeline, cli):
        assert "finished_mark" in vars(module) and "FINISHED_MARKS" not in vars(module)


def parameter_defaults(path: pathlib.Path):
    """(line, parameter, default expression) of each defaulted function parameter and dataclass field of
    :data:`DEFAULTED_PARAMETERS`' names in ``path`` (a field's ``field(default=...)`` counts as its default)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
            pairs += [(arg, default) for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults) if default]
            yield from ((node.lineno, arg.arg, default) for arg, default in pairs
                        if arg.arg in DEFAULTED_PARAMETERS)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None \
                and node.target.id in DEFAULTED_PARAMETERS:
            value = node.value
            if isinstance(value, ast.Call):
                value = next((keyword.value for keyword in value.keywords if keyword.arg == "default"), None)
            if value is not None:
                yield node.lineno, node.target.id, value


def test_every_default_has_one_home():
    """sigma, num_bins, beta, alpha and quantile_level default to distreward/defaults.py's constants everywhere.
    Only the self-contained files write them as numbers, and then the same numbers: modeling_distreward.py (shipped
    with saved models: torch and transformers only) and the op layer (distreward/ops)."""
    from distreward import defaults

    wrong = []
    for path in sorted((ROOT / "distreward").rglob("*.py")):
        self_contained = path.name == "modeling_distreward.py" or path.parent.name == "ops"
        for line, name, default in parameter_defaults(path):
            expected = DEFAULTED_PARAMETERS[name]
            if isinstance(default, ast.Name) and default.id == expected or ast.unparse(default) == "None":
                continue  # the home's constant, or no default value (None: given elsewhere or not used)
            if self_contained and isinstance(default, ast.Constant) and default.value == getattr(defaults, expected):
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line} {name}={ast.unparse(default)}")
    assert not wrong


def test_the_defaults_module_is_a_leaf():
    """distreward/defaults.py and distreward/run_files.py import nothing from distreward: every layer may read them."""
    for name in ("defaults", "run_files"):
        assert not {module for module in imported_modules(ROOT / "distreward" / f"{name}.py")
                    if module.split(".")[0] == "distreward"}, name


def test_the_pipeline_settings_are_stage_settings():
    """Every pipeline setting but its own two is a stage setting (pipeline.STAGE_SETTINGS), whose default it takes,
    and stage_configs hands each one to its stage (a changed value arrives there)."""
    from dataclasses import fields

    from distreward import pipeline

    own = {"output_dir", "reuse_finished_stages"}
    assert {f.name for f in fields(pipeline.PipelineConfig)} - own == set(pipeline.STAGE_SETTINGS)
    default = pipeline.PipelineConfig()
    changed = {"seed": 7, "num_pairs": 500, "sft_epochs": 2.0, "rl_steps": 3, "beta": 0.3, "keep_checkpoints": True,
               "temperature_baselines": [0.5], "curve_eval_prompts": 4}
    stages = dict(zip(pipeline.STAGE_CLASSES, pipeline.PipelineConfig(**changed).stages))
    for name in pipeline.STAGE_SETTINGS:
        for stage, target in pipeline.stage_targets(name):
            defaults = dict(zip(pipeline.STAGE_CLASSES, default.stages))
            assert getattr(defaults[stage], target) == getattr(default, name), (name, stage, target)
            assert getattr(stages[stage], target) == changed.get(name, getattr(default, name)), (name, stage, target)


def test_the_experiment_grid_hands_its_workers_configs_not_a_command_line():
    assert "subprocess" not in imported_modules(ROOT / "distreward" / "experiments.py")


# Issue #26 items 2-3: one registry of backends, each fast op with its autograd, one table of loss kinds.
BACKEND_NAMES = {"auto", "eager", "triton", "cpp"}
LOSS_KIND_NAMES = {"bt_mean", "bt_kl", "dpl", "scalar_bt", "scalar_reg"}
# The code that runs or configures the ops: the op layer, the kernels, sequence_logprobs, the reward model's config.
OP_CODE = sorted([*(ROOT / "distreward" / "ops").glob("*.py"), *(ROOT / "kernels").glob("*.py"),
                  ROOT / "distreward" / "sequence.py", ROOT / "distreward" / "reward_trainer.py"])
FUSED_MODULES = ("distreward.kernels", "distreward.ops.cpp", "distreward.ops.cpp_bins", "distreward._C")


def string_tests(path: pathlib.Path, names: set) -> list:
    """Lines of ``path`` that compare with one of the string ``names`` (``==``, ``!=``, ``in``) or list several
    of them in a tuple, list or set."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            operands = node.elts
            if sum(isinstance(item, ast.Constant) and item.value in names for item in operands) < 2:
                continue
        else:
            continue
        if any(isinstance(item, ast.Constant) and item.value in names for item in operands):
            found.append(node.lineno)
    return found


@pytest.mark.parametrize("path", OP_CODE, ids=lambda path: str(path.relative_to(ROOT)))
def test_only_the_backend_registry_tests_backend_names_or_imports_fused_backends(path):
    """distreward/ops/registry.py alone names the backends in a test or a list, imports a fused backend's module
    (the Triton kernels, the C++ extension and its wrappers) and catches that import's failure."""
    if path == ROOT / "distreward" / "ops" / "registry.py":
        return
    assert not string_tests(path, BACKEND_NAMES), f"{path.name} tests backend names itself"
    fused = {name for name in imported_modules(path) if name.startswith(FUSED_MODULES)}
    if path.name in ("cpp.py", "cpp_bins.py"):  # the C++ wrappers load the extension they wrap
        fused.discard("distreward._C")
    assert not fused, f"{path.name} imports {sorted(fused)}: ask distreward.ops.registry.kernels"
    tree = ast.parse(path.read_text())
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler)
                and "ImportError" in ast.unparse(node.type or ast.Constant(None))], f"{path.name} decides availability"
    assert "environ" not in path.read_text() or path.parent.name == "kernels", f"{path.name} reads the environment"


def test_the_registry_answers_for_every_op_and_backend():
    """ops.backends() names eager, triton and cpp with None or a reason; every op's table holds eager and only the
    registry's fused backends of that op; auto falls back to eager for an op without kernels."""
    import torch

    from distreward import ops
    from distreward.ops import logprobs, registry
    report = ops.backends("cpu")
    assert set(report) == {"eager", "triton", "cpp"} and report["eager"] is None
    assert all(reason is None or isinstance(reason, str) and reason for reason in report.values())
    assert ops.BACKENDS is registry.BACKENDS
    tables = {**ops._TABLES, "gather_logprobs": logprobs.GATHER}
    assert set(tables) == set(registry.KERNELS)
    for op, table in tables.items():
        assert set(table) == {"eager", *registry.KERNELS[op]}, op
    assert registry.resolve("scalar_pair_loss", "auto", torch.device("cpu"), 1) == "eager"
    with pytest.raises(ValueError, match="is not available for scalar_pair_loss"):
        registry.resolve("scalar_pair_loss", "cpp", torch.device("cpu"))


def test_autograd_functions_live_with_their_kernels():
    """The dispatch modules (the public ops, the gather's table, the registry) hold no autograd Function and
    register no autograd formula: each fast op's Function sits in the file of its kernels and launcher."""
    for name in ("__init__.py", "logprobs.py", "registry.py", "loss_kinds.py", "reference.py", "validation.py"):
        source = (ROOT / "distreward" / "ops" / name).read_text()
        assert "autograd.Function" not in source and "register_autograd" not in source, name


@pytest.mark.parametrize("path", OP_CODE, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_loss_kind_list_and_test_comes_from_the_table(path):
    """Only distreward/ops/loss_kinds.py lists loss kinds or compares with one; the kinds' tuples are its."""
    if path.name == "loss_kinds.py":
        return
    assert not string_tests(path, LOSS_KIND_NAMES), f"{path.name} lists or tests loss kinds itself"


def test_the_loss_kind_tuples_are_the_tables():
    from distreward import ops
    from distreward.ops import loss_kinds
    assert set(loss_kinds.TABLE) == LOSS_KIND_NAMES and ops.LOSS_KIND_TABLE is loss_kinds.TABLE
    assert ops.REWARD_LOSS_KINDS == tuple(loss_kinds.TABLE)
    assert ops.LOSS_KINDS == tuple(kind for kind, row in loss_kinds.TABLE.items() if not row.scalar)
    assert ops.SCALAR_LOSS_KINDS == tuple(kind for kind, row in loss_kinds.TABLE.items() if row.scalar)


def test_the_command_line_module_owns_parsing_and_user_errors():
    """Every command (train, experiments, evaluation, testbed_report, serve) parses with distreward.cli's parsers
    and says a user's mistake with cli.user_error: no other module builds a parser or prints ``error: ...``."""
    for path in sorted((ROOT / "distreward").rglob("*.py")):
        if path.name == "cli.py":
            continue
        text = path.read_text()
        assert "ArgumentParser(" not in text and 'print(f"error: ' not in text, path
