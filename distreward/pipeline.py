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
from dataclasses import MISSING, dataclass, field

from accelerate import PartialState

from distreward.plots import pyplot
from distreward.rl_trainer import ReinforceConfig, run_reinforce
from distreward.rm_trainer import RewardConfig, run_reward_training
from distreward.run_files import (CURVES_NAME, EVAL_NAME, EVAL_SAMPLES_NAME, HISTOGRAM_NAME, METRICS_NAME, REPORT_NAME,
                                  finished_mark, stage_dirs)
from distreward.sft_trainer import SFTConfig, run_sft
from distreward.trainer_utils import DEFAULT_RUN_DIR, remove_checkpoints, save_run_config

STAGE_TITLES = ("SFT warm-up", "reward model", "REINFORCE")
STAGE_CLASSES = {"sft": SFTConfig, "rm": RewardConfig, "rl": ReinforceConfig}
EVERY_STAGE = tuple(STAGE_CLASSES)
# Each pipeline setting -> the stage settings it is ("stage": the setting of the same name; "stage.name" another):
# the one place where the pipeline's flags meet the stages'. A setting's default is its first stage setting's.
STAGE_SETTINGS = {
    "seed": EVERY_STAGE, "task": EVERY_STAGE, "num_pairs": ("sft", "rm"), "sft_epochs": ("sft.num_train_epochs",),
    "rm_epochs": ("rm.num_train_epochs",), "loss_kind": ("rm",), "label_kind": ("rm",), "rl_steps": ("rl.max_steps",),
    "rl_learning_rate": ("rl.learning_rate",), "eval_split": ("rl", "sft"),
    **{name: ("rl",) for name in ("shaping", "std_source", "quantile_level", "baseline", "beta", "alpha",
                                  "num_eval_prompts", "temperature_baselines", "sharpening_baseline",
                                  "sharpening_grid", "curve_eval_steps", "curve_eval_prompts")},
    "keep_checkpoints": EVERY_STAGE, "resume": EVERY_STAGE,
}
CURVES = (("reward", "reward-model mean E"), ("reward_sd", "reward-model std"), ("kl", "KL to reference"),
          ("ground_truth", "ground-truth score (0-4)"))


def stage_targets(name: str) -> list:
    """[(stage, stage setting)] that the pipeline setting ``name`` sets."""
    return [(target.split(".")[0], target.split(".")[-1] if "." in target else name) for target in STAGE_SETTINGS[name]]


def stage_setting(name: str, help_text: str):
    """The ``dataclasses.field`` of pipeline setting ``name``: its first stage setting's default, ``help_text``."""
    stage, target = stage_targets(name)[0]
    source = STAGE_CLASSES[stage].__dataclass_fields__[target]
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata={"help": help_text})
    return field(default=source.default, metadata={"help": help_text})


