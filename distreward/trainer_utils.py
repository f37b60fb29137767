"""Loop machinery shared by the trainers: settings, accelerator, checkpoints, resume, metrics.

A run directory (``output_dir``) holds ``config.json`` (the run's settings), ``metrics.jsonl`` (one
JSON object a logged step), ``checkpoint-{step}/`` folders and, at the end, the trained model in
``save_pretrained`` form with its tokenizer. A checkpoint is :meth:`accelerate.Accelerator.save_state`
with the model written by its own ``save_pretrained`` (safetensors) instead of accelerate's
state-dict file, plus ``trainer_state.json`` (optimizer step, micro-batch count, metrics not logged
yet), so ``--resume`` continues exactly where a killed run stopped: same weights, optimizer and
scheduler state, RNG state, position in the seeded data order and logged means.
"""
import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler
from transformers.utils import logging as transformers_logging

from distreward.distributed import check_data_parallel, has_accelerator
from distreward.run_files import METRICS_NAME, RUN_CONFIG_NAME, TRAINER_STATE_NAME, WEIGHTS_NAME
from distreward.timing import PhaseTimer, timed

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
DEFAULT_RUN_DIR = "runs/pipeline"  # where `python -m distreward.train` writes sft/, rm/ and rl/


@dataclass
class TrainingConfig:
    """Settings every trainer shares (the stage configs subclass it, as TRL's configs subclass TrainingArguments).

    Built only when valid: ``__post_init__`` raises ValueError, one line, on a setting that cannot work.
    """

    stage: ClassVar[str] = "train"  # the sub-directory of run_dir that output_dir defaults to
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the stage writes config.json, metrics.jsonl, checkpoints, its model and eval.json "
                "(default: RUN_DIR/STAGE, STAGE being sft, rm or rl)."})
    run_dir: str = field(default=DEFAULT_RUN_DIR, metadata={
        "help": "Root of a pipeline run: --output_dir and the stage's inputs default to its sft/, rm/ and rl/ "
                "sub-directories, where `python -m distreward.train` writes them."})
    seed: int = field(default=0, metadata={"help": "Seed for the model head, data order and every RNG."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Examples per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training data "
                                                                   "(ignored when --max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run; -1 derives them from "
                                                         "--num_train_epochs."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name: "
                                                                       "linear, cosine, constant, ..."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps spent on linear warm-up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 turns clipping off."})
    logging_steps: int = field(default=10, metadata={"help": "Write a metrics.jsonl line every this many steps."})
    save_steps: int = field(default=100, metadata={"help": "Save a checkpoint-{step}/ every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints to keep (older ones are deleted)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in --output_dir "
                                                          "(a fresh start otherwise, which deletes old checkpoints)."})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "Keep the checkpoint-{step}/ folders when the run finishes (they only serve --resume of a killed "
                "run, so by default a finished run keeps its final model, eval, metrics and plots alone)."})
    mixed_precision: str = field(default="auto", metadata={"help": "Autocast dtype: auto (bf16 on a GPU that "
                                                                   "has it, else no), no, bf16 or fp16."})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = os.path.join(self.run_dir, self.stage)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be > 0, or -1 to train --num_train_epochs passes, got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"--mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        if self.lr_scheduler_type not in {kind.value for kind in SchedulerType}:
            raise ValueError(f"--lr_scheduler_type must be one of {', '.join(kind.value for kind in SchedulerType)}, "
                             f"got {self.lr_scheduler_type!r}")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU (none here): use auto, no or bf16")


@dataclass
class TrainerState:
    """Where a run stands: optimizer steps taken, micro-batches consumed, and the metrics of the micro-batches
    since the last logged step (name -> values, each averaged over processes): a resumed run logs the same means."""

    global_step: int = 0
    micro_step: int = 0
    metrics_window: dict = field(default_factory=dict)


