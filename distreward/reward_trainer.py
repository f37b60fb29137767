"""The reward-model trainer as a library class: :class:`DistRewardTrainer` (a ``transformers.Trainer``) and its
settings :class:`RewardConfig` (a ``TrainingArguments``), shaped as TRL's ``RewardTrainer`` / ``RewardConfig``.

TRL's ``RewardTrainer`` trains a head with one output; this one trains
:class:`~distreward.modeling_distreward.DistRewardForSequenceClassification` (K bins, or a scalar head) with
``ops.pair_loss`` for every ``loss_kind`` (docs/math.md §1-3), on :class:`~distreward.data.PreferenceCollator`
batches, which carry the score labels. Everything else is the Trainer's: DDP, FSDP2 and DeepSpeed ZeRO through
``accelerate launch --config_file``, LoRA through PEFT (``--use_peft``), gradient checkpointing, bf16,
``report_to``, ``push_to_hub`` and resume (``--resume``, or ``train(resume_from_checkpoint=...)``).

    trainer = DistRewardTrainer(model, RewardConfig(output_dir="rm", loss_kind="bt_kl"), train_dataset=pairs,
                                eval_dataset=held_out, processing_class=tokenizer)
    trainer.train()
    trainer.evaluate()  # eval_pairwise_accuracy, eval_mean_std, eval_label_kl, eval_calibration_ece, ...

``python -m distreward.train rm`` (:mod:`distreward.rm_trainer`) runs it on the embedded task or a data set.
"""
import importlib.util
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from distreward import ops, rm_metrics
from distreward.data import EMBEDDED, PreferenceCollator, held_out_pairs
from distreward.defaults import NUM_BINS, SIGMA
from distreward.labels import check_label_kind
from distreward.ops import loss_kinds, registry
from distreward.ops.validation import check_choice, check_positive
from distreward.run_files import SFT_DIR
from distreward.stage_trainer import StageArguments, StageTrainer


