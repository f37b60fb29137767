"""Stage ``rm``: train the distributional reward model on preference pairs and evaluate it (docs/math.md §1-3, §7).

``loss_kind`` picks the objective: ``bt_mean`` (hypothesis 1.1, Bradley-Terry on the means only),
``bt_kl`` (hypothesis 1.2, the default: Bradley-Terry plus KL to Gaussian score labels) or ``dpl``;
the baselines ``scalar_bt`` (TRL's Bradley-Terry loss) and ``scalar_reg`` (plus a squared error to the
score labels) train a scalar head instead. ``margin_temperature`` divides every Bradley-Terry margin.

Backbone: ``--model_name_or_path`` (default ``RUN_DIR/sft``, the ``sft`` stage's output). When that
default directory does not exist, a freshly initialised embedded tiny Llama is used instead and a
line says so; any other path or hub id that fails to load is an error.

Training is :class:`~distreward.reward_trainer.DistRewardTrainer` (a ``transformers.Trainer``), so every
``TrainingArguments`` flag works here too. Outputs in ``output_dir``: ``rm_config.json`` (these settings),
``metrics.jsonl``, ``checkpoint-{step}/`` (the Trainer's, until the run finishes, unless ``--keep_checkpoints``),
the model as a Hugging Face model (``config.json``,
``model.safetensors``, ``modeling_distreward.py``: see :func:`distreward.modeling.save_reward_model`), its
tokenizer and ``README.md``, ``eval.json`` (held-out metrics on the test pairs, per prompt kind and against the ground
truth too for the embedded task; the validation pairs' under ``validation``),
``predictions.safetensors``, ``distributions.png`` and (distributional heads) ``reliability.png``. With
``--use_peft`` the model is the LoRA-merged one, and ``adapter/`` holds the adapter and head as trained
(``PeftModel.from_pretrained(reward model on the same backbone, "OUTPUT_DIR/adapter")`` loads them back).
"""
import functools
import json
import os

import torch
from accelerate import PartialState
from transformers import set_seed
from transformers.utils import logging as transformers_logging

from distreward import ops, plots, rm_metrics
from distreward.data import EMBEDDED, load_preference_data
from distreward.modeling import DistRewardForSequenceClassification, load_policy, load_reward_model, save_reward_model
from distreward.reward_trainer import DistRewardTrainer, RewardConfig, held_out_metrics
from distreward.run_files import ADAPTER_DIR, DISTRIBUTIONS_NAME, EVAL_NAME, RELIABILITY_NAME, RM_CONFIG_NAME


def load_backbone(config: RewardConfig, print_fn=print):
    """(reward model with a fresh head, tokenizer) for ``config.model_name_or_path`` (see module doc)."""
    path = config.model_name_or_path
    if path == config.default_backbone() and not os.path.isdir(path):
        print_fn(f"{path} not found: using a freshly initialised embedded tiny Llama as the backbone "
                 f"(run `python -m distreward.train sft` first for an SFT-initialised one)")
        path = EMBEDDED
    backbone, tokenizer = load_policy(path, config.seed)
    model = DistRewardForSequenceClassification.from_backbone(
        backbone, num_bins=config.num_bins, head="scalar" if config.is_scalar else "distribution")
    return with_ops_backend(model, config), tokenizer


def with_ops_backend(model: DistRewardForSequenceClassification, config: RewardConfig):
    """``model``, its moments computed with ``config.ops_backend`` unless that is ``auto``."""
    if config.ops_backend != "auto":
        model.moments = functools.partial(ops.dist_moments, backend=config.ops_backend)
    return model


