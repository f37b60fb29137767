"""A user's mistake on the command line gets one ``error: ...`` line and exit code 2, never a traceback,
and never a network wait for a path that looks local (``python -m distreward.train`` / ``.experiments`` /
``.evaluation``)."""
import os
import time

import huggingface_hub
import pytest
import torch

from distreward import evaluation, experiments
from distreward.data import local_path_or_hub_id
from distreward.rm_trainer import RewardConfig
from distreward.cli import STAGES, join_negative_values, main


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
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / f"models--{name.replace('/', '--')}").mkdir(parents=True)  # a cached hub id needs no probe
    (tmp_path / "runs").mkdir()  # "runs/..." lies in an existing directory: local, although shaped like org/name
    if is_local:
        with pytest.raises(ValueError, match=f"^model directory {name} does not exist$"):
            local_path_or_hub_id(name, "model directory")
    else:
        assert local_path_or_hub_id(name, "model directory") == name
    (tmp_path / "runs" / "existing").mkdir()
    assert local_path_or_hub_id("runs/existing", "model directory") == "runs/existing"


def unreachable_hub(*args, **kwargs):
    raise ConnectionError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("stage, flag, what, repo_type", [
    ("sft", "--model_name_or_path", "model directory", "model"), ("rm", "--dataset_name", "data file", "dataset")])