@dataclass
class PipelineConfig:
    """Settings of the whole pipeline; their defaults and everything else are the stage configs' own
    (:data:`STAGE_SETTINGS`). ``__post_init__`` builds the stage configs once (``stages``: what
    :func:`run_stages` runs), so a setting a stage would reject cannot be built."""

    output_dir: str = field(default=DEFAULT_RUN_DIR, metadata={"help": "Root directory: sft/, rm/ and rl/ "
                                                                       "sub-directories, report.json, plots."})
    seed: int = stage_setting("seed", "Seed of every stage (data, initialisation, sampling).")
    task: str = stage_setting("task", "Embedded task: v2 (demonstrations, a rater panel, regions; docs/testbed.md) "
                                      "or v1.")
    num_pairs: int = stage_setting("num_pairs", "Preference pairs of the embedded task (RM; and SFT's "
                                                "demonstrations, or chosen answers under v1).")
    sft_epochs: float = stage_setting("sft_epochs", "SFT passes over its data: the demonstrations (v2) or the chosen "
                                                    "answers (v1) (the sft stage's --num_train_epochs).")
    rm_epochs: float = stage_setting("rm_epochs", "Reward-model passes over the training pairs.")
    loss_kind: str = stage_setting("loss_kind", "Reward-model loss: bt_mean, bt_kl, dpl, or the scalar baselines "
                                                "scalar_bt and scalar_reg (which need --shaping none).")
    label_kind: str = stage_setting("label_kind", "Reward-model score labels: auto (mixture on data with per-rater "
                                                  "ratings, else gaussian), gaussian, gaussian_spread or mixture "
                                                  "(docs/math.md §2).")
    rl_steps: int = stage_setting("rl_steps", "REINFORCE optimizer steps.")
    rl_learning_rate: float = stage_setting("rl_learning_rate", "REINFORCE's AdamW learning rate (the rl stage's "
                                                                "--learning_rate).")
    shaping: str = stage_setting("shaping", "Reward shaping: none, std_penalty (H2.1), std_scale (H2.2) or quantile "
                                            "(a lower quantile of the RM's distribution).")
    std_source: str = stage_setting("std_source", "Std the std shapings read: model, or the controls constant (batch "
                                                  "mean), shuffled and shuffled_within_prompt.")
    quantile_level: float = stage_setting("quantile_level", "Level in (0, 1) of the quantile shaping.")
    baseline: str = stage_setting("baseline", "REINFORCE baseline: ema, rloo or batch.")
    beta: float = stage_setting("beta", "Weight of the KL to the reference.")
    alpha: float = stage_setting("alpha", "Weight of the std penalty (std_penalty).")
    num_eval_prompts: int = stage_setting("num_eval_prompts", "Held-out prompts on which the SFT and the trained "
                                                              "policy are compared.")
    eval_split: str = stage_setting("eval_split", "Prompts of that comparison and of the SFT policy's greedy "
                                                  "eval.json: test (reports) or validation (tuning settings).")
    temperature_baselines: list[float] = stage_setting(
        "temperature_baselines", "Also evaluate the SFT policy sampled at each of these temperatures, no reward model "
                                 "(the rl stage's --temperature_baselines): the cheap baseline REINFORCE has to beat.")
    sharpening_baseline: bool = stage_setting("sharpening_baseline", "Compare the trained policy with the best "
                                                                     "sharpened SFT policy (--no_sharpening_baseline: "
                                                                     "off).")
    sharpening_grid: list[float] = stage_setting(
        "sharpening_grid", "Temperatures (0: greedy) of the sharpened-SFT baseline, chosen on validation prompts (the "
                           "rl stage's --sharpening_grid).")
    curve_eval_steps: int = stage_setting("curve_eval_steps", "Write rl/curve.jsonl (ground truth and KL to the "
                                                              "reference along training) every this many REINFORCE "
                                                              "steps; 0: off.")
    curve_eval_prompts: int = stage_setting("curve_eval_prompts", "Held-out prompts of each curve.jsonl point (the "
                                                                  "first of the comparison's).")
    reuse_finished_stages: bool = field(default=False, metadata={
        "help": "Skip a stage whose finished output is already in its sub-directory."})
    keep_checkpoints: bool = stage_setting("keep_checkpoints", "Keep each stage's checkpoint-{step}/ folders once it "
                                                               "finishes (deleted otherwise).")
    resume: bool = stage_setting("resume", "Continue a killed run: skip the finished stages and resume the stage it "
                                           "was in from its latest checkpoint (the outputs are those of an "
                                           "uninterrupted run).")

    def __post_init__(self) -> None:
        self.stages = stage_configs(self, *stage_dirs(self.output_dir))  # (SFTConfig, RewardConfig, ReinforceConfig)
        if self.stages[1].is_scalar and self.shaping != "none":  # refused now, not after training SFT and the RM
            raise ValueError(f"--loss_kind {self.loss_kind} trains a scalar reward model, which has no distribution "
                             f"for --shaping {self.shaping}: use --shaping none")