@dataclass
class RewardConfig(StageArguments):
    """Settings of the ``rm`` stage and of :class:`DistRewardTrainer`: a ``TrainingArguments``
    (:class:`~distreward.stage_trainer.StageArguments`: the Trainer's flags, and the loop before's as aliases)."""

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
    num_bins: int = field(default=NUM_BINS, metadata={"help": "Bins K of the reward distribution over [0, 1]."})
    loss_kind: str = field(default="bt_kl", metadata={
        "help": "bt_mean (H1.1: Bradley-Terry on E), bt_kl (H1.2: + KL to Gaussian labels), dpl, or the scalar "
                "baselines scalar_bt (TRL Bradley-Terry) and scalar_reg (+ squared error to the labels)."})
    label_kind: str = field(default="auto", metadata={
        "help": "Score labels (docs/math.md §2): gaussian (the write-up's fixed width --sigma), gaussian_spread "
                "(width sqrt(sigma^2 + the raters' sd^2)), mixture (the mean of one Gaussian per rater) or auto "
                "(mixture where the data keep per-rater ratings, as the embedded task v2 does; gaussian elsewhere). "
                "Scalar heads and bt_mean read only the mean."})
    sigma: float = field(default=SIGMA, metadata={"help": "Width of the Gaussian label distribution (sigma0 of the "
                                                        "panel label kinds)."})
    score_weight: float = field(default=1.0, metadata={
        "help": "Weight of the KL term (bt_kl, dpl) or of the squared error (scalar_reg)."})
    margin_temperature: float = field(default=1.0, metadata={
        "help": "The Bradley-Terry term is -log sigmoid((E_c - E_r) / T) (dpl: only 1)."})
    ops_backend: str = field(default="auto", metadata={"help": "distreward.ops backend: auto, eager, triton or cpp "
                                                                "(docs/math.md §6)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (use ~1e-5 for SmolLM2)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training pairs "
                                                                   "(ignored when --max_steps > 0)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Pairs per batch in evaluation."})
    use_peft: bool = field(default=False, metadata={
        "help": "Train LoRA adapters (PEFT) on the backbone and the whole head; the model saved is merged, the "
                "adapter and head go to OUTPUT_DIR/adapter (needs `pip install distreward[peft]`)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (--use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha: the update is scaled by alpha / r "
                                                          "(--use_peft)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (--use_peft)."})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "Backbone modules that get LoRA adapters, e.g. q_proj k_proj v_proj o_proj (--use_peft; default: "
                "PEFT's for the backbone's model type, q_proj v_proj for Llama, Qwen2, ...)."})

    def check(self) -> None:
        if self.model_name_or_path is None:
            self.model_name_or_path = self.default_backbone()
        check_choice("--loss_kind", self.loss_kind, ops.REWARD_LOSS_KINDS)
        check_label_kind(self.label_kind)
        check_choice("--ops_backend", self.ops_backend, ops.BACKENDS)
        check_positive("--margin_temperature", self.margin_temperature)
        loss_kinds.check_temperature(self.loss_kind, self.margin_temperature, "--margin_temperature")
        if self.is_scalar and registry.unavailable(self.ops_backend, op="scalar_pair_loss"):  # eager only
            raise ValueError(f"--loss_kind {self.loss_kind} trains a scalar head, which has no {self.ops_backend} "
                             "backend")
        reason = registry.unavailable(self.ops_backend)
        if reason:
            raise ValueError(f"--ops_backend {self.ops_backend} {reason}: use auto or eager")
        ops.bin_centers(self.num_bins)  # raises unless num_bins is an integer >= 2
        check_positive("--sigma", self.sigma)
        check_positive("--score_weight", self.score_weight, allow_zero=True)
        if self.dataset_name == EMBEDDED:
            held_out_pairs(self.num_pairs, self.eval_fraction)  # enough validation and test pairs to evaluate
        if self.use_peft:
            check_positive("--lora_r", self.lora_r)
            check_positive("--lora_alpha", self.lora_alpha)
            if not 0 <= self.lora_dropout < 1:
                raise ValueError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}")
            if importlib.util.find_spec("peft") is None:
                raise ValueError("--use_peft needs PEFT: pip install 'distreward[peft]' (or pip install peft)")

    @property
    def reads_labels(self) -> bool:
        """Whether ``loss_kind`` reads the score labels' distribution (not bt_mean, not the scalar heads)."""
        return ops.LOSS_KIND_TABLE[self.loss_kind].reads_targets and not self.is_scalar

    @property
    def is_scalar(self) -> bool:
        """Whether ``loss_kind`` trains a scalar head (the baselines) rather than a distribution."""
        return ops.LOSS_KIND_TABLE[self.loss_kind].scalar

    def default_backbone(self) -> str:
        return os.path.join(self.run_dir, SFT_DIR)


def pair_labels(batch: dict, config: RewardConfig) -> tuple:
    """((target_chosen, target_rejected), sigma) for ``ops.pair_loss`` from a collated batch: the panel label
    distributions q [B, K] (``mixture``) or the means [B] with per-answer widths (``gaussian_spread``) or the
    fixed ``config.sigma``. Batches carry panel labels only for a loss that reads them
    (:attr:`RewardConfig.reads_labels`: the rm stage loads the others' data with mean labels)."""
    if "q_chosen" in batch:
        return (batch["q_chosen"], batch["q_rejected"]), config.sigma
    sigma = (batch["sigma_chosen"], batch["sigma_rejected"]) if "sigma_chosen" in batch else config.sigma
    return (batch["target_chosen"], batch["target_rejected"]), sigma


def pair_loss_fn(config: RewardConfig, centers: Optional[torch.Tensor]):
    """``compute_loss(model, batch) -> (loss, metrics)`` (the shape :func:`distreward.trainer_utils.train_loop`
    takes): both sides in one forward, the loss over the model's bin ``centers`` [K] (None for a scalar head,
    which logs no ``mean_std``); ``metrics`` are detached scalars (``accuracy``, ``mean_std``)."""

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


