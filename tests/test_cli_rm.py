"""``python -m distreward.train sft|rm``: help, one-line errors, and tiny end-to-end runs with their outputs."""
import dataclasses
import json

import pytest
import torch

from distreward.modeling import DistRewardForSequenceClassification
from distreward.rm_trainer import RewardConfig
from distreward.sft_trainer import SFTConfig
from distreward.synthetic import make_preference_dataset
from distreward.cli import main

TINY_RUN = ["--max_steps", "3", "--num_pairs", "40", "--per_device_train_batch_size", "4", "--save_steps", "2"]


@pytest.mark.parametrize("stage, config", [("rm", RewardConfig), ("sft", SFTConfig)])
def test_help_explains_every_flag(capsys, stage, config):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(config):
        assert f"--{field.name}" in text and field.metadata["help"]


def test_unknown_flag_gives_one_line(capsys):
    assert main(["rm", "--no_such_flag", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown argument(s) for stage 'rm': --no_such_flag 1 "
                                                    "(see --help)"]


def test_malformed_value_exits_with_a_one_line_usage_error(capsys):
    assert main(["rm", "--max_steps", "many"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --max_steps/--max-steps: invalid int value: 'many' (see python -m distreward.train rm --help)"]


@pytest.mark.parametrize("argv, message", [
    (["--loss_kind", "mse"], "error: --loss_kind must be one of bt_mean, bt_kl, dpl, scalar_bt, scalar_reg, got 'mse'"),
    (["--margin_temperature", "-1"], "error: --margin_temperature must be > 0, got -1.0"),
    (["--gradient_accumulation_steps", "0"], "error: --gradient_accumulation_steps must be >= 1, got 0"),
    (["--dataset_name", "missing.jsonl"], "error: data file missing.jsonl does not exist"),
])
def test_bad_settings_give_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["rm", "--model_name_or_path", "embedded", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


@pytest.mark.parametrize("drop, message", [
    ("rejected", "error: preference data lacks column(s) rejected; found"),
    (None, "error: column score_chosen has scores in [1.6, 5], outside the range [0, 4]"),
])
def test_bad_data_gives_one_line(capsys, tmp_path, drop, message):
    rows = make_preference_dataset(6, seed=0).to_list()
    rows[0]["score_chosen"] = 5.0
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != drop}) + "\n" for row in rows))
    # task v1's rows carry no per-rater ratings: the fixed-width Gaussian label, as the hub data set needs
    assert main(["rm", "--model_name_or_path", "embedded", "--dataset_name", str(path), "--label_kind", "gaussian",
                 "--output_dir", str(tmp_path / "rm")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(message)


def test_rm_without_sft_output_says_it_builds_a_fresh_backbone(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["rm", *TINY_RUN, "--task", "v1", "--label_kind", "gaussian"]) == 0  # task v1's prompt groups
    assert "runs/pipeline/sft not found: using a freshly initialised embedded tiny Llama" in capsys.readouterr().out
    report = json.loads((tmp_path / "runs/pipeline/rm/eval.json").read_text())
    assert set(report) >= {"pairwise_accuracy", "mean_std", "std_error_spearman", "label_kl", "calibration_ece",
                           "by_kind", "by_prompt_group"}
    assert set(report["by_prompt_group"]) <= {"clear", "ambiguous"}
    assert all(0 <= group["calibration_ece"] <= 1 for group in report["by_prompt_group"].values())
    assert (tmp_path / "runs/pipeline/rm/distributions.png").stat().st_size > 0
    assert (tmp_path / "runs/pipeline/rm/reliability.png").stat().st_size > 0


@pytest.mark.parametrize("task, groups", [("v1", "by_prompt_group"), ("v2", "by_region")])
def test_a_scalar_baseline_trains_saves_and_evaluates(tmp_path, task, groups):
    rm_dir = tmp_path / "rm"
    assert main(["rm", *TINY_RUN, "--model_name_or_path", "embedded", "--output_dir", str(rm_dir), "--task", task,
                 "--loss_kind", "scalar_reg", "--margin_temperature", "0.5"]) == 0
    report = json.loads((rm_dir / "eval.json").read_text())
    assert 0 <= report["pairwise_accuracy"] <= 1 and report["mean_std"] is None and report["calibration_ece"] is None
    assert report[groups] and all(group["mean_std"] is None for group in report[groups].values())
    assert (rm_dir / "distributions.png").exists() and not (rm_dir / "reliability.png").exists()
    assert DistRewardForSequenceClassification.from_pretrained(rm_dir).is_scalar


def test_sft_then_rm_on_local_data_through_the_hub_code_path(tmp_path):
    """The SmolLM2 / HelpSteer2 path (AutoModel + AutoTokenizer from a directory, a data file) on local files."""
    sft_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
    assert main(["sft", *TINY_RUN, "--output_dir", str(sft_dir), "--num_eval_prompts", "4"]) == 0
    assert json.loads((sft_dir / "sft_config.json").read_text())["max_steps"] == 3
    assert 0 <= json.loads((sft_dir / "eval.json").read_text())["ground_truth"]["mean"] <= 4
    assert not list(sft_dir.glob("checkpoint-*"))  # a finished run keeps its final model, not its checkpoints
    data = tmp_path / "pairs.jsonl"
    rows = [row for split, num in (("train", 16), ("validation", 4), ("test", 6))
            for row in make_preference_dataset(num, seed=5, split=split).to_list()]
    for row in rows:  # the hub data set's names for the scores
        row["chosen_rating"], row["rejected_rating"] = row.pop("score_chosen"), row.pop("score_rejected")
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["rm", *TINY_RUN, "--model_name_or_path", str(sft_dir), "--dataset_name", str(data),
            "--output_dir", str(rm_dir), "--loss_kind", "bt_mean", "--keep_checkpoints",
            "--label_kind", "gaussian",  # the data keep no per-rater ratings, as HelpSteer2_binarized
            "--adam_beta2", "0.99", "--report_to", "none"]  # TrainingArguments' flags are the rm stage's too
    assert main(argv) == 0

    config = json.loads((rm_dir / "rm_config.json").read_text())
    assert config["loss_kind"] == "bt_mean" and config["model_name_or_path"] == str(sft_dir)
    assert (config["adam_beta2"], config["report_to"], config["optim"]) == (0.99, [], "adamw_torch")
    assert [json.loads(line)["step"] for line in (rm_dir / "metrics.jsonl").read_text().splitlines()] == [3]
    assert (rm_dir / "checkpoint-2" / "model.safetensors").exists()
    report = json.loads((rm_dir / "eval.json").read_text())
    assert report["num_pairs"] == 6 and 0 <= report["pairwise_accuracy"] <= 1
    model = DistRewardForSequenceClassification.from_pretrained(rm_dir)
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    head_less = {name: tensor for name, tensor in model.backbone.state_dict().items()}
    assert not torch.equal(head_less["embed_tokens.weight"], policy.model.embed_tokens.weight)  # it trained
