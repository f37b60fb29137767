"""The sft stage on transformers' Trainer (CompletionTrainer): parity with the loop before it, the loss on the
answer tokens only, and exact resume after a kill."""
import json

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from distreward import testbed
from distreward.data import IGNORE_INDEX, CompletionCollator, load_sft_data
from distreward.sft_trainer import CompletionTrainer, SFTConfig, evaluate_policy
from distreward.tiny import build_tiny_policy
from distreward.trainer_utils import make_accelerator, train_loop
from kills import Killed, killed_at

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def demonstrations(tokenizer):
    return load_sft_data(tokenizer, num_pairs=40, seed=0)


def config_for(tmp_path, name, **overrides):
    settings = dict(output_dir=str(tmp_path / name), max_steps=20, per_device_train_batch_size=8, logging_steps=1,
                    save_steps=100, learning_rate=3e-3, seed=0)
    return SFTConfig(**{**settings, **overrides})


def small_policy(tokenizer):
    set_seed(0)
    return build_tiny_policy(tokenizer, seed=0, **SMALL)


def train(config, tokenizer, data, kill_at_micro_step=None):
    trainer = CompletionTrainer(model=small_policy(tokenizer), args=config, train_dataset=data,
                                processing_class=tokenizer, data_collator=CompletionCollator(tokenizer.pad_token_id))
    trainer.loss_and_metrics = killed_at(kill_at_micro_step, trainer.loss_and_metrics)
    trainer.train(resume_from_checkpoint=config.resume)
    return trainer.accelerator.unwrap_model(trainer.model)


def read_metrics(output_dir):
    with open(f"{output_dir}/metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_twenty_steps_match_the_loop_before(tmp_path, tokenizer, demonstrations):
    """20 steps (4 epochs of 5 shuffled batches) of CompletionTrainer and of train_loop (the sft stage's loop before)
    log the same losses and learning rates and end with the same weights: tolerance 1e-5 relative (measured here:
    equal to the bit)."""
    new = train(config_for(tmp_path, "trainer"), tokenizer, demonstrations)
    config = config_for(tmp_path, "loop")
    loader = DataLoader(demonstrations, batch_size=8, shuffle=True,
                        collate_fn=CompletionCollator(tokenizer.pad_token_id))
    accelerator = make_accelerator(config)
    old = train_loop(config, accelerator, small_policy(tokenizer), loader, lambda model, batch: (model(**batch).loss, {}))
    new_metrics, old_metrics = read_metrics(tmp_path / "trainer"), read_metrics(tmp_path / "loop")
    assert [m["step"] for m in new_metrics] == [m["step"] for m in old_metrics] == list(range(1, 21))
    for name in ("loss", "lr", "epoch"):
        assert [m[name] for m in new_metrics] == pytest.approx([m[name] for m in old_metrics], rel=1e-5), name
    assert new_metrics[-1]["loss"] < new_metrics[0]["loss"]
    for (name, expected), actual in zip(old.state_dict().items(), new.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_the_loss_reads_the_answer_tokens_only(tmp_path, tokenizer, demonstrations):
    """Changing a prompt token's label target cannot change the loss: it is -100 (ignored) there."""
    batch = CompletionCollator(tokenizer.pad_token_id)([demonstrations[i] for i in range(4)])
    prompt = batch["labels"] == IGNORE_INDEX
    assert prompt.any() and (~prompt).any()
    policy = small_policy(tokenizer)
    trainer = CompletionTrainer(model=policy, args=config_for(tmp_path, "loss"), train_dataset=demonstrations,
                                processing_class=tokenizer)
    loss, _ = trainer.loss_and_metrics(policy, batch)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, tokenizer, demonstrations):
    options = dict(max_steps=6, save_steps=2, gradient_accumulation_steps=2, logging_steps=5)
    straight = train(config_for(tmp_path, "straight", **options), tokenizer, demonstrations)
    killed = config_for(tmp_path, "killed", **options)
    with pytest.raises(Killed):
        train(killed, tokenizer, demonstrations, kill_at_micro_step=9)  # in step 5, after checkpoint-4
    killed.resume = True
    resumed = train(killed, tokenizer, demonstrations)
    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    # logged at steps 5 and 6: step 5's means cover steps 1-4 too (their window, carried in checkpoint-4)
    assert read_metrics(killed.output_dir) == read_metrics(tmp_path / "straight")
    assert [m["step"] for m in read_metrics(killed.output_dir)] == [5, 6]


def test_the_greedy_evaluation_reads_the_split_it_is_given(tmp_path, tokenizer):
    """``--eval_split validation`` (the pipeline's, when tuning) answers validation prompts, never test ones: the
    prompts in eval.json's examples lie in the split asked for; an unknown split is a one-line error."""
    policy = small_policy(tokenizer)
    for split in ("validation", "test"):
        report = evaluate_policy(policy, tokenizer, num_prompts=8, seed=0, split=split)
        assert report["split"] == split and len(report["examples"]) == 8
        assert {testbed.prompt_split(testbed.problem_key(example["prompt"])) for example in report["examples"]} == {
            split}
    with pytest.raises(ValueError, match="--eval_split"):
        config_for(tmp_path, "bad", eval_split="train")
