"""Stage ``pipeline`` (the default of ``python -m distreward.train``): the whole embedded pipeline.

SFT warm-up of the tiny policy -> distributional reward model on its backbone -> REINFORCE with the
shaped reward -> evaluation of the SFT and the trained policy on the same held-out prompts. Each
stage writes to its own sub-directory of ``output_dir`` (``sft/``, ``rm/``, ``rl/``); the pipeline
adds ``report.json`` (docs/math.md §7, with the paired SFT-vs-trained comparison and its verdict),
``reward_histogram.png`` (reward-model mean and ground truth of SFT vs trained responses) and
``training_curves.png`` (REINFORCE metrics by step). The console shows a header per stage; the rl stage
prints the write-up's table and verdict once, and the pipeline where the report and the plots are.
"""
import json
import os
import time
from dataclasses import dataclass, field

from accelerate import PartialState

from distreward.plots import pyplot
from distreward.rl_trainer import EVAL_NAME, EVAL_SAMPLES_NAME, ReinforceConfig, run_reinforce
from distreward.rm_trainer import DISTRIBUTIONS_NAME, RewardConfig, run_reward_training
from distreward.sft_trainer import SFTConfig, run_sft
from distreward.trainer_utils import DEFAULT_RUN_DIR, METRICS_NAME, TrainingConfig, remove_checkpoints, save_run_config

STAGE_TITLES = ("SFT warm-up", "reward model", "REINFORCE")
REPORT_NAME = "report.json"
HISTOGRAM_NAME = "reward_histogram.png"
CURVES_NAME = "training_curves.png"
CURVES = (("reward", "reward-model mean E"), ("reward_sd", "reward-model std"), ("kl", "KL to reference"),
          ("ground_truth", "ground-truth score (0-4)"))


@dataclass
class PipelineConfig:
    """Settings of the whole pipeline; their defaults and everything else are the stage configs' own, and
    ``__post_init__`` builds the stage configs, so a setting a stage would reject cannot be built."""

    output_dir: str = field(default=DEFAULT_RUN_DIR, metadata={"help": "Root directory: sft/, rm/ and rl/ "
                                                                       "sub-directories, report.json, plots."})
    seed: int = field(default=TrainingConfig.seed, metadata={
        "help": "Seed of every stage (data, initialisation, sampling)."})
    task: str = field(default=SFTConfig.task, metadata={
        "help": "Embedded task: v2 (demonstrations, a rater panel, regions; docs/testbed.md) or v1."})
    num_pairs: int = field(default=SFTConfig.num_pairs, metadata={
        "help": "Preference pairs of the embedded task (RM; and SFT's demonstrations, or chosen answers under v1)."})
    sft_epochs: float = field(default=SFTConfig.num_train_epochs, metadata={
        "help": "SFT passes over its data: the demonstrations (v2) or the chosen answers (v1) (the sft stage's "
                "--num_train_epochs)."})
    rm_epochs: float = field(default=RewardConfig.num_train_epochs, metadata={
        "help": "Reward-model passes over the training pairs."})
    loss_kind: str = field(default=RewardConfig.loss_kind, metadata={
        "help": "Reward-model loss: bt_mean, bt_kl, dpl, or the scalar baselines scalar_bt and scalar_reg (which "
                "need --shaping none)."})
    label_kind: str = field(default=RewardConfig.label_kind, metadata={
        "help": "Reward-model score labels: auto (mixture on data with per-rater ratings, else gaussian), gaussian, "
                "gaussian_spread or mixture (docs/math.md §2)."})
    rl_steps: int = field(default=ReinforceConfig.max_steps, metadata={"help": "REINFORCE optimizer steps."})
    shaping: str = field(default=ReinforceConfig.shaping, metadata={
        "help": "Reward shaping: none, std_penalty (H2.1), std_scale (H2.2) or quantile (a lower quantile of the "
                "RM's distribution)."})
    std_source: str = field(default=ReinforceConfig.std_source, metadata={
        "help": "Std the std shapings read: model, or the controls constant (batch mean), shuffled and "
                "shuffled_within_prompt."})
    quantile_level: float = field(default=ReinforceConfig.quantile_level, metadata={
        "help": "Level in (0, 1) of the quantile shaping."})
    baseline: str = field(default=ReinforceConfig.baseline, metadata={"help": "REINFORCE baseline: ema, rloo or batch."})
    beta: float = field(default=ReinforceConfig.beta, metadata={"help": "Weight of the KL to the reference."})
    alpha: float = field(default=ReinforceConfig.alpha, metadata={"help": "Weight of the std penalty (std_penalty)."})
    num_eval_prompts: int = field(default=ReinforceConfig.num_eval_prompts, metadata={
        "help": "Held-out prompts on which the SFT and the trained policy are compared."})
    eval_split: str = field(default=ReinforceConfig.eval_split, metadata={
        "help": "Prompts of that comparison: test (reports) or validation (tuning settings)."})
    temperature_baselines: list[float] = field(default_factory=list, metadata={
        "help": "Also evaluate the SFT policy sampled at each of these temperatures, no reward model (the rl "
                "stage's --temperature_baselines): the cheap baseline REINFORCE has to beat."})
    sharpening_baseline: bool = field(default=ReinforceConfig.sharpening_baseline, metadata={
        "help": "Compare the trained policy with the best sharpened SFT policy (--no_sharpening_baseline: off)."})
    sharpening_grid: list[float] = field(default_factory=lambda: ReinforceConfig().sharpening_grid, metadata={
        "help": "Temperatures (0: greedy) of the sharpened-SFT baseline, chosen on validation prompts (the rl "
                "stage's --sharpening_grid)."})
    curve_eval_steps: int = field(default=ReinforceConfig.curve_eval_steps, metadata={
        "help": "Write rl/curve.jsonl (ground truth and KL to the reference along training) every this many "
                "REINFORCE steps; 0: off."})
    curve_eval_prompts: int = field(default=ReinforceConfig.curve_eval_prompts, metadata={
        "help": "Held-out prompts of each curve.jsonl point (the first of the comparison's)."})
    reuse_finished_stages: bool = field(default=False, metadata={
        "help": "Skip a stage whose finished output is already in its sub-directory."})
    keep_checkpoints: bool = field(default=TrainingConfig.keep_checkpoints, metadata={
        "help": "Keep each stage's checkpoint-{step}/ folders once it finishes (deleted otherwise)."})
    resume: bool = field(default=False, metadata={
        "help": "Continue a killed run: skip the finished stages and resume the stage it was in from its latest "
                "checkpoint (the outputs are those of an uninterrupted run)."})

    def __post_init__(self) -> None:
        _, rm, _ = stage_configs(self, *(os.path.join(self.output_dir, name) for name in ("sft", "rm", "rl")))
        if rm.is_scalar and self.shaping != "none":  # refused now, not after training SFT and the reward model
            raise ValueError(f"--loss_kind {self.loss_kind} trains a scalar reward model, which has no distribution "
                             f"for --shaping {self.shaping}: use --shaping none")


