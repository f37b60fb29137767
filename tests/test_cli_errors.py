"""A user's mistake on the command line gets one ``error: ...`` line and exit code 2, never a traceback,
and never a network wait for a path that looks local (``python -m distreward.train`` / ``.experiments`` /
``.evaluation``)."""
import os

import pytest

from distreward import evaluation, experiments
from distreward.data import local_path_or_hub_id
from distreward.train import join_negative_values, main


@pytest.fixture
def never_run(monkeypatch):
    """Replace the rm stage and the experiment grid by stubs that fail the test if a command line reaches them."""
    def refuse(config):
        raise AssertionError(f"ran with {config}")

    monkeypatch.setattr("distreward.rm_trainer.run_reward_training", refuse)
    monkeypatch.setattr(experiments, "run_experiments", refuse)


def error_lines(capsys) -> list:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("name, is_local", [
    ("org/name", False), ("gpt2", False), ("/no/such/model", True), ("./no_such_model", True),
    ("../no_such_model", True), ("~/no_such_model_here", True), ("org/name/extra", True), ("runs/no_such_model", True),
])
def test_a_missing_path_that_looks_local_is_an_error_and_a_hub_id_passes(tmp_path, monkeypatch, name, is_local):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/..." lies in an existing directory: local, although shaped like org/name
    if is_local:
        with pytest.raises(ValueError, match=f"^model directory {name} does not exist$"):
            local_path_or_hub_id(name, "model directory")
    else:
        assert local_path_or_hub_id(name, "model directory") == name
    (tmp_path / "runs" / "existing").mkdir()
    assert local_path_or_hub_id("runs/existing", "model directory") == "runs/existing"


@pytest.mark.parametrize("stage", ["rm", "sft"])
@pytest.mark.parametrize("absolute", [True, False])
def test_missing_model_directory_gives_one_line(capsys, tmp_path, monkeypatch, stage, absolute):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    path = str(tmp_path / "runs" / "missing") if absolute else os.path.join("runs", "missing")
    assert main([stage, "--model_name_or_path", path, "--output_dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys) == [f"error: model directory {path} does not exist"]


@pytest.mark.parametrize("path", ["data/pairs", "./pairs", "/no/such/pairs"])
def test_missing_data_file_without_an_extension_gives_one_line(capsys, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert main(["rm", "--model_name_or_path", "embedded", "--dataset_name", path,
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys) == [f"error: data file {path} does not exist"]


@pytest.mark.parametrize("argv, unknown", [
    (["rm", "--learning-rat", "1e-3"], "--learning-rat 1e-3"),  # not taken for --learning-rate
    (["rm", "--learning_rat=1e-3"], "--learning_rat=1e-3"),
])
def test_abbreviated_flags_are_unknown_arguments(capsys, never_run, argv, unknown):
    assert main(argv) == 2
    assert error_lines(capsys) == [f"error: unknown argument(s) for stage 'rm': {unknown} (see --help)"]


@pytest.mark.parametrize("argv", [["--no_such_flag", "1"], ["--rl-step", "5"], ["--seeds", "1", "--rl_step", "5"],
                                  ["--seed", "1"]])  # the grid sets each run's seed: --seed would not act
def test_experiments_unknown_or_abbreviated_flags_give_one_line(capsys, never_run, argv):
    assert experiments.main(argv) == 2
    unknown = " ".join(argv[2:] if argv[0] == "--seeds" else argv)
    assert error_lines(capsys) == [f"error: unknown argument(s): {unknown} (see --help)"]


@pytest.mark.parametrize("value", ["-1e-3", "-1E-3", "-.5e1"])
def test_negative_number_in_scientific_notation_reaches_the_validator(capsys, tmp_path, value):
    assert main(["rm", "--model_name_or_path", "embedded", "--output_dir", str(tmp_path), "--learning_rate",
                 value]) == 2
    assert error_lines(capsys) == [f"error: --learning_rate must be > 0, got {float(value)}"]


def test_join_negative_values_only_joins_a_number_after_a_flag():
    assert join_negative_values(["--a", "-1e-3", "--b", "-1", "--c=-2e1", "--d", "-x", "-3e2"]) == [
        "--a=-1e-3", "--b=-1", "--c=-2e1", "--d", "-x", "-3e2"]


def test_evaluation_of_a_missing_or_unfinished_run_dir_gives_one_line(capsys, tmp_path):
    missing = str(tmp_path / "missing")
    assert evaluation.main([missing]) == 2
    assert error_lines(capsys) == [f"error: {missing} is not a finished `python -m distreward.train rm` run "
                                   f"(no config.json, eval.json, predictions.safetensors)"]
    with pytest.raises(SystemExit) as exit_info:  # no abbreviation of --output
        evaluation.main([missing, "--out", "x.png"])
    assert exit_info.value.code == 2


def test_a_directory_without_a_model_gives_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["sft", "--model_name_or_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys) == [f"error: model directory {tmp_path / 'empty'} has no config.json"]
