"""Stage ``rl``: REINFORCE with the uncertainty-shaped distributional reward (docs/math.md §5, §7).

Each optimizer step samples ``samples_per_prompt`` responses to a batch of prompts from the policy,
scores them with the distributional reward model (mean ``r`` and std ``sd``, or a lower quantile) and the
per-sequence KL to the frozen SFT reference, shapes the total reward ``R`` (:func:`distreward.rewards.shape_rewards`;
``std_source`` swaps the std for a control, :func:`distreward.rewards.replace_std`),
subtracts a baseline and minimises ``-(R - b) * sum_t log pi(y_t)``. The loop (accelerate, gradient
clipping, tqdm, ``metrics.jsonl``, checkpoints, ``--resume``) is :func:`distreward.trainer_utils.train_loop`;
the baseline's state travels in the checkpoints.

Outputs in ``output_dir``: ``config.json`` (these settings), ``metrics.jsonl``, ``checkpoint-{step}/``
(until the run finishes, unless ``--keep_checkpoints``), ``policy/`` (the trained policy and
tokenizer, ``save_pretrained`` form), ``eval.json`` (docs/math.md §7: the SFT and the trained policy
on the same held-out prompts, with the paired comparison and verdict of
:func:`distreward.policy_comparison.compare_policies` under ``comparison``), ``eval_samples.jsonl``
(every evaluated response with its scores) and, with ``curve_eval_steps > 0``, ``curve.jsonl`` (the
policy along training on the first held-out prompts: ground truth against KL to the reference).
"""
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch.utils.data import DataLoader

from distreward.data import EMBEDDED, EMBEDDED_TASKS, HELD_OUT_SPLITS, embedded_task, load_prompts
from distreward.defaults import ALPHA, BETA, QUANTILE_LEVEL
from distreward.distributed import call_in_forward
from distreward.modeling import load_policy_and_reference, load_reward_model
from distreward.ops.validation import check_choice, check_positive
from distreward.policy_comparison import compare_policies, paired_gains, region_gains, sharpening_verdict, summarize
from distreward.rewards import check_shaping, make_baseline, replace_std, shape_rewards
from distreward.rollout import RolloutScorer, generate_rollouts, token_logprobs
from distreward.tables import format_report
from distreward.timing import PhaseTimer, timed
from distreward.run_files import CURVE_NAME, EVAL_NAME, EVAL_SAMPLES_NAME, POLICY_DIR, RM_DIR, SFT_DIR
from distreward.trainer_utils import MetricsLogger, TrainingConfig, make_accelerator, save_run_config, train_loop


