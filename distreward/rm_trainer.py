"""Stage ``rm``: train the distributional reward model on preference pairs and evaluate it (docs/math.md §1-3, §7).

``loss_kind`` picks the objective: ``bt_mean`` (hypothesis 1.1, Bradley-Terry on the means only),
``bt_kl`` (hypothesis 1.2, the default: Bradley-Terry plus KL to Gaussian score labels) or ``dpl``;
the baselines ``scalar_bt`` (TRL's Bradley-Terry loss) and ``scalar_reg`` (plus a squared error to the
score labels) train a scalar head instead. ``margin_temperature`` divides every Bradley-Terry margin.

Backbone: ``--model_name_or_path`` (default ``RUN_DIR/sft``, the ``sft`` stage's output). When that
default directory does not exist, a freshly initialised embedded tiny Llama is used instead and a
line says so; any other path or hub id that fails to load is an error.

Outputs in ``output_dir``: ``rm_config.json`` (these settings), ``metrics.jsonl``, ``checkpoint-{step}/``
(until the run finishes, unless ``--keep_checkpoints``), the model as a Hugging Face model (``config.json``,
``model.safetensors``, ``modeling_distreward.py``: see :func:`distreward.modeling.save_reward_model`), its
tokenizer and ``README.md``, ``eval.json`` (held-out metrics on the test pairs, per prompt kind and against the ground
truth too for the embedded task; the validation pairs' under ``validation``),
``predictions.safetensors``, ``distributions.png`` and (distributional heads) ``reliability.png``.
"""
import functools
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch.utils.data import DataLoader

from distreward import evaluation, ops
from distreward.data import (EMBEDDED, PreferenceCollator, PreferenceTrainingConfig, held_out_pairs,
                             load_preference_data)
from distreward.labels import check_label_kind
from distreward.modeling import DistRewardForSequenceClassification, load_policy, save_reward_model
from distreward.ops.validation import check_choice, check_positive
from distreward.trainer_utils import make_accelerator, save_run_config, train_loop

RUN_CONFIG_NAME = evaluation.RM_CONFIG_NAME  # the model's config.json is the model's, as the sft stage's is
DISTRIBUTIONS_NAME = "distributions.png"
RELIABILITY_NAME = "reliability.png"


