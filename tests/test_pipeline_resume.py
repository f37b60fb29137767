"""``python -m distreward.train --resume``: a killed pipeline skips its finished stages, continues the stage it
was in from its latest checkpoint, and ends with every output of an uninterrupted run."""
import json
import os
from dataclasses import replace

import pytest

from distreward import cli, pipeline, reward_trainer, rl_trainer, rm_trainer, sft_trainer, trainer_utils
from distreward.pipeline import PipelineConfig, run_stages
from distreward.run_files import EVAL_NAME, finished_mark
from kills import Killed, killed_at
from run_files import jsonl_without_timings

TINY = {"num_pairs": 64, "sft_epochs": 2, "rm_epochs": 2, "rl_steps": 4, "num_eval_prompts": 2}  # 4 steps a stage
# Stage settings the pipeline leaves at their defaults (sft, rm, rl): a checkpoint after step 2, small evaluation
# and rollouts. sft and rm log every 10 steps, so their one logged step (4) averages over steps before the kill too.
# rl: the sharpened-SFT baseline on two temperatures chosen on 8 validation prompts (in eval.json: resumed alike).
STAGE_SETTINGS = ({"save_steps": 2, "num_eval_prompts": 2}, {"save_steps": 2},
                  {"save_steps": 2, "per_device_train_batch_size": 4, "samples_per_prompt": 2, "max_new_tokens": 6,
                   "curve_eval_steps": 1,  # rl/curve.jsonl too: resumed without duplicate points
                   "sharpening_grid": [1.0, 0.0], "sharpening_prompts": 8})
KILL_AT = 4  # the killed stage raises in step 4: step 3 was logged after checkpoint-2 and must be run again
STAGES = (("sft", sft_trainer, "run_sft"), ("rm", rm_trainer, "run_reward_training"),
          ("rl", rl_trainer, "run_reinforce"))


def argv(output_dir, *flags: str) -> list:
    return ["pipeline", "--output_dir", str(output_dir), *(f"--{k}={v}" for k, v in TINY.items()), *flags]


def small_stages(monkeypatch) -> None:
    stage_configs = pipeline.stage_configs
    monkeypatch.setattr(pipeline, "stage_configs", lambda *args: tuple(
        replace(config, **settings) for config, settings in zip(stage_configs(*args), STAGE_SETTINGS)))


def dying(compute_loss):
    """``compute_loss`` that raises :class:`Killed` at its ``KILL_AT``-th call (micro-batch)."""
    return killed_at(KILL_AT, compute_loss)


def kill_in(monkeypatch, module) -> None:
    """Make ``module``'s training loop raise :class:`Killed` at its ``KILL_AT``-th micro-batch (the rm stage's
    DistRewardTrainer builds its loss with ``reward_trainer.pair_loss_fn``)."""
    if module is rm_trainer:
        pair_loss_fn = reward_trainer.pair_loss_fn
        monkeypatch.setattr(reward_trainer, "pair_loss_fn", lambda *args: dying(pair_loss_fn(*args)))
        return

    def train_loop(config, accelerator, model, dataloader, compute_loss, *args, **kwargs):
        return trainer_utils.train_loop(config, accelerator, model, dataloader, dying(compute_loss), *args, **kwargs)

    monkeypatch.setattr(module, "train_loop", train_loop)


def outputs(root) -> dict:
    """Relative path -> content of every file under ``root``; run settings (``*config.json``) parsed, with
    ``root`` written as ``ROOT`` and without the ``resume`` flag, which records how the run was started;
    ``metrics.jsonl`` without its wall-clock timings."""
    contents = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                content = handle.read()
            if name.endswith("config.json"):
                content = json.loads(content.decode().replace(str(root), "ROOT"))
                content.pop("resume", None)
            elif name == "metrics.jsonl":
                content = jsonl_without_timings(path)
            contents[os.path.relpath(path, root)] = content
    return contents


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        small_stages(monkeypatch)
        assert cli.main(argv(root)) == 0
    return outputs(root)


@pytest.mark.parametrize("killed", [1, 2], ids=["rm", "rl"])  # sft resumes alike, as the first stage
def test_a_killed_pipeline_resumes_to_the_outputs_of_an_uninterrupted_run(uninterrupted, tmp_path, monkeypatch,
                                                                          killed):
    small_stages(monkeypatch)
    name, module, _ = STAGES[killed]
    with monkeypatch.context() as patch:
        kill_in(patch, module)
        with pytest.raises(Killed):
            cli.main(argv(tmp_path))
    assert os.listdir(tmp_path / name).count("checkpoint-2") == 1
    ran = []
    for stage, _, run_name in STAGES:
        run = getattr(pipeline, run_name)
        monkeypatch.setattr(pipeline, run_name, lambda config, stage=stage, run=run: ran.append(stage) or run(config))
    assert cli.main(argv(tmp_path, "--resume")) == 0
    assert ran == [stage for stage, _, _ in STAGES[killed:]]  # the finished stages were skipped
    resumed = outputs(tmp_path)
    assert sorted(resumed) == sorted(uninterrupted) and os.path.join("rl", "curve.jsonl") in resumed
    for path, content in uninterrupted.items():
        assert resumed[path] == content, path


def test_a_stage_that_runs_anew_forgets_the_later_stages_of_an_earlier_run(tmp_path, monkeypatch):
    """A fresh run killed in rm, in a directory where an earlier run finished: the resume must neither skip rl (its
    finished mark is stale) nor continue it from the earlier run's checkpoint."""
    dirs = [tmp_path / stage for stage, _, _ in STAGES]
    marks = [finished_mark("sft", evaluates=True), finished_mark("rm"), finished_mark("rl")]
    for directory, mark in zip(dirs, marks):  # the earlier, finished run
        (directory / "checkpoint-2").mkdir(parents=True)
        (directory / mark).write_text("earlier run")
    ran = []
    for (stage, _, run_name), directory, mark in zip(STAGES, dirs, marks):
        def run(config, stage=stage, directory=directory, mark=mark):
            ran.append((stage, config.resume))
            if stage == "rm" and not config.resume:
                raise Killed
            (directory / mark).write_text("this run")
            (directory / EVAL_NAME).write_text("{}")
            return {}  # the rl stage's report

        monkeypatch.setattr(pipeline, run_name, run)
    with pytest.raises(Killed):
        run_stages(PipelineConfig(output_dir=str(tmp_path)))
    assert os.listdir(dirs[1]) == os.listdir(dirs[2]) == []  # made from the earlier run's sft policy: forgotten
    assert run_stages(PipelineConfig(output_dir=str(tmp_path), resume=True)) == {}
    assert ran == [("sft", False), ("rm", False), ("rm", True), ("rl", True)]