def test_a_name_that_is_neither_a_local_path_nor_a_reachable_hub_id_fails_at_once(
        capsys, tmp_path, monkeypatch, offline, stage, flag, what, repo_type):
    """Offline, or with the hub unreachable, one look-up (no retries) and one line naming both readings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    probes = []
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: probes.append(a) or unreachable_hub())
    argv = [stage, flag, "nothing/here", "--output_dir", str(tmp_path / "out")]
    if stage == "rm":
        argv += ["--model_name_or_path", "embedded"]
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 10
    readings = f"error: {what} nothing/here is no local path, and the hub {repo_type} nothing/here"
    expected = "is not in the local cache (HF_HUB_OFFLINE is set)" if offline else \
        "cannot be looked up: the hub is unreachable ([Errno -2] Name or service not known)"
    assert error_lines(capsys) == [f"{readings} {expected}"]
    assert len(probes) == (0 if offline else 1)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_the_hub_does_not_know_is_named_as_such(tmp_path, monkeypatch):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", "https://hf.co")))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", not_found)
    with pytest.raises(ValueError, match="^model directory org/typo is no local path, and the hub model org/typo "
                                         "does not exist"):
        local_path_or_hub_id("org/typo", "model directory")


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
                                   f"(no rm_config.json, eval.json, predictions.safetensors)"]
    with pytest.raises(SystemExit) as exit_info:  # no abbreviation of --output
        evaluation.main([missing, "--out", "x.png"])
    assert exit_info.value.code == 2


def test_a_directory_without_a_model_gives_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["sft", "--model_name_or_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys) == [f"error: model directory {tmp_path / 'empty'} has no config.json"]


@pytest.mark.parametrize("argv, message", [
    (["rm", "--max_steps", "ten"], "error: argument --max_steps/--max-steps: invalid int value: 'ten' "
                                   "(see python -m distreward.train rm --help)"),
    (["sft", "--max_steps", "0"], "error: --max_steps must be > 0, or -1 to train --num_train_epochs passes, got 0"),
    (["rm", "--mixed_precision", "fp16"], "error: --mixed_precision fp16 needs a CUDA GPU (none here): use auto, no "
                                          "or bf16"),
])
def test_a_bad_setting_is_one_line_before_any_file(capsys, tmp_path, argv, message):
    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is a valid choice on a CUDA machine")
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert error_lines(capsys) == [message]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 3, "score_rejected": 1}\n'
     '{"prompt": "x", "chosen": oops}\n', "line 2, column 27: not valid JSON (Expecting value)"),
    ('\n[1, 2]\n', "line 2: a row must be a JSON object, got list"),
    ("", "has no rows"), ("\n\n", "has no rows"),
])
def test_a_bad_data_file_names_the_file_and_the_line(capsys, tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    assert main(["rm", "--model_name_or_path", "embedded", "--dataset_name", str(path),
                 "--output_dir", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: ") and str(path) in line and line.endswith(message)
    assert not (tmp_path / "out").exists()


def test_top_level_help_says_where_the_pipeline_flags_are(capsys):
    assert main(["--help"]) == 0
    assert "`python -m distreward.train pipeline --help` lists its flags" in capsys.readouterr().out


def test_an_interrupted_run_says_how_to_resume(capsys, monkeypatch, tmp_path):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "rm", (RewardConfig, interrupted, ""))
    assert main(["rm", "--output_dir", str(tmp_path / "out")]) == 130
    assert error_lines(capsys) == [f"interrupted: `python -m distreward.train rm --output_dir {tmp_path / 'out'} "
                                   f"--resume` continues from the last checkpoint (every --save_steps steps)"]


@pytest.mark.parametrize("argv, message", [
    (["--loss_kind", "scalar_bt"], "error: --loss_kind scalar_bt trains a scalar reward model, which has no "
                                   "distribution for --shaping std_scale: use --shaping none"),
    (["rm", "--lr_scheduler_type", "cosin"], "error: --lr_scheduler_type must be one of "),
    (["rm", "--ops_backend", "triton"], "error: --ops_backend triton needs a CUDA GPU"),
    (["rm", "--num_pairs", "12"], "error: --num_pairs 12 with --eval_fraction 0.1 leaves 1 validation and 1 test "
                                  "pairs, too few to evaluate (at least 2 each): raise --num_pairs or --eval_fraction"),
    (["--num_pairs", "3"], "error: --num_pairs 3 with --eval_fraction 0.1 leaves 0 validation"),
])
def test_combinations_are_refused_before_any_work(capsys, monkeypatch, tmp_path, argv, message):
    if "triton" in argv and torch.cuda.is_available():
        pytest.skip("triton is a valid backend on a CUDA machine")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the check reads it; the kernels here are already built
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reward_model_files", [
    {"config.json": '{"model_type": "distreward"}'},  # the rm stage's Hugging Face model
    {"config.json": '{"loss_kind": "bt_kl"}', "reward_model_config.json": "{}"},  # the format before it
])
def test_swapped_policy_and_reward_model_paths_say_what_they_hold(capsys, tmp_path, reward_model_files):
    policy, reward_model = tmp_path / "sft", tmp_path / "rm"
    for directory, files in ((policy, {"config.json": "{}", "generation_config.json": "{}"}),
                             (reward_model, reward_model_files)):
        directory.mkdir()
        for name, content in files.items():
            (directory / name).write_text(content)
    out = str(tmp_path / "out")
    assert main(["rl", "--policy_path", str(reward_model), "--reward_model_path", str(policy), "--output_dir", out]) == 2
    assert error_lines(capsys) == [f"error: {reward_model} holds a reward model, not a policy: give the sft stage's "
                                   f"output directory"]
    from distreward.modeling import load_reward_model
    with pytest.raises(ValueError, match=f"^{policy} holds a policy \\(a causal LM\\), not a reward model"):
        load_reward_model(str(policy), None)
    assert not (tmp_path / "out").exists()


def test_resume_on_a_finished_run_does_nothing(capsys, monkeypatch, tmp_path):
    def refuse(config):
        raise AssertionError(f"ran with {config}")

    monkeypatch.setitem(STAGES, "rm", (RewardConfig, refuse, ""))
    run = tmp_path / "rm"
    run.mkdir()
    (run / "distributions.png").write_bytes(b"")  # the rm stage's last file
    assert main(["rm", "--output_dir", str(run), "--resume"]) == 0
    assert capsys.readouterr().out.startswith(f"{run} is a finished rm run: nothing to resume")
    (run / "checkpoint-5").mkdir()  # a checkpoint left behind: a killed later run, which --resume continues
    with pytest.raises(AssertionError, match="ran with"):
        main(["rm", "--output_dir", str(run), "--resume"])