@dataclass
class ReinforceConfig(TrainingConfig):
    """Settings of the ``rl`` stage (shared training flags from TrainingConfig; a batch is prompts per step)."""

    policy_path: Optional[str] = field(default=None, metadata={
        "help": "The SFT policy (a save_pretrained directory with its tokenizer): the starting point and the "
                "frozen reference of the KL term (default: RUN_DIR/sft)."})
    reward_model_path: Optional[str] = field(default=None, metadata={
        "help": "The rm stage's output directory (default: RUN_DIR/rm)."})
    dataset_name: str = field(default=EMBEDDED, metadata={
        "help": "Prompt source: 'embedded' (the generated task, with a ground-truth scorer), or a local "
                ".jsonl/.parquet file / hub id with a 'prompt' column (no ground truth)."})
    dataset_split: str = field(default="average_rating_split", metadata={
        "help": "Split to load from a hub data set (ignored for 'embedded' and local files)."})
    task: str = field(default="v2", metadata={"help": "Embedded task: v2 (docs/testbed.md) or v1."})
    num_train_prompts: int = field(default=512, metadata={"help": "Training prompts (the embedded task's are "
                                                                  "generated; others are capped at this)."})
    num_eval_prompts: int = field(default=256, metadata={"help": "Distinct held-out prompts for eval.json."})
    eval_split: str = field(default="test", metadata={
        "help": "Prompts eval.json uses: test (reports) or validation (tuning settings)."})
    samples_per_prompt: int = field(default=4, metadata={"help": "Responses sampled per prompt (>= 2 for rloo)."})
    max_new_tokens: int = field(default=12, metadata={"help": "Longest response, in tokens."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature: the policy and the reference are the models' distributions at it (the loss "
                "and the KL use log softmax(logits / temperature)), for training and evaluation alike; 0 decodes "
                "greedily and scores with the untempered log-probs (deterministic rollouts, for checks)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (below 1 the samples come from "
                                                         "a truncated distribution that the loss does not model)."})
    temperature_baselines: list[float] = field(default_factory=list, metadata={
        "help": "Also evaluate the SFT policy sampled at each of these temperatures (no reward model, no training) "
                "on the held-out prompts: the cheap baseline REINFORCE has to beat (eval.json's "
                "temperature_baselines: ground truth and RM reward gains over the SFT policy, and the KL)."})
    sharpening_baseline: bool = field(default=True, metadata={
        "help": "Compare the trained policy with the best sharpened SFT policy (embedded task only; "
                "--no_sharpening_baseline turns it off)."})
    sharpening_grid: list[float] = field(default_factory=lambda: [1.0, 0.6, 0.3, 0.0], metadata={
        "help": "Temperatures (0: greedy) at which the SFT policy, no reward model, is sampled on validation "
                "prompts; the best of them by ground truth is the sharpened baseline the trained policy is compared "
                "with on the evaluation prompts."})
    sharpening_prompts: int = field(default=256, metadata={
        "help": "Distinct validation prompts on which the sharpening temperature is chosen."})
    shaping: str = field(default="std_scale", metadata={
        "help": "Total reward: none (r - beta kl), std_penalty (H2.1: - alpha sd), std_scale "
                "(H2.2: (r - beta kl) / (sd + 1)) or quantile (q - beta kl, q the --quantile_level quantile of "
                "the RM's distribution)."})
    std_source: str = field(default="model", metadata={
        "help": "Std the std shapings read: model (the RM's), or a control: constant (each batch's mean std), "
                "shuffled (the batch's stds randomly permuted) or shuffled_within_prompt (permuted among each "
                "prompt's samples: the control that stays meaningful under rloo)."})
    quantile_level: float = field(default=QUANTILE_LEVEL, metadata={"help": "Level in (0, 1) of the quantile shaping."})
    beta: float = field(default=BETA, metadata={"help": "Weight of the KL to the reference (tuned on validation "
                                                       "prompts: 0.02 let the RM be exploited, 0.3 held the policy)."})
    alpha: float = field(default=ALPHA, metadata={"help": "Weight of the std penalty (std_penalty only)."})
    baseline: str = field(default="rloo", metadata={"help": "Baseline: rloo (leave-one-out over the samples of a "
                                                            "prompt), ema or batch (batch mean)."})
    ema_decay: float = field(default=0.9, metadata={"help": "Decay of the ema baseline."})
    eval_samples_per_prompt: int = field(default=2, metadata={"help": "Responses sampled per held-out prompt."})
    eval_batch_size: int = field(default=64, metadata={"help": "Held-out prompts per generation batch."})
    curve_eval_steps: int = field(default=0, metadata={
        "help": "Evaluate the policy every this many steps (and at steps 0 and the last) into curve.jsonl; 0: off."})
    curve_eval_prompts: int = field(default=64, metadata={
        "help": "The first this many held-out prompts (at most --num_eval_prompts) of each curve.jsonl point."})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW learning rate (tuned on validation prompts of task v2 for the embedded tiny Llama: at 5e-4 the "
                "updates that fix the carry undid the sorts; ~1e-6 for SmolLM2)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Prompts per step per process."})
    max_steps: int = field(default=120, metadata={"help": "Optimizer steps (-1: --num_train_epochs passes over "
                                                         "the training prompts)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the steps spent on linear warm-up."})
    logging_steps: int = field(default=1, metadata={"help": "Write a metrics.jsonl line every this many steps."})
    save_steps: int = field(default=20, metadata={"help": "Save a checkpoint-{step}/ every this many steps."})

    stage: ClassVar[str] = "rl"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.policy_path = self.policy_path or os.path.join(self.run_dir, SFT_DIR)
        self.reward_model_path = self.reward_model_path or os.path.join(self.run_dir, RM_DIR)
        check_shaping(self.shaping, self.beta, self.alpha, prefix="--", std_source=self.std_source,
                      quantile_level=self.quantile_level)
        make_baseline(self.baseline, self.samples_per_prompt, self.ema_decay)  # raises on a setting it cannot take
        check_choice("--eval_split", self.eval_split, HELD_OUT_SPLITS)
        check_positive("--temperature", self.temperature, allow_zero=True)  # 0: greedy
        for temperature in self.temperature_baselines:
            check_positive("each --temperature_baselines temperature", temperature)
        if self.sharpening_baseline and not self.sharpening_grid:
            raise ValueError("--sharpening_grid needs at least one temperature (or --no_sharpening_baseline)")
        for temperature in self.sharpening_grid:
            check_positive("each --sharpening_grid temperature", temperature, allow_zero=True)  # 0: greedy
        if self.dataset_name == EMBEDDED:
            embedded_task(self.task)
        for name in ("num_train_prompts", "num_eval_prompts", "samples_per_prompt", "max_new_tokens",
                     "eval_samples_per_prompt", "eval_batch_size", "curve_eval_prompts", "sharpening_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.curve_eval_steps < 0:
            raise ValueError(f"--curve_eval_steps must be >= 0 (0: no curve), got {self.curve_eval_steps}")


def scoring_temperature(temperature: float) -> float:
    """The temperature whose log-probs the loss and the KL use: the sampling temperature, or 1 (the untempered
    model) for greedy decoding, temperature 0."""
    return temperature if temperature > 0 else 1.0


def policy_loss(advantages: torch.Tensor, sequence_logprobs: torch.Tensor) -> torch.Tensor:
    """REINFORCE loss ``mean_i -(R_i - b_i) * sum_t log pi(y_i,t)``: advantages [N] (held constant), log-probs [N]."""
    if advantages.shape != sequence_logprobs.shape or advantages.dim() != 1:
        raise ValueError(f"advantages {tuple(advantages.shape)} and sequence_logprobs "
                         f"{tuple(sequence_logprobs.shape)} must be 1-D of the same length")
    return -(advantages.detach() * sequence_logprobs).mean()


class ReinforceTrainer:
    """REINFORCE on ``train_prompts``: :meth:`compute_loss` is one rollout-and-update micro-batch of
    :func:`~distreward.trainer_utils.train_loop`; :meth:`evaluate` scores a policy on held-out prompts.
    With ``config.curve_eval_steps > 0``, training writes ``curve.jsonl`` on the first
    ``config.curve_eval_prompts`` of ``eval_prompts`` (:class:`CurveRecorder`)."""

    def __init__(self, config: ReinforceConfig, policy, tokenizer, scorer: RolloutScorer, train_prompts: list,
                 eval_prompts: Optional[list] = None):
        if config.shaping == "quantile" and scorer.quantile_level != config.quantile_level:
            raise ValueError(f"shaping 'quantile' needs a scorer with quantile_level={config.quantile_level}, "
                             f"got {scorer.quantile_level}")
        if config.curve_eval_steps > 0 and not eval_prompts:
            raise ValueError("--curve_eval_steps > 0 needs held-out prompts to evaluate the policy on")
        self.config, self.policy, self.tokenizer, self.scorer = config, policy, tokenizer, scorer
        self.task = EMBEDDED_TASKS[config.task] if config.dataset_name == EMBEDDED else None
        self.curve = None
        if config.curve_eval_steps > 0:
            self.curve = CurveRecorder(self, eval_prompts[:config.curve_eval_prompts])
        self.accelerator = make_accelerator(config)
        self.timer = PhaseTimer(self.accelerator.device)  # the seconds_* of metrics.jsonl (docs/training.md)
        for model in (policy, scorer.reference, scorer.reward_model):
            model.to(self.accelerator.device)
        self.baseline = make_baseline(config.baseline, config.samples_per_prompt, config.ema_decay)
        self.accelerator.register_for_checkpointing(self.baseline)
        # Its own generator: starting an epoch must not draw from the global RNG that sampling uses,
        # or a resumed run (which starts its epoch afresh) would sample differently from an unbroken one.
        self.dataloader = DataLoader(train_prompts, batch_size=config.per_device_train_batch_size, shuffle=True,
                                     drop_last=True, collate_fn=list,
                                     generator=torch.Generator().manual_seed(config.seed))

    def train(self):
        """Run the configured steps (resuming if asked); returns the unwrapped trained policy."""
        self.policy = train_loop(self.config, self.accelerator, self.policy, self.dataloader, self.compute_loss,
                                 self.tokenizer, description=f"rl ({self.config.shaping}, {self.config.baseline})",
                                 on_step=self.curve, timer=self.timer)
        return self.policy

    def compute_loss(self, model, prompts: list):
        """Sample, score and shape one batch of prompts -> (REINFORCE loss, detached metrics)."""
        config = self.config
        with timed(self.timer, "generation"):
            rollout = generate_rollouts(self.accelerator.unwrap_model(model), self.tokenizer, prompts,
                                        config.samples_per_prompt, config.max_new_tokens, config.temperature,
                                        config.top_p)
            rollout = rollout.to(self.accelerator.device)
        with timed(self.timer, "policy_logprobs"):  # inside DDP's forward: gradients all-reduced
            logprobs = call_in_forward(model, token_logprobs, rollout, scoring_temperature(config.temperature))
        scores = self.scorer.score(rollout, logprobs, self.timer)
        std = replace_std(scores.std, config.std_source, samples_per_prompt=config.samples_per_prompt)
        total = shape_rewards(scores.reward, std, scores.kl, config.shaping, config.beta, config.alpha, scores.quantile)
        baseline = self.baseline(total, self.accelerator.reduce(total.mean(), "mean"))
        loss = policy_loss(total - baseline, logprobs.sum(-1))
        metrics = {"reward": scores.reward.mean(), "reward_sd": scores.std.mean(), "kl": scores.kl.mean(),
                   "total_reward": total.mean(), "baseline": baseline.mean(),
                   "response_length": rollout.response_mask.sum(-1).float().mean()}
        if scores.ground_truth is not None:
            metrics["ground_truth"] = scores.ground_truth.mean()
        if scores.quantile is not None:
            metrics["reward_quantile"] = scores.quantile.mean()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, policy, prompts: list, temperature: Optional[float] = None):
        """(docs/math.md §7 summary, per-sample records) of ``policy`` sampled at ``temperature`` (default: the
        config's) on ``prompts``; the KL is to the reference at the config's temperature.

        Sampling is seeded by ``config.seed`` (and leaves the training RNG alone), so two policies
        evaluated in turn see the same prompts and the same random stream. ``policy`` is moved to the
        trainer's device, as the policy, the reference and the reward model were when it was built.
        """
        config = self.config
        temperature = config.temperature if temperature is None else temperature
        policy = self.accelerator.unwrap_model(policy).to(self.accelerator.device)
        scores, records = [], []
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            for start in range(0, len(prompts), config.eval_batch_size):
                rollout = generate_rollouts(policy, self.tokenizer, prompts[start:start + config.eval_batch_size],
                                            config.eval_samples_per_prompt, config.max_new_tokens,
                                            temperature, config.top_p)
                rollout = rollout.to(self.accelerator.device)
                batch = self.scorer.score(rollout, token_logprobs(policy, rollout, scoring_temperature(temperature)))
                scores.append(batch)
                records += batch.records(rollout)
        return summarize(scores), [self.describe(record) for record in records]

    def describe(self, record: dict) -> dict:
        """An evaluation record with the embedded task's ``region`` of its prompt and, where the task has a rater
        panel, the ``rater_spread`` (sd of the panel's ratings) of its response."""
        if self.task is None:
            return record
        record["region"] = self.task.prompt_region(record["prompt"])
        if hasattr(self.task, "panel_spread"):
            record["rater_spread"] = self.task.panel_spread(record["prompt"], record["response"])
        return record


