"""Stage ``sft``: supervised warm-up of the policy (loss on answer tokens only): on the embedded task ``v2``
the demonstrator's answers (:mod:`distreward.testbed`), elsewhere the chosen answers of the pairs.

With the defaults it trains the embedded tiny Llama (:mod:`distreward.tiny`) on the generated task
in a few minutes on a 2-core CPU, so the reward model and REINFORCE
start from a real SFT model. ``--model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct
--dataset_name esfrankel17/HelpSteer2_binarized`` runs the same recipe on the hub defaults.

Outputs in ``output_dir``: the policy and tokenizer in ``save_pretrained`` form (so
``AutoModelForCausalLM.from_pretrained(output_dir)`` loads it; its ``config.json`` is the model's,
so the run's settings go to ``sft_config.json``), ``metrics.jsonl``, ``checkpoint-{step}/`` and, for
the embedded task, ``eval.json`` with the ground-truth score of greedy answers to test prompts (per region).
It trains on the ``train`` prompts' pairs only (:mod:`distreward.splits`). Training is :class:`CompletionTrainer`,
a ``transformers.Trainer`` (every ``TrainingArguments`` flag works here too, as in the ``rm`` stage), with the
loss on the answer tokens only, TRL's completion-only loss.
"""
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

from accelerate import PartialState
from transformers import AutoModelForCausalLM, set_seed
from transformers.utils import logging as transformers_logging

from distreward.data import EMBEDDED, HELD_OUT_SPLITS, CompletionCollator, embedded_task, load_sft_data
from distreward.modeling import load_policy
from distreward.ops.validation import check_choice
from distreward.rollout import generate_rollouts
from distreward.run_files import EVAL_NAME, SFT_CONFIG_NAME
from distreward.stage_trainer import StageArguments, StageTrainer


@dataclass
class SFTConfig(StageArguments):
    """Settings of the ``sft`` stage: a ``TrainingArguments`` (:class:`~distreward.stage_trainer.StageArguments`:
    the Trainer's flags, and the loop before's as aliases)."""

    stage: ClassVar[str] = "sft"
    model_name_or_path: str = field(default=EMBEDDED, metadata={
        "help": "Policy to fine-tune: 'embedded' builds the tiny offline Llama, otherwise a hub id "
                "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or a local directory."})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "Peak AdamW learning rate (tuned on validation problems for the embedded tiny Llama: 2e-3 left "
                "some seeds' policies unable to add; use ~2e-5 for SmolLM2)."})
    num_train_epochs: float = field(default=12.0, metadata={
        "help": "Passes over the SFT data (ignored when --max_steps > 0; at 8, the default before 2026-12-02, some "
                "seeds' policies learned to add only in part; a weaker SFT policy samples answers unlike the reward "
                "model's training pairs, and REINFORCE then exploits the reward model)."})
    num_pairs: int = field(default=4000, metadata={"help": "Conversations to train on: demonstrations of the "
                                                           "embedded task v2, pairs' chosen sides otherwise."})
    num_eval_prompts: int = field(default=256, metadata={"help": "Held-out prompts answered greedily for "
                                                                 "eval.json (embedded task only; 0 skips it)."})
    eval_split: str = field(default="test", metadata={
        "help": "Prompts eval.json uses: test (reports) or validation (tuning settings)."})

    def check(self) -> None:
        check_choice("--eval_split", self.eval_split, HELD_OUT_SPLITS)


def evaluate_policy(policy, tokenizer, num_prompts: int, seed: int, task: str = "v2", split: str = "test") -> dict:
    """Mean ground-truth score (0-4) of greedy answers to ``num_prompts`` distinct ``split`` prompts of the embedded
    ``task``, overall and per region (``by_region``: mean and number of prompts)."""
    source = embedded_task(task)
    prompts = source.make_prompts(num_prompts, seed=seed, split=split, unique=True)
    answers = generate_rollouts(policy, tokenizer, prompts, max_new_tokens=16, temperature=0).responses
    scores = [source.score_response(prompt, answer) for prompt, answer in zip(prompts, answers)]
    by_region = {}
    for prompt, score in zip(prompts, scores):
        by_region.setdefault(source.prompt_region(prompt), []).append(score)
    return {"ground_truth": {"mean": sum(scores) / len(scores)}, "num_prompts": num_prompts, "split": split,
            "decoding": "greedy",
            "by_region": {name: {"mean": sum(values) / len(values), "num_prompts": len(values)}
                          for name, values in sorted(by_region.items())},
            "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:8]]}


class CompletionTrainer(StageTrainer):
    """``transformers.Trainer`` for a causal LM on :class:`~distreward.data.CompletionCollator` batches: the
    cross-entropy on the answer tokens only (labels are -100 elsewhere), each micro-batch's mean over its answer
    tokens, as the loop before computed it (:class:`~distreward.stage_trainer.StageTrainer`: ``metrics.jsonl``,
    resume, stop on a signal)."""

    def loss_and_metrics(self, model, inputs) -> tuple:
        return model(**inputs).loss, {}


def run_sft(config: SFTConfig):
    """Fine-tune the policy on the SFT data (:func:`~distreward.data.load_sft_data`) with :class:`CompletionTrainer`;
    save it with its tokenizer to ``config.output_dir``."""
    state = PartialState()
    set_seed(config.seed)
    policy, tokenizer = load_policy(config.model_name_or_path, config.seed)
    with state.main_process_first():  # rank 0 downloads and caches the data, the others then read it
        data = load_sft_data(tokenizer, config.dataset_name, config.dataset_split, config.num_pairs,
                             config.max_length, config.seed, config.task)
    if state.is_main_process:
        config.to_json_file(os.path.join(config.output_dir, SFT_CONFIG_NAME))
    trainer = CompletionTrainer(model=policy, args=config, train_dataset=data, processing_class=tokenizer,
                                data_collator=CompletionCollator(tokenizer.pad_token_id))
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar per save: the Trainer's bar tells it
    trainer.train(resume_from_checkpoint=config.resume)
    # sharded: the whole weights, gathered on process 0 (a collective: every process calls it)
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if state.is_main_process:
        policy.save_pretrained(config.output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(config.output_dir)
        if sharded:  # process 0 holds a shard only: evaluate the policy as saved
            policy = AutoModelForCausalLM.from_pretrained(config.output_dir).to(state.device)
        if config.dataset_name == EMBEDDED and config.num_eval_prompts > 0:
            report = evaluate_policy(policy, tokenizer, config.num_eval_prompts, config.seed, config.task,
                                     config.eval_split)
            with open(os.path.join(config.output_dir, EVAL_NAME), "w") as handle:
                json.dump(report, handle, indent=2)
            state.print(f"SFT policy, greedy answers to {config.num_eval_prompts} {config.eval_split} prompts: mean "
                        f"ground truth {report['ground_truth']['mean']:.2f} / 4 (greedy decoding; REINFORCE's table "
                        f"scores sampled answers, so its sft row differs); by region: "
                        + ", ".join(f"{name} {values['mean']:.2f}" for name, values in report["by_region"].items()))
    state.wait_for_everyone()
    return policy