def save_run_config(config, output_dir: str, filename: str = RUN_CONFIG_NAME) -> None:
    """Write a config dataclass as JSON."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, filename), "w") as handle:
        json.dump(asdict(config), handle, indent=2)


class MetricsLogger:
    """Appends one JSON object per logged step to ``output_dir/filename`` (main process only).

    ``resume_step`` keeps the lines of an earlier run up to that step and drops the rest (the steps a
    killed run logged after its last checkpoint are run again); 0 starts an empty file.
    """

    def __init__(self, output_dir: str, enabled: bool = True, resume_step: int = 0, filename: str = METRICS_NAME):
        self.path = os.path.join(output_dir, filename)
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        kept = []
        if resume_step > 0 and os.path.exists(self.path):
            with open(self.path) as handle:
                kept = [line for line in handle if json.loads(line).get("step", 0) <= resume_step]
        with open(self.path, "w") as handle:
            handle.writelines(kept)

    def log(self, step: int, **metrics) -> None:
        """Write ``{"step": step, **metrics}`` (tensors become Python numbers)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def resolve_mixed_precision(mixed_precision: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, else ``no``."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def load_pretrained_weights(model: torch.nn.Module, directory: str) -> None:
    """Load ``directory/model.safetensors`` into ``model``; only tied parameters may be absent from the file."""
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[name].data_ptr() for name in state}
    untied = [name for name in missing if current[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {untied}, unexpected {unexpected}")


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """An Accelerator for ``config`` (seeded data order, gradient accumulation, autocast), seeded.

    Its ``save_state`` / ``load_state`` store each prepared model with ``save_pretrained``
    (safetensors); works single-process on CPU and under ``accelerate launch`` / ``torchrun``.
    """
    accelerator = Accelerator(
        cpu=not has_accelerator(),  # else a torchrun process on a CPU-only machine would train alone
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    check_data_parallel(accelerator)
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar per save: the trainer's bar tells it

    def save_models(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(output_dir)
        weights.clear()  # accelerate then writes optimizer, scheduler and RNG state only

    def load_models(models, input_dir):
        while models:
            load_pretrained_weights(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_models)
    accelerator.register_load_state_pre_hook(load_models)
    set_seed(config.seed, device_specific=True)  # rank r: seed + r, so ranks sample different rollouts
    return accelerator


def list_checkpoints(output_dir: str) -> list:
    """``checkpoint-{step}`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(m[1]) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name)))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def remove_checkpoints(output_dir: str, keep: int = 0) -> None:
    """Delete the ``checkpoint-{step}`` folders of ``output_dir`` but the newest ``keep``."""
    checkpoints = list_checkpoints(output_dir)
    for stale in checkpoints[:len(checkpoints) - keep]:
        shutil.rmtree(stale)


def save_checkpoint(accelerator: Accelerator, state: TrainerState, output_dir: str, tokenizer=None,
                    save_total_limit: int = 0) -> str:
    """Save model, optimizer, scheduler, RNG and ``state`` to ``output_dir/checkpoint-{step}``; returns it.

    Keeps the newest ``save_total_limit`` checkpoints when it is > 0.
    """
    path = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        with open(os.path.join(path, TRAINER_STATE_NAME), "w") as handle:
            json.dump(asdict(state), handle)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        if save_total_limit > 0:
            remove_checkpoints(output_dir, keep=save_total_limit)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Accelerator, path: str) -> TrainerState:
    """Restore everything :func:`save_checkpoint` wrote (into the prepared objects); returns the state."""
    accelerator.load_state(path)
    with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
        return TrainerState(**json.load(handle))


def start_or_resume(accelerator: Accelerator, config: TrainingConfig) -> TrainerState:
    """With ``config.resume``, load the latest checkpoint (a fresh state if there is none); without it,
    delete checkpoints an earlier run left in ``output_dir`` so a later resume cannot pick them up."""
    checkpoints = list_checkpoints(config.output_dir)
    if config.resume and checkpoints:
        accelerator.print(f"resuming from {checkpoints[-1]}")
        return load_checkpoint(accelerator, checkpoints[-1])
    if config.resume:
        accelerator.print(f"no checkpoint in {config.output_dir}: starting from scratch")
    elif accelerator.is_main_process:
        remove_checkpoints(config.output_dir)
    accelerator.wait_for_everyone()
    return TrainerState()


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM after saving ``checkpoint`` (the step it stopped at), which
    ``--resume`` continues from exactly."""

    def __init__(self, checkpoint: str):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint


class StopRequest:
    """While active (a context), the first SIGINT or SIGTERM only sets :attr:`requested`, so the loop stops at the
    end of the optimizer step under way, with a consistent state to save; a second signal interrupts at once.
    Installed from the main thread only (Python runs signal handlers there)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.request) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def reduce_micro_batch(accelerator: Accelerator, loss: torch.Tensor, metrics: dict, stop: StopRequest,
                       where: str) -> tuple:
    """(the loss and ``metrics``' values averaged over processes, whether any process was asked to stop): one
    reduction and one host read a micro-batch, where a non-finite loss raises ValueError (``where``: the step it
    names), as ops called without ``validate`` report bad input."""
    requested = torch.tensor(float(stop.requested), device=loss.device)
    *values, stopping = accelerator.reduce(torch.stack([loss.detach(), *metrics.values(), requested]).float(),
                                           "mean").tolist()
    if not math.isfinite(values[0]):
        raise ValueError(f"the training loss is {values[0]} at {where} (bad input such as NaN logits or targets "
                         "outside [0, 1], or a diverged model; the ops name the bad input when called with "
                         "validate=True)")
    return values, stopping > 0


def total_optimizer_steps(config: TrainingConfig, batches_per_epoch: int) -> int:
    """``max_steps`` when set, else ``num_train_epochs`` passes of ``batches_per_epoch`` micro-batches."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps)))


def train_loop(config: TrainingConfig, accelerator: Accelerator, model: torch.nn.Module, dataloader,
               compute_loss: Callable, tokenizer=None, description: str = "train",
               on_step: Optional[Callable] = None, timer: Optional[PhaseTimer] = None) -> torch.nn.Module:
    """Train ``model`` with AdamW on ``dataloader``; returns the unwrapped trained model.

    ``compute_loss(model, batch) -> (loss, metrics)``: a scalar loss tensor and a dict of detached
    scalar tensors to log (averaged over the micro-batches since the last logged step and over
    processes). Handles gradient
    accumulation, clipping, the LR schedule, tqdm, ``metrics.jsonl``, checkpoints every
    ``save_steps`` and ``config.resume``; a finished run deletes its checkpoints unless ``config.keep_checkpoints``.
    ``on_step(step, total, model)``, if given, is called on every process once before the first update (with
    0, or the step a resumed run starts from) and after each optimizer step, before that step's checkpoint.
    SIGINT / SIGTERM (on any process) stops training at the end of the optimizer step under way, saves a checkpoint
    there and raises :class:`TrainingInterrupted`. With a ``timer``, the seconds of the phases ``loss``
    (``compute_loss``, less the phases it times itself on the same timer), ``backward`` and ``optimizer``, and
    those ``compute_loss`` times, are logged per micro-batch as ``seconds_{phase}`` (this process's wall clock).
    The caller saves the final model.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    if len(dataloader) == 0:
        raise ValueError("the training data is empty (fewer examples than one batch)")
    total = total_optimizer_steps(config, len(dataloader))
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=int(config.warmup_ratio * total) * accelerator.num_processes,
                              num_training_steps=total * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    state = start_or_resume(accelerator, config)
    logger = MetricsLogger(config.output_dir, accelerator.is_main_process, resume_step=state.global_step)
    progress = tqdm(total=total, initial=state.global_step, desc=description, disable=not accelerator.is_main_process)
    model.train()
    if on_step is not None:
        on_step(state.global_step, total, model)
    with StopRequest() as stop:
        run_steps(config, accelerator, model, optimizer, scheduler, dataloader, compute_loss, state, total, logger,
                  progress, stop, tokenizer, on_step, timer)
    progress.close()
    if accelerator.is_main_process and not config.keep_checkpoints:
        remove_checkpoints(config.output_dir)
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model)


def run_steps(config: TrainingConfig, accelerator: Accelerator, model, optimizer, scheduler, dataloader,
              compute_loss: Callable, state: TrainerState, total: int, logger: MetricsLogger, progress, stop: StopRequest,
              tokenizer=None, on_step: Optional[Callable] = None, timer: Optional[PhaseTimer] = None) -> None:
    """:func:`train_loop`'s optimizer steps from ``state`` to ``total``; the stop request travels with the logged
    metrics' reduction, so every process stops at the same step at no extra cost."""
    while state.global_step < total:
        epoch, done_in_epoch = divmod(state.micro_step, len(dataloader))
        dataloader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, done_in_epoch) if done_in_epoch else dataloader
        for batch in batches:
            with accelerator.accumulate(model):
                with timed(timer, "loss"):
                    loss, metrics = compute_loss(model, batch)
                with timed(timer, "backward"):
                    accelerator.backward(loss)
                with timed(timer, "optimizer"):
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            state.micro_step += 1
            values, stopping = reduce_micro_batch(accelerator, loss, metrics, stop, f"micro-step {state.micro_step}")
            seconds = {f"seconds_{phase}": value for phase, value in (timer.pop() if timer else {}).items()}
            for name, value in [*zip(["loss", *metrics], values), *seconds.items()]:
                state.metrics_window.setdefault(name, []).append(value)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            if state.global_step % config.logging_steps == 0 or state.global_step == total:
                means = {name: torch.tensor(values).mean().item() for name, values in state.metrics_window.items()}
                logger.log(state.global_step, epoch=state.micro_step / len(dataloader),
                           lr=scheduler.get_last_lr()[0], **means)
                progress.set_postfix(loss=f"{means['loss']:.4f}")
                state.metrics_window = {}
            if on_step is not None:
                on_step(state.global_step, total, model)
            if stopping or (state.global_step % config.save_steps == 0 and state.global_step < total):
                path = save_checkpoint(accelerator, state, config.output_dir, tokenizer, config.save_total_limit)
                if stopping:
                    progress.close()
                    raise TrainingInterrupted(path)
            if state.global_step >= total:
                break