class CurveRecorder:
    """The ``on_step`` hook of :func:`~distreward.trainer_utils.train_loop` that writes ``curve.jsonl``: at step 0,
    every ``config.curve_eval_steps`` steps and at the last, :meth:`ReinforceTrainer.evaluate` of the current
    policy on ``prompts`` (the same seeded samples each time, so the points are paired) as one line
    ``{"step", "kl_to_ref", "ground_truth" (where known), "ground_truth_by_region" (where the task has regions),
    "reward", "reward_std", "num_prompts"}``: means over the samples of the KL, the ground truth (overall and per
    region), the RM mean and the RM std. A resumed run keeps the lines up to
    its checkpoint's step (written before that checkpoint) and drops the rest."""

    def __init__(self, trainer: "ReinforceTrainer", prompts: list):
        self.trainer, self.prompts, self.logger = trainer, prompts, None

    def __call__(self, step: int, total: int, model) -> None:
        config = self.trainer.config
        if self.logger is None:  # the call before the first update: step 0, or the step a resumed run starts at
            self.logger = MetricsLogger(config.output_dir, self.trainer.accelerator.is_main_process,
                                        resume_step=step, filename=CURVE_NAME)
            if step > 0:
                return
        elif step % config.curve_eval_steps and step < total:
            return
        summary, records = self.trainer.evaluate(model, self.prompts)
        point = {"kl_to_ref": summary["kl_to_ref"]}
        if "ground_truth" in summary:
            point["ground_truth"] = summary["ground_truth"]["mean"]
        if records and "region" in records[0] and "ground_truth" in records[0]:
            by_region = {}
            for record in records:
                by_region.setdefault(record["region"], []).append(record["ground_truth"])
            point["ground_truth_by_region"] = {region: sum(v) / len(v) for region, v in sorted(by_region.items())}
        self.logger.log(step, **point, reward=summary["reward"]["mean"], reward_std=summary["mean_sd"],
                        num_prompts=len(self.prompts))