def stage_configs(config: PipelineConfig, sft_dir: str, rm_dir: str, rl_dir: str) -> tuple:
    """(SFTConfig, RewardConfig, ReinforceConfig) of a pipeline run with the given stage directories."""
    shared = dict(seed=config.seed, resume=config.resume, keep_checkpoints=config.keep_checkpoints, task=config.task)
    sft = SFTConfig(output_dir=sft_dir, num_pairs=config.num_pairs, num_train_epochs=config.sft_epochs, **shared)
    rm = RewardConfig(output_dir=rm_dir, model_name_or_path=sft_dir, num_pairs=config.num_pairs,
                      num_train_epochs=config.rm_epochs, loss_kind=config.loss_kind, label_kind=config.label_kind,
                      **shared)
    rl = ReinforceConfig(output_dir=rl_dir, policy_path=sft_dir, reward_model_path=rm_dir,
                         max_steps=config.rl_steps, shaping=config.shaping, baseline=config.baseline,
                         beta=config.beta, alpha=config.alpha, std_source=config.std_source,
                         quantile_level=config.quantile_level, num_eval_prompts=config.num_eval_prompts,
                         eval_split=config.eval_split, temperature_baselines=config.temperature_baselines,
                         sharpening_baseline=config.sharpening_baseline, sharpening_grid=config.sharpening_grid,
                         curve_eval_steps=config.curve_eval_steps,
                         curve_eval_prompts=config.curve_eval_prompts, **shared)
    return sft, rm, rl


def forget_outputs(stages: tuple, index: int) -> None:
    """Stage ``index`` is about to run: delete its finished mark, and the marks and checkpoints of the stages
    after it (made from an earlier run's outputs), so that a later ``--resume`` neither skips nor continues them
    (process 0 only)."""
    if not PartialState().is_main_process:
        return
    for position, (stage_config, _, last_output) in enumerate(stages[index:]):
        mark = os.path.join(stage_config.output_dir, last_output)
        if os.path.isfile(mark):
            os.remove(mark)
        if position > 0:
            remove_checkpoints(stage_config.output_dir)


def run_stages(config: PipelineConfig, sft_dir: str, rm_dir: str, rl_dir: str) -> dict:
    """SFT -> RM -> REINFORCE into the given directories; returns the REINFORCE ``eval.json`` report.

    With ``reuse_finished_stages`` or ``resume``, a stage whose last output exists is not run again (how the
    experiment grid shares one SFT policy and one reward model between several REINFORCE runs); with
    ``resume`` the other stages continue from their latest checkpoint, if any.
    """
    return run_configured_stages(stage_configs(config, sft_dir, rm_dir, rl_dir),
                                 config.reuse_finished_stages or config.resume)


