"""DistRewardForSequenceClassification: the head reads the last real token, moments match ops, save/load round-trips
(the Hugging Face side, Auto classes and trust_remote_code: tests/test_hf_model.py)."""
import pytest
import torch

from distreward import ops
from distreward.modeling import (DistRewardConfig, DistRewardForSequenceClassification, last_token_index,
                                 load_reward_model)
from distreward.tiny import build_tiny_policy

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, seed=0, **SMALL)).eval()


def test_last_token_index_reads_the_mask_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_forward_shapes_dtypes_and_moments(model, tokenizer):
    batch = tokenizer(["What is 1 + 2?", "Sort: 3 1"], return_tensors="pt", padding=True)
    output = model(batch["input_ids"], batch["attention_mask"])
    assert output.bin_logits.shape == (2, 10) and output.bin_logits.dtype == torch.float32
    assert output.logits.shape == (2, 1) and output.logits.dtype == torch.float32
    mean, std = ops.dist_moments(output.bin_logits, backend="eager")
    torch.testing.assert_close(output.logits[:, 0], mean)
    torch.testing.assert_close(output.mean, mean)
    torch.testing.assert_close(output.std, std)
    assert ((output.mean >= 0) & (output.mean <= 1)).all()


def test_padding_with_eos_does_not_change_the_reward(model, tokenizer):
    """Pad id == EOS id (as in SmolLM2): a padded row must score exactly like the same row alone."""
    texts = ["How many a in: aab?<|im_end|>", "What is 9 + 9?<|im_end|>\n<|im_start|>assistant\n18<|im_end|>"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["input_ids"][0] == tokenizer.eos_token_id).sum() > 1  # its own EOS plus the pads
    padded = model(batch["input_ids"], batch["attention_mask"]).bin_logits
    for row, text in enumerate(texts):
        alone = tokenizer([text], return_tensors="pt")
        torch.testing.assert_close(padded[row], model(alone["input_ids"], alone["attention_mask"]).bin_logits[0],
                                   rtol=1e-5, atol=1e-5)


def test_head_gets_gradients_and_bins_are_configurable(tokenizer):
    model = DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, **SMALL), num_bins=5)
    batch = tokenizer(["Sort: 2 1"], return_tensors="pt")
    output = model(batch["input_ids"], batch["attention_mask"])
    assert output.bin_logits.shape == (1, 5)
    output.mean.sum().backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert next(model.backbone.parameters()).grad is not None


def test_save_and_load_round_trip(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = DistRewardForSequenceClassification.from_pretrained(tmp_path)
    assert not any(module.training for module in loaded.modules())  # eval mode, as transformers loads models
    assert loaded.num_bins == model.num_bins
    batch = tokenizer(["What is 1 + 2?", "Sort: 3 1"], return_tensors="pt", padding=True)
    torch.testing.assert_close(loaded(**batch).bin_logits, model(**batch).bin_logits, rtol=0, atol=0)


def test_from_backbone_accepts_a_saved_causal_lm_directory(tmp_path, tokenizer):
    policy = build_tiny_policy(tokenizer, seed=1, **SMALL)
    policy.save_pretrained(tmp_path)
    model = DistRewardForSequenceClassification.from_backbone(str(tmp_path))
    torch.testing.assert_close(model.backbone.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert not hasattr(model.backbone, "lm_head")


def test_load_reward_model_rejects_a_directory_without_a_reward_model(tmp_path):
    with pytest.raises(ValueError, match="^no reward model in"):
        load_reward_model(str(tmp_path), None)


@pytest.mark.parametrize("settings, match", [
    ({"head": "gaussian"}, "head must be one of distribution, scalar, got 'gaussian'"),
    ({"num_bins": 1}, "num_bins must be an integer >= 2, got 1"),
    ({"num_bins": 2.5}, "num_bins must be an integer >= 2, got 2.5"),
    ({"low": 1.0, "high": 1.0}, "low must be below high"),
])
def test_a_bad_head_setting_is_a_value_error(tokenizer, settings, match):
    with pytest.raises(ValueError, match=match):
        DistRewardForSequenceClassification.from_backbone(build_tiny_policy(tokenizer, **SMALL), **settings)


def test_a_config_without_a_backbone_config_is_a_value_error():
    with pytest.raises(ValueError, match="no backbone_config"):
        DistRewardForSequenceClassification(DistRewardConfig())