def write_jsonl(path: str, records: list) -> None:
    with open(path, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


def temperature_baselines(trainer: ReinforceTrainer, sft_policy, prompts: list, samples: list) -> list:
    """The SFT policy sampled at each of ``trainer.config.temperature_baselines`` on ``prompts`` (the seeded
    samples of :meth:`ReinforceTrainer.evaluate`), each compared, paired by prompt, with the SFT policy at the
    config's temperature (``samples``, the ``eval_samples.jsonl`` records): one dict per temperature,
    ``{"temperature", "kl_to_ref", "ground_truth" (where known), "reward"}``, each score as ``{"sft",
    "tempered", "gain", "ci95"}``."""
    sft_samples = [sample for sample in samples if sample["policy"] == "sft"]
    rows = []
    for temperature in trainer.config.temperature_baselines:
        summary, records = trainer.evaluate(sft_policy, prompts, temperature)
        tempered = [{"policy": "tempered", **record} for record in records]
        rows.append({"temperature": temperature, "kl_to_ref": summary["kl_to_ref"],
                     **paired_gains(sft_samples + tempered, "sft", "tempered")})
    return rows


def sharpen(trainer: ReinforceTrainer, policy, validation: list, prompts: list, name: str, samples: list) -> dict:
    """``policy`` sampled at each temperature of ``config.sharpening_grid`` on the ``validation`` prompts, the
    temperature of the highest mean ground truth chosen there, then ``policy`` sampled at it on the evaluation
    ``prompts`` (seeded as every evaluation is); its records join ``samples`` as policy ``name``. Returns
    ``{"temperature", "grid", "chosen_on", name: its summary}``."""
    grid = []
    for temperature in trainer.config.sharpening_grid:
        summary, _ = trainer.evaluate(policy, validation, temperature)
        grid.append({"temperature": temperature, "validation_ground_truth": summary["ground_truth"]["mean"],
                     # greedy answers are scored by the untempered model: no KL to the reference's distribution
                     "kl_to_ref": summary["kl_to_ref"] if temperature > 0 else None})
    best = max(grid, key=lambda row: row["validation_ground_truth"])
    summary, records = trainer.evaluate(policy, prompts, best["temperature"])
    samples += [{"policy": name, **record} for record in records]
    return {"temperature": best["temperature"], "grid": grid, "chosen_on": f"{len(validation)} validation prompts",
            name: summary}


def sharpened_baseline(trainer: ReinforceTrainer, sft_policy, trained_policy, prompts: list, samples: list) -> dict:
    """The trained policy against the best sharpened SFT policy (:func:`sharpen`, temperature chosen on
    ``config.sharpening_prompts`` validation prompts), paired by prompt on the evaluation ``prompts``, overall and
    per region: the trained policy at the config's temperature (its ``samples``, the ``eval_samples.jsonl``
    records), and under ``trained_sharpened`` the trained policy sharpened the same way (both policies then get the
    same decoding freedom, so the difference is what the reward model and REINFORCE add). ``samples`` gains the
    ``"sharpened"`` and ``"trained_sharpened"`` records."""
    config = trainer.config
    validation = trainer.task.make_prompts(config.sharpening_prompts, seed=config.seed, split="validation",
                                           unique=True)
    result = sharpen(trainer, sft_policy, validation, prompts, "sharpened", samples)
    result.update(paired_gains(samples, "sharpened", "trained"),
                  by_region=region_gains(samples, "sharpened", "trained"))
    result["verdict"] = sharpening_verdict(result)
    both = sharpen(trainer, trained_policy, validation, prompts, "trained_sharpened", samples)
    both.update(paired_gains(samples, "sharpened", "trained_sharpened"),
                by_region=region_gains(samples, "sharpened", "trained_sharpened"))
    both["verdict"] = sharpening_verdict({**both, "sft_temperature": result["temperature"]}, "trained_sharpened")
    result["trained_sharpened"] = both
    return result


def run_reinforce(config: ReinforceConfig) -> dict:
    """Train the policy with REINFORCE, save it to ``output_dir/policy`` and write ``eval.json``; returns it."""
    policy, reference, tokenizer = load_policy_and_reference(config.policy_path)
    reward_model, reward_tokenizer = load_reward_model(config.reward_model_path, tokenizer)
    if reward_model.is_scalar and config.shaping != "none":
        raise ValueError(f"--shaping {config.shaping} reads the reward distribution, but {config.reward_model_path} "
                         f"holds a scalar reward model: use --shaping none")
    train_prompts, eval_prompts, ground_truth = load_prompts(config)
    scorer = RolloutScorer(reference, reward_model, reward_tokenizer, ground_truth,
                           quantile_level=config.quantile_level if config.shaping == "quantile" else None,
                           temperature=scoring_temperature(config.temperature))
    trainer = ReinforceTrainer(config, policy, tokenizer, scorer, train_prompts, eval_prompts)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        save_run_config(config, config.output_dir)
    policy = trainer.train()
    report, samples = {}, []
    for name, model in (("sft", reference), ("trained", policy)):
        report[name], records = trainer.evaluate(model, eval_prompts)
        samples += [{"policy": name, **record} for record in records]
    report["comparison"] = compare_policies(samples)
    if config.sharpening_baseline and trainer.task is not None:
        report["sharpened_sft"] = sharpened_baseline(trainer, reference, policy, eval_prompts, samples)
    if config.temperature_baselines:
        report["temperature_baselines"] = temperature_baselines(trainer, reference, eval_prompts, samples)
    if accelerator.is_main_process:
        policy.save_pretrained(os.path.join(config.output_dir, POLICY_DIR))
        tokenizer.save_pretrained(os.path.join(config.output_dir, POLICY_DIR))
        with open(os.path.join(config.output_dir, EVAL_NAME), "w") as handle:
            json.dump(report, handle, indent=2)
        write_jsonl(os.path.join(config.output_dir, EVAL_SAMPLES_NAME), samples)
        accelerator.print(f"\nSFT vs trained policy: {config.num_eval_prompts} held-out {config.eval_split} prompts, "
                          f"{config.eval_samples_per_prompt} sampled responses each "
                          f"(temperature {config.temperature}):")
        accelerator.print(format_report(report))
    accelerator.wait_for_everyone()
    return report