def stage_configs(config: PipelineConfig, sft_dir: str, rm_dir: str, rl_dir: str) -> tuple:
    """(SFTConfig, RewardConfig, ReinforceConfig) of a pipeline run with the given stage directories: each stage
    setting that :data:`STAGE_SETTINGS` names from ``config``, the rest the stage's defaults; each stage reads the
    previous stages' outputs."""
    settings = {stage: {} for stage in STAGE_CLASSES}
    for name in STAGE_SETTINGS:
        for stage, target in stage_targets(name):
            settings[stage][target] = getattr(config, name)
    return (SFTConfig(output_dir=sft_dir, **settings["sft"]),
            RewardConfig(output_dir=rm_dir, model_name_or_path=sft_dir, **settings["rm"]),
            ReinforceConfig(output_dir=rl_dir, policy_path=sft_dir, reward_model_path=rm_dir, **settings["rl"]))


def forget_outputs(stages: tuple, index: int) -> None:
    """Stage ``index`` is about to run: delete its finished mark, and the marks and checkpoints of the stages
    after it (made from an earlier run's outputs), so that a later ``--resume`` neither skips nor continues them
    (process 0 only)."""
    if not PartialState().is_main_process:
        return
    for position, (stage_config, _, mark) in enumerate(stages[index:]):
        mark = os.path.join(stage_config.output_dir, mark)
        if os.path.isfile(mark):
            os.remove(mark)
        if position > 0:
            remove_checkpoints(stage_config.output_dir)


def run_stages(config: PipelineConfig) -> dict:
    """SFT -> RM -> REINFORCE with ``config.stages``; returns the REINFORCE ``eval.json`` report.

    With ``reuse_finished_stages`` or ``resume``, a stage whose finished mark exists is not run again; with
    ``resume`` the other stages continue from their latest checkpoint, if any.
    """
    return run_configured_stages(config.stages, config.reuse_finished_stages or config.resume)


def run_configured_stages(configs: tuple, reuse: bool) -> dict:
    """SFT -> RM -> REINFORCE with the given ``(SFTConfig, RewardConfig, ReinforceConfig)``; with ``reuse`` a
    stage whose finished mark exists is not run again (how the experiment grid shares one SFT policy and one reward
    model between several REINFORCE runs). Returns the REINFORCE ``eval.json`` report: as the rl stage returns it,
    or read from its directory where that stage was reused."""
    sft, rm, rl = configs
    # (settings, run function, finished mark); the sft stage evaluates on the embedded task: eval.json is its last
    stages = ((sft, run_sft, finished_mark("sft", evaluates=sft.num_eval_prompts > 0)),
              (rm, run_reward_training, finished_mark("rm")), (rl, run_reinforce, finished_mark("rl")))
    main_process = PartialState().is_main_process
    for index, (stage_config, run, mark) in enumerate(stages):
        header = f"\n[{index + 1}/{len(stages)}] {STAGE_TITLES[index]} -> {stage_config.output_dir}"
        reused = reuse and os.path.isfile(os.path.join(stage_config.output_dir, mark))
        if main_process:
            print(header + (": finished earlier, reused" if reused else ""), flush=True)
        if reused:
            continue
        forget_outputs(stages, index)
        output = run(stage_config)
    if not reused:  # the rl stage ran (a stage that runs forgets the later stages' marks, so rl runs after it)
        return output
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
    report = run_stages(config)
    if not main_process:
        return report
    _, rm_dir, rl_dir = (stage_config.output_dir for stage_config in config.stages)
    with open(os.path.join(config.output_dir, REPORT_NAME), "w") as handle:
        json.dump(report, handle, indent=2)
    histogram, curves = (os.path.join(config.output_dir, name) for name in (HISTOGRAM_NAME, CURVES_NAME))
    plot_reward_histograms(read_jsonl(os.path.join(rl_dir, EVAL_SAMPLES_NAME)), histogram)
    plot_training_curves(read_jsonl(os.path.join(rl_dir, METRICS_NAME)), curves)
    print(f"\npipeline finished in {time.perf_counter() - start:.0f} s (shaping {config.shaping}, RM loss "
          f"{config.loss_kind}); the SFT vs trained numbers and the verdict are in "
          f"{os.path.join(config.output_dir, REPORT_NAME)}\n"
          f"plots: {histogram} (RM reward and ground truth of SFT vs trained responses), "
          f"{curves} (REINFORCE metrics by step)\n{reward_model_uses(rm_dir)}")
    return report