def run_reward_training(config: RewardConfig):
    """Train, save and evaluate the reward model with :class:`DistRewardTrainer`; returns the trained model
    (eval.json's numbers are printed)."""
    state = PartialState()
    set_seed(config.seed)  # the head's initialisation
    model, tokenizer = load_backbone(config, state.print)
    with state.main_process_first():  # rank 0 downloads and caches the data, the others then read it
        data = load_preference_data(tokenizer, config.dataset_name, config.dataset_split, config.num_pairs,
                                    config.score_min, config.score_max, config.eval_fraction, config.max_length,
                                    config.seed, config.task, config.label_kind if config.reads_labels else "gaussian",
                                    config.sigma, config.num_bins)
    if state.is_main_process:
        config.to_json_file(os.path.join(config.output_dir, RM_CONFIG_NAME))
    trainer = DistRewardTrainer(model, config, train_dataset=data["train"], eval_dataset=data["validation"],
                                processing_class=tokenizer)  # evaluated during training with --eval_strategy
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded and config.use_peft:
        raise ValueError("--use_peft under FSDP or DeepSpeed: the rm stage merges the adapter into the model it saves, "
                         "which needs the whole model in one process (launch a LoRA run without sharding)")
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar per save: the Trainer's bar tells it
    trainer.train(resume_from_checkpoint=config.resume)
    # sharded: the whole weights, gathered on process 0 (a collective: every process calls it)
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if config.use_peft:  # the adapter and head as trained, then the merged model as the stage's output
        if state.is_main_process:
            model.save_pretrained(os.path.join(config.output_dir, ADAPTER_DIR))
        model = model.merge_and_unload()
    if state.is_main_process:
        if sharded:  # process 0 holds a shard only: save the gathered weights, evaluate the model as saved
            save_gathered(model, tokenizer, config.output_dir, state_dict)
            model = with_ops_backend(load_reward_model(config.output_dir, tokenizer)[0], config).to(state.device)
        else:
            save_reward_model(model, tokenizer, config.output_dir)
        evaluate_and_report(model, tokenizer, data, config, state.print)
    state.wait_for_everyone()
    return model


def save_gathered(model, tokenizer, directory: str, state_dict: dict) -> None:
    """:func:`save_reward_model` of a sharded ``model`` (FSDP2 turns it into another class in place) from its whole
    ``state_dict``, gathered on this process: written through an empty (meta-device) model of its config."""
    with torch.device("meta"):
        shell = DistRewardForSequenceClassification(model.config)
    save_reward_model(shell, tokenizer, directory, state_dict)


def evaluate_and_report(model, tokenizer, data, config: RewardConfig, print_fn=print) -> dict:
    """Write ``eval.json`` (the test pairs' metrics, and the validation pairs' under ``validation``),
    ``predictions.safetensors``, ``distributions.png`` and, for a distributional head, ``reliability.png``
    (test pairs, a curve per prompt group where the pairs have kinds)."""
    report, predictions = held_out_metrics(model, tokenizer, data["test"], config)
    report["validation"], _ = held_out_metrics(model, tokenizer, data["validation"], config)
    with open(os.path.join(config.output_dir, EVAL_NAME), "w") as handle:
        json.dump(report, handle, indent=2)
    rm_metrics.save_predictions(predictions, config.output_dir)
    plots.plot_runs({config.loss_kind: predictions}, os.path.join(config.output_dir, DISTRIBUTIONS_NAME))
    if not rm_metrics.is_scalar(predictions):
        columns = data["test"].column_names
        groups = (data["test"]["region"] if "region" in columns
                  else rm_metrics.prompt_groups(data["test"]["kind"]) if "kind" in columns else [])
        plots.plot_reliability(predictions, groups, os.path.join(config.output_dir, RELIABILITY_NAME))
    names = rm_metrics.METRIC_NAMES + ("truth_differs_accuracy", "ground_truth_accuracy")
    print_fn(f"test pairs ({report['num_pairs']}, prompts unseen in training): "
             + ", ".join(f"{key} {report[key]:.3f}" for key in names if report.get(key) is not None))
    if "panel" in report:
        panel = report["panel"]
        print_fn(f"rater panel: Spearman(predicted std, raters' sd) {panel['std_spread_spearman']:.3f}; by region "
                 "(truth-ranked accuracy; std / careful-correct std, all and disputed answers): " + ", ".join(
                     f"{name} {values['ground_truth_accuracy']:.3f}; {values['std_ratio_to_careful_correct']:.2f}x"
                     + (f" {values['disputed_std_ratio_to_careful_correct']:.2f}x"
                        if values["disputed_std_ratio_to_careful_correct"] is not None else "")
                     for name, values in panel["by_region"].items()))
    return report