@dataclass
class RewardConfig(PreferenceTrainingConfig):
    """Settings of the ``rm`` stage (shared training and data flags come from PreferenceTrainingConfig)."""

    stage: ClassVar[str] = "rm"
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Backbone: a causal LM directory (default: RUN_DIR/sft, the sft stage's output; if that default is "
                "missing, a fresh embedded tiny Llama), 'embedded' for a fresh tiny Llama, or a hub id "
                "such as HuggingFaceTB/SmolLM2-135M-Instruct."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Embedded task: validation and test pairs, each as a share of --num_pairs (other data are "
                "split by prompt hash, 10%% each)."})
    score_min: float = field(default=0.0, metadata={"help": "Lowest possible score (HelpSteer2 average_rating: 0)."})
    score_max: float = field(default=4.0, metadata={"help": "Highest possible score (HelpSteer2 average_rating: 4)."})
    num_bins: int = field(default=10, metadata={"help": "Bins K of the reward distribution over [0, 1]."})
    loss_kind: str = field(default="bt_kl", metadata={
        "help": "bt_mean (H1.1: Bradley-Terry on E), bt_kl (H1.2: + KL to Gaussian labels), dpl, or the scalar "
                "baselines scalar_bt (TRL Bradley-Terry) and scalar_reg (+ squared error to the labels)."})
    label_kind: str = field(default="auto", metadata={
        "help": "Score labels (docs/math.md §2): gaussian (the write-up's fixed width --sigma), gaussian_spread "
                "(width sqrt(sigma^2 + the raters' sd^2)), mixture (the mean of one Gaussian per rater) or auto "
                "(mixture where the data keep per-rater ratings, as the embedded task v2 does; gaussian elsewhere). "
                "Scalar heads and bt_mean read only the mean."})
    sigma: float = field(default=0.1, metadata={"help": "Width of the Gaussian label distribution (sigma0 of the "
                                                        "panel label kinds)."})
    score_weight: float = field(default=1.0, metadata={
        "help": "Weight of the KL term (bt_kl, dpl) or of the squared error (scalar_reg)."})
    margin_temperature: float = field(default=1.0, metadata={
        "help": "The Bradley-Terry term is -log sigmoid((E_c - E_r) / T) (dpl: only 1)."})
    ops_backend: str = field(default="auto", metadata={"help": "distreward.ops backend: auto, eager or triton."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (use ~1e-5 for SmolLM2)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training pairs "
                                                                   "(ignored when --max_steps > 0)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Pairs per batch in evaluation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_name_or_path is None:
            self.model_name_or_path = self.default_backbone()
        check_choice("--loss_kind", self.loss_kind, ops.REWARD_LOSS_KINDS)
        check_label_kind(self.label_kind)
        check_choice("--ops_backend", self.ops_backend, ("auto", "eager", "triton"))
        check_positive("--margin_temperature", self.margin_temperature)
        if self.loss_kind == "dpl" and self.margin_temperature != 1:
            raise ValueError("--margin_temperature applies to a Bradley-Terry margin: dpl has none (leave it 1)")
        if self.is_scalar and self.ops_backend == "triton":
            raise ValueError(f"--loss_kind {self.loss_kind} trains a scalar head, which has no triton backend")
        if self.ops_backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--ops_backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 set before the start, "
                             "which runs the kernels slowly on the CPU): use auto or eager")
        ops.bin_centers(self.num_bins)  # raises unless num_bins is an integer >= 2
        check_positive("--sigma", self.sigma)
        check_positive("--score_weight", self.score_weight, allow_zero=True)
        if self.dataset_name == EMBEDDED:
            held_out_pairs(self.num_pairs, self.eval_fraction)  # enough validation and test pairs to evaluate

    @property
    def reads_labels(self) -> bool:
        """Whether ``loss_kind`` reads the score labels' distribution (not bt_mean, not the scalar heads)."""
        return self.loss_kind in ("bt_kl", "dpl")

    @property
    def is_scalar(self) -> bool:
        """Whether ``loss_kind`` trains a scalar head (the baselines) rather than a distribution."""
        return self.loss_kind in ops.SCALAR_LOSS_KINDS

    def default_backbone(self) -> str:
        return os.path.join(self.run_dir, "sft")


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
    if config.ops_backend != "auto":
        model.moments = functools.partial(ops.dist_moments, backend=config.ops_backend)
    return model, tokenizer


def pair_labels(batch: dict, config: RewardConfig) -> tuple:
    """((target_chosen, target_rejected), sigma) for ``ops.pair_loss`` from a collated batch: the panel label
    distributions q [B, K] (``mixture``) or the means [B] with per-answer widths (``gaussian_spread``) or the
    fixed ``config.sigma``. Batches carry panel labels only for a loss that reads them
    (:attr:`RewardConfig.reads_labels`: :func:`run_reward_training` loads the others' data with mean labels)."""
    if "q_chosen" in batch:
        return (batch["q_chosen"], batch["q_rejected"]), config.sigma
    sigma = (batch["sigma_chosen"], batch["sigma_rejected"]) if "sigma_chosen" in batch else config.sigma
    return (batch["target_chosen"], batch["target_rejected"]), sigma


def pair_loss_fn(config: RewardConfig, centers: Optional[torch.Tensor]):
    """``compute_loss(model, batch) -> (loss, metrics)`` for :func:`train_loop`: both sides in one forward, the
    loss over the model's bin ``centers`` [K] (None for a scalar head, which logs no ``mean_std``)."""

    def compute_loss(model, batch):
        output = model(torch.cat([batch["input_ids_chosen"], batch["input_ids_rejected"]]),
                       torch.cat([batch["attention_mask_chosen"], batch["attention_mask_rejected"]]))
        logits_chosen, logits_rejected = output.bin_logits.chunk(2)
        targets, sigma = pair_labels(batch, config)
        loss = ops.pair_loss(logits_chosen, logits_rejected, *targets,
                             kind=config.loss_kind, sigma=sigma, score_weight=config.score_weight,
                             centers=None if centers is None else centers.to(logits_chosen.device),
                             backend=config.ops_backend, temperature=config.margin_temperature)
        mean_chosen, mean_rejected = output.mean.detach().chunk(2)
        metrics = {"accuracy": (mean_chosen > mean_rejected).float().mean()}
        if centers is not None:
            metrics["mean_std"] = output.std.detach().mean()
        return loss, metrics

    return compute_loss


def run_reward_training(config: RewardConfig):
    """Train, save and evaluate the reward model; returns the trained model (eval.json's numbers are printed)."""
    accelerator = make_accelerator(config)
    model, tokenizer = load_backbone(config, accelerator.print)
    with accelerator.main_process_first():  # rank 0 downloads and caches the data, the others then read it
        data = load_preference_data(tokenizer, config.dataset_name, config.dataset_split, config.num_pairs,
                                    config.score_min, config.score_max, config.eval_fraction, config.max_length,
                                    config.seed, config.task, config.label_kind if config.reads_labels else "gaussian",
                                    config.sigma, config.num_bins)
    if accelerator.is_main_process:
        save_run_config(config, config.output_dir, RUN_CONFIG_NAME)
    loader = DataLoader(data["train"], batch_size=config.per_device_train_batch_size, shuffle=True,
                        collate_fn=PreferenceCollator(tokenizer.pad_token_id))
    model = train_loop(config, accelerator, model, loader, pair_loss_fn(config, model.centers), tokenizer,
                       description=f"rm ({config.loss_kind})")
    if accelerator.is_main_process:
        save_reward_model(model, tokenizer, config.output_dir)
        evaluate_and_report(model, tokenizer, data, config, accelerator.print)
    accelerator.wait_for_everyone()
    return model


def held_out_metrics(model, tokenizer, pairs, config: RewardConfig) -> tuple:
    """(metrics, predictions) of the reward model on held-out ``pairs`` (with the ground-truth, per-kind and
    per prompt group (clear / ambiguous) metrics where the pairs carry those columns)."""
    predictions = evaluation.predict(model, pairs, tokenizer.pad_token_id, config.per_device_eval_batch_size)
    report = evaluation.reward_metrics(predictions, config.sigma)
    if "truth_chosen" in pairs.column_names:
        report.update(evaluation.truth_metrics(predictions, pairs["truth_chosen"], pairs["truth_rejected"]))
    if "kind" in pairs.column_names:
        report["by_kind"] = evaluation.metrics_by_group(predictions, pairs["kind"], config.sigma)
    if "region" in pairs.column_names:
        report["by_region"] = evaluation.metrics_by_group(predictions, pairs["region"], config.sigma)
        if "ratings_chosen" in pairs.column_names and not config.is_scalar:
            report["panel"] = evaluation.panel_metrics(predictions, pairs)
    elif "kind" in pairs.column_names:
        report["by_prompt_group"] = evaluation.metrics_by_group(
            predictions, evaluation.prompt_groups(pairs["kind"]), config.sigma)
    return report, predictions


def evaluate_and_report(model, tokenizer, data, config: RewardConfig, print_fn=print) -> dict:
    """Write ``eval.json`` (the test pairs' metrics, and the validation pairs' under ``validation``),
    ``predictions.safetensors``, ``distributions.png`` and, for a distributional head, ``reliability.png``
    (test pairs, a curve per prompt group where the pairs have kinds)."""
    report, predictions = held_out_metrics(model, tokenizer, data["test"], config)
    report["validation"], _ = held_out_metrics(model, tokenizer, data["validation"], config)
    with open(os.path.join(config.output_dir, "eval.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    evaluation.save_predictions(predictions, config.output_dir)
    evaluation.plot_runs({config.loss_kind: predictions}, os.path.join(config.output_dir, DISTRIBUTIONS_NAME))
    if not evaluation.is_scalar(predictions):
        columns = data["test"].column_names
        groups = (data["test"]["region"] if "region" in columns
                  else evaluation.prompt_groups(data["test"]["kind"]) if "kind" in columns else [])
        evaluation.plot_reliability(predictions, groups, os.path.join(config.output_dir, RELIABILITY_NAME))
    names = evaluation.METRIC_NAMES + ("truth_differs_accuracy", "ground_truth_accuracy")
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
