"""--use_peft: LoRA (PEFT) on the backbone and a fully trained head, saved (adapter + head, and merged) and
reloaded, on the tiny model."""
import json

import pytest
import torch
from transformers import set_seed

from distreward.data import PreferenceCollator, load_preference_data
from distreward.modeling import DistRewardForSequenceClassification
from distreward.reward_trainer import DistRewardTrainer, RewardConfig
from distreward.rm_trainer import ADAPTER_DIR
from distreward.tiny import build_tiny_policy
from distreward.cli import main
from kills import Killed, killed_at

peft = pytest.importorskip("peft")
SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def reward_model(tokenizer, head_seed: int):
    """The small reward model on the same backbone every time; its fresh head drawn with ``head_seed``."""
    backbone = build_tiny_policy(tokenizer, seed=0, **SMALL)
    set_seed(head_seed)
    return DistRewardForSequenceClassification.from_backbone(backbone)


def test_lora_trains_adapters_and_the_head_and_reloads_exactly(tmp_path, tokenizer):
    pairs = load_preference_data(tokenizer, num_pairs=50, eval_fraction=0.2, seed=0)["train"]
    config = RewardConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8,
                          learning_rate=1e-2, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base = reward_model(tokenizer, head_seed=0)
    initial = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    trainer = DistRewardTrainer(base, config, train_dataset=pairs, processing_class=tokenizer)
    model = trainer.model
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or ".head.modules_to_save." in name for name in trainable)
    assert any("q_proj.lora_A" in name for name in trainable) and any("v_proj.lora_B" in name for name in trainable)
    trainer.train()

    trained = dict(model.named_parameters())
    head = trained["base_model.model.head.modules_to_save.default.weight"]
    assert not torch.equal(head, initial["head.weight"])  # the head trained whole
    assert torch.equal(trained["base_model.model.head.original_module.weight"], initial["head.weight"])
    frozen = "base_model.model.backbone.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(trained[frozen], initial["backbone.layers.0.self_attn.q_proj.weight"])  # the body did not
    assert any(trained[name].abs().sum() > 0 for name in trainable if "lora_B" in name)  # B starts at 0

    batch = PreferenceCollator(tokenizer.pad_token_id)([pairs[i] for i in range(8)])
    inputs = (batch["input_ids_chosen"], batch["attention_mask_chosen"])
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["head"] and saved["r"] == 4
    reloaded = peft.PeftModel.from_pretrained(reward_model(tokenizer, head_seed=1), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(*inputs)
        merged = reloaded.merge_and_unload()(*inputs)
    torch.testing.assert_close(again.bin_logits, expected.bin_logits, rtol=0, atol=0)  # adapter + head, exactly
    torch.testing.assert_close(merged.bin_logits, expected.bin_logits, rtol=1e-5, atol=1e-5)  # merged: fp32 sums


def test_rm_stage_with_use_peft_saves_the_merged_model_and_the_adapter(tmp_path):
    run = tmp_path / "rm"
    assert main(["rm", "--model_name_or_path", "embedded", "--output_dir", str(run), "--max_steps", "2",
                 "--num_pairs", "40", "--per_device_train_batch_size", "4", "--use_peft", "--lora_r", "2",
                 "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"]) == 0
    adapter = json.loads((run / ADAPTER_DIR / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"] and adapter["r"] == 2
    model = DistRewardForSequenceClassification.from_pretrained(run)  # merged: a plain reward model
    assert not any("lora" in name for name in model.state_dict())
    assert json.loads((run / "rm_config.json").read_text())["use_peft"] is True
    assert json.loads((run / "eval.json").read_text())["num_pairs"] > 0


@pytest.mark.parametrize("flags, message", [(["--lora_r", "0"], "--lora_r must be > 0"),
                                            (["--lora_dropout", "1"], r"--lora_dropout must lie in \[0, 1\)")])
def test_bad_lora_settings_are_refused(flags, message):
    settings = {flags[0][2:]: type(getattr(RewardConfig, flags[0][2:]))(flags[1])}
    with pytest.raises(ValueError, match=message):
        RewardConfig(output_dir="unused", use_peft=True, **settings)


def test_a_killed_lora_run_resumes_to_the_uninterrupted_one(tmp_path, tokenizer):
    """Checkpoints of a PEFT model hold the adapter and head (and the RNG of LoRA's dropout): the resumed run ends
    with the weights and metrics.jsonl of an uninterrupted one."""
    pairs = load_preference_data(tokenizer, num_pairs=50, eval_fraction=0.2, seed=0)["train"]

    def run(name, kill_at=None, resume=False):
        config = RewardConfig(output_dir=str(tmp_path / name), max_steps=6, save_steps=2, logging_steps=1,
                              per_device_train_batch_size=8, learning_rate=1e-2, use_peft=True, lora_r=4,
                              resume=resume)
        trainer = DistRewardTrainer(reward_model(tokenizer, head_seed=0), config, train_dataset=pairs,
                                    processing_class=tokenizer)
        trainer.pair_loss = killed_at(kill_at, trainer.pair_loss)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model, (tmp_path / name / "metrics.jsonl").read_text()

    straight, straight_metrics = run("straight")
    with pytest.raises(Killed):
        run("killed", kill_at=5)
    assert (tmp_path / "killed" / "checkpoint-4" / "adapter_model.safetensors").exists()
    resumed, resumed_metrics = run("killed", resume=True)
    assert resumed_metrics == straight_metrics
    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
