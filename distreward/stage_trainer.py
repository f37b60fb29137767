"""What the ``sft`` and ``rm`` stages share on ``transformers.Trainer``: :class:`StageArguments`, a
``TrainingArguments`` that keeps the flags and checks of the loop before
(:class:`~distreward.data_config.PreferenceTrainingConfig`), and :class:`StageTrainer`, a ``Trainer`` that keeps its outputs and guarantees: ``metrics.jsonl``, ``--resume``
ending with the files of an uninterrupted run, a checkpoint on SIGINT / SIGTERM, no checkpoint left by a finished
run (unless ``--keep_checkpoints``), a one-line error on a non-finite loss.
"""
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from transformers import Trainer, TrainerCallback, TrainingArguments

from distreward.data_config import PreferenceTrainingConfig
from distreward.distributed import has_accelerator
from distreward.run_files import METRICS_WINDOW_NAME
from distreward.trainer_utils import (MetricsLogger, StopRequest, TrainingInterrupted, list_checkpoints,
                                      reduce_micro_batch, remove_checkpoints, resolve_mixed_precision)


@dataclass
class StageArguments(PreferenceTrainingConfig, TrainingArguments):
    """A stage's settings as ``TrainingArguments`` (every Trainer flag works: ``--bf16``,
    ``--activation_checkpointing``, ``--report_to``, ``--push_to_hub``, ...), whose shared training and data flags
    and their checks come from PreferenceTrainingConfig. The loop before's names stay as aliases of the Trainer's:
    ``--warmup_ratio`` (used while ``--warmup_steps`` is 0; rounded down, as before), ``--resume``
    (``resume_from_checkpoint`` = the latest checkpoint), ``--mixed_precision`` (sets ``--bf16`` / ``--fp16``)."""

    optim: str = field(default="adamw_torch", metadata={
        "help": "Trainer optimizer name (default adamw_torch: torch.optim.AdamW, as the loop before)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep the data set's columns: the stage's collator reads what it needs (as TRL's trainers)."})

    def __post_init__(self) -> None:
        for name in ("lr_scheduler_type", "optim"):  # a copy (dataclasses.replace) passes the Trainer's enums back
            setattr(self, name, getattr(getattr(self, name), "value", getattr(self, name)))
        super().__post_init__()  # PreferenceTrainingConfig's checks and output_dir (TrainingConfig does not chain)
        self.check()
        precision = resolve_mixed_precision(self.mixed_precision)
        self.bf16, self.fp16 = self.bf16 or precision == "bf16", self.fp16 or precision == "fp16"
        self.use_cpu = self.use_cpu or not has_accelerator()  # torchrun on a CPU machine: gloo, not a lone process
        if self.data_seed is None:
            self.data_seed = self.seed  # the data order the loop before used (accelerate's seedable sampler)
        TrainingArguments.__post_init__(self)  # sets mixed_precision to what it resolved ("no", "bf16", "fp16")

    def check(self) -> None:
        """The stage's own checks (ValueError, one line), run before the Trainer's."""

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """``--warmup_steps`` when set, else ``floor(warmup_ratio * num_training_steps)``."""
        if self.warmup_steps > 0:
            return super().get_warmup_steps(num_training_steps)
        return int(self.warmup_ratio * num_training_steps)

    def to_json_file(self, path: str) -> None:
        """Write these settings (``to_dict``: enums as their values, tokens hidden)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)


class MetricsFileCallback(TrainerCallback):
    """Writes ``output_dir/metrics.jsonl`` (process 0): one line per logged training step, ``{"step", "epoch",
    "lr", "loss", ...the trainer's metrics}`` as the loop before wrote it; a resumed run keeps the lines up to its
    checkpoint's step."""

    logger: Optional[MetricsLogger] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.logger = MetricsLogger(args.output_dir, state.is_world_process_zero, resume_step=state.global_step)

    def on_log(self, args, state, control, logs=None, lr_scheduler=None, **kwargs):
        if self.logger is None or "loss" not in (logs or {}):
            return
        skipped = ("epoch", "learning_rate", "grad_norm", "loss")
        # lr: the scheduler's after the step (the next step's), as the loop before logged it; the Trainer's own
        # learning_rate (for report_to) is the step's
        self.logger.log(state.global_step, epoch=state.epoch, lr=lr_scheduler.get_last_lr()[0], loss=logs["loss"],
                        **{name: value for name, value in logs.items() if name not in skipped})


class StepFlowCallback(TrainerCallback):
    """The loop before's step flow on top of the Trainer's: ends training at the end of the step where
    :class:`StageTrainer` saw a stop request (SIGINT / SIGTERM on any process), saving a checkpoint there;
    at the last step, logs and saves no checkpoint (the run's output is the model)."""

    def __init__(self, trainer: "StageTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stop_seen:
            control.should_save = control.should_training_stop = True
        elif state.global_step >= state.max_steps:
            control.should_save, control.should_log = False, True


class StageTrainer(Trainer):
    """``transformers.Trainer`` with the stages' outputs. Subclasses give :meth:`loss_and_metrics`; the loss is
    each micro-batch's mean (the Trainer divides it by the accumulated micro-batches, as the loop before did).
    Logs ``loss`` and the metrics, each the mean over the micro-batches since the last log and over processes (the
    window travels in checkpoints, so a resumed run logs the numbers of an uninterrupted one). SIGINT / SIGTERM stop
    training at the end of the step under way with a checkpoint, and :meth:`train` raises
    :class:`~distreward.trainer_utils.TrainingInterrupted`."""

    def __init__(self, *args, callbacks=None, **kwargs):
        self.stop_request, self.stop_seen = StopRequest(), False
        self._metrics = defaultdict(list)  # name -> per-micro-batch values (over processes) since the last log
        super().__init__(*args, callbacks=[MetricsFileCallback(), StepFlowCallback(self), *(callbacks or [])],
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # a micro-batch mean, never a sum over the accumulated batches' tokens

    def loss_and_metrics(self, model, inputs) -> tuple:
        """(scalar loss, dict of detached scalar metrics) of a collated batch."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """:meth:`loss_and_metrics`; records the loss, the metrics and the stop request, averaged over processes in
        the one reduction a micro-batch (read on the host, where a non-finite loss raises)."""
        loss, metrics = self.loss_and_metrics(model, inputs)
        values, stop = reduce_micro_batch(self.accelerator, loss, metrics, self.stop_request,
                                          f"step {self.state.global_step + 1}")
        if model.training:
            for name, value in zip(["loss", *metrics], values):
                self._metrics[name].append(value)
            self.stop_seen = self.stop_seen or stop
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """A training log (it has ``loss``) gets the window's means (its ``loss`` too: the same number the Trainer
        computes, but carried across a resume)."""
        if "loss" in logs and self._metrics:
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` (``--resume``) with no checkpoint in ``output_dir``
        starts afresh, and a fresh start deletes the checkpoints an earlier run left there (so a later resume
        cannot pick them up). A finished run deletes its checkpoints unless ``args.keep_checkpoints``."""
        checkpoints = list_checkpoints(self.args.output_dir)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoints[-1] if checkpoints else None
            if self.is_world_process_zero():
                print(f"resuming from {resume_from_checkpoint}" if checkpoints else
                      f"no checkpoint in {self.args.output_dir}: starting from scratch")
        if resume_from_checkpoint:
            with open(os.path.join(resume_from_checkpoint, METRICS_WINDOW_NAME)) as handle:
                self._metrics.update(json.load(handle))
        elif self.is_world_process_zero():
            remove_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        with self.stop_request:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.stop_seen:
            raise TrainingInterrupted(os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}"))
        if self.is_world_process_zero() and not self.args.keep_checkpoints:
            remove_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        return output

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, and the metrics window not logged yet."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}", METRICS_WINDOW_NAME)
            with open(path, "w") as handle:
                json.dump(self._metrics, handle)