def run_configured_stages(configs: tuple, reuse: bool) -> dict:
    """SFT -> RM -> REINFORCE with the given ``(SFTConfig, RewardConfig, ReinforceConfig)``; with ``reuse`` a
    stage whose last output exists is not run again. Returns the REINFORCE ``eval.json`` report."""
    sft, rm, rl = configs
    # (settings, run function, the file a finished run writes last: sft's eval.json of the embedded task)
    stages = ((sft, run_sft, EVAL_NAME), (rm, run_reward_training, DISTRIBUTIONS_NAME),
              (rl, run_reinforce, EVAL_SAMPLES_NAME))
    main_process = PartialState().is_main_process
    for index, (stage_config, run, last_output) in enumerate(stages):
        header = f"\n[{index + 1}/{len(stages)}] {STAGE_TITLES[index]} -> {stage_config.output_dir}"
        done = os.path.isfile(os.path.join(stage_config.output_dir, last_output))
        reused = reuse and done
        if main_process:
            print(header + (": finished earlier, reused" if reused else ""), flush=True)
        if reused:
            continue
        forget_outputs(stages, index)
        run(stage_config)
    with open(os.path.join(rl.output_dir, EVAL_NAME)) as handle:
        return json.load(handle)


def read_jsonl(path: str) -> list:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def plot_reward_histograms(samples: list, path: str) -> None:
    """Histograms of the SFT vs the trained policy's held-out responses: reward-model mean E (left) and,
    where known, the ground truth (right), so a reward that rises while the ground truth falls shows."""
    plt = pyplot()

    panels = [("reward", "reward-model mean E", (0.0, 1.0))]
    if "ground_truth" in samples[0]:
        panels.append(("ground_truth", "ground truth (0-4)", (0.0, 4.0)))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (key, title, value_range) in zip(axes[0], panels):
        for name in ("sft", "trained"):
            values = [sample[key] for sample in samples if sample["policy"] == name]
            axis.hist(values, bins=16, range=value_range, alpha=0.6,
                      label=f"{name} (mean {sum(values) / len(values):.3f})")
        axis.set(xlabel=title, ylabel="responses", title=f"Held-out responses: {title}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_training_curves(metrics: list, path: str) -> None:
    """REINFORCE metrics (reward, std, KL, ground truth) against the optimizer step."""
    plt = pyplot()

    curves = [(key, title) for key, title in CURVES if key in metrics[0]]
    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    steps = [record["step"] for record in metrics]
    for axis, (key, title) in zip(axes[0], curves):
        axis.plot(steps, [record[key] for record in metrics])
        axis.set_title(title)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def reward_model_uses(rm_dir: str) -> str:
    """The console's pointer to the ways a saved reward model is used outside distreward."""
    return (f"the reward model in {rm_dir} is a Hugging Face model: load it with "
            f"AutoModelForSequenceClassification.from_pretrained({rm_dir!r}, trust_remote_code=True), serve it with "
            f"`python -m distreward.serve {rm_dir}`, or hand it to TRL with distreward.integrations.trl "
            f"(docs/integrations.md)")


def run_pipeline(config: PipelineConfig) -> dict:
    """Run every stage, write ``report.json`` and the plots, print the SFT vs trained table; returns the report."""
    start = time.perf_counter()
    main_process = PartialState().is_main_process  # under torchrun only process 0 writes and prints
    if main_process:
        save_run_config(config, config.output_dir)
    stage_dirs = [os.path.join(config.output_dir, name) for name in ("sft", "rm", "rl")]
    report = run_stages(config, *stage_dirs)
    if not main_process:
        return report
    rl_dir = stage_dirs[-1]
    with open(os.path.join(config.output_dir, REPORT_NAME), "w") as handle:
        json.dump(report, handle, indent=2)
    histogram, curves = (os.path.join(config.output_dir, name) for name in (HISTOGRAM_NAME, CURVES_NAME))
    plot_reward_histograms(read_jsonl(os.path.join(rl_dir, EVAL_SAMPLES_NAME)), histogram)
    plot_training_curves(read_jsonl(os.path.join(rl_dir, METRICS_NAME)), curves)
    print(f"\npipeline finished in {time.perf_counter() - start:.0f} s (shaping {config.shaping}, RM loss "
          f"{config.loss_kind}); the SFT vs trained numbers and the verdict are in "
          f"{os.path.join(config.output_dir, REPORT_NAME)}\n"
          f"plots: {histogram} (RM reward and ground truth of SFT vs trained responses), "
          f"{curves} (REINFORCE metrics by step)\n{reward_model_uses(stage_dirs[1])}")
    return report