def held_out_metrics(model, tokenizer, pairs, config: RewardConfig) -> tuple:
    """(metrics, predictions) of the reward model on held-out ``pairs`` (with the ground-truth, per-kind and
    per prompt group (clear / ambiguous) metrics where the pairs carry those columns)."""
    predictions = rm_metrics.predict(model, pairs, tokenizer.pad_token_id, config.per_device_eval_batch_size)
    report = rm_metrics.reward_metrics(predictions, config.sigma)
    if "truth_chosen" in pairs.column_names:
        report.update(rm_metrics.truth_metrics(predictions, pairs["truth_chosen"], pairs["truth_rejected"]))
    if "kind" in pairs.column_names:
        report["by_kind"] = rm_metrics.metrics_by_group(predictions, pairs["kind"], config.sigma)
    if "region" in pairs.column_names:
        report["by_region"] = rm_metrics.metrics_by_group(predictions, pairs["region"], config.sigma)
        if "ratings_chosen" in pairs.column_names and not config.is_scalar:
            report["panel"] = rm_metrics.panel_metrics(predictions, pairs)
    elif "kind" in pairs.column_names:
        report["by_prompt_group"] = rm_metrics.metrics_by_group(
            predictions, rm_metrics.prompt_groups(pairs["kind"]), config.sigma)
    return report, predictions


def lora_config(args: RewardConfig, model):
    """The ``peft.LoraConfig`` of ``--use_peft`` for ``model`` (a DistRewardForSequenceClassification): LoRA of rank
    ``lora_r`` on the backbone's ``lora_target_modules`` (default: PEFT's for the backbone's model type) and the
    head trained whole (``modules_to_save``: a head on a frozen body would not learn a new reward)."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    targets = args.lora_target_modules
    if targets is None:
        model_type = model.config.backbone_config.model_type
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"PEFT has no default LoRA modules for a {model_type} backbone: name them with "
                             "--lora_target_modules")
        targets = DEFAULT_TARGETS[model_type]
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(targets), modules_to_save=["head"], bias="none")


class DistRewardTrainer(StageTrainer):
    """``transformers.Trainer`` for :class:`DistRewardForSequenceClassification` on preference pairs.

    ``train_dataset`` / ``eval_dataset``: tokenised pairs (``input_ids_chosen`` / ``input_ids_rejected`` and the
    score labels ``target_*`` [, ``sigma_*`` or ``q_*``], as :func:`distreward.data.load_preference_data` makes
    them); the default collator is :class:`PreferenceCollator`. ``peft_config``: a PEFT config to wrap the
    model with (default with ``args.use_peft``: :func:`lora_config`). Logs ``loss``, ``accuracy`` and, for a
    distributional head, ``mean_std`` (:class:`~distreward.stage_trainer.StageTrainer`: ``metrics.jsonl``, resume,
    stop on a signal); :meth:`evaluate` reports ``eval.json``'s metrics.
    """

    def __init__(self, model, args: RewardConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, callbacks=None, optimizers=(None, None), peft_config=None):
        if peft_config is None and args.use_peft:
            peft_config = lora_config(args, model)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if data_collator is None:
            data_collator = PreferenceCollator(processing_class.pad_token_id)
        self.pair_loss = pair_loss_fn(args, model.centers)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        self.can_return_loss, self.label_names = True, []

    def loss_and_metrics(self, model, inputs) -> tuple:
        """``ops.pair_loss`` of a collated batch of pairs, with ``accuracy`` and ``mean_std``."""
        return self.pair_loss(model, inputs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """``eval.json``'s numbers (pairwise and truth-differs accuracy, mean std, std-error Spearman, label KL,
        calibration ECE) of the pairs ``eval_dataset`` (default: the trainer's; a dict evaluates each under
        ``{prefix}_{name}``), prefixed and logged. Every process evaluates the whole set."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, dict):
            return {key: value for name, part in dataset.items()
                    for key, value in self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}").items()}
        report, _ = held_out_metrics(self.model, self.processing_class, dataset, self.args)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in report.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
