"""The names of the files and folders a run writes, one home for all: the stages write them, the pipeline, the
experiment grid and the reports read them here. Each stage's "finished" mark is the file its run writes last.

Imports nothing from distreward: every layer may read it.
"""
import os

# Hugging Face model folders (the sft policy, the reward model, rl's policy/)
MODEL_CONFIG_NAME = "config.json"  # the model's config (transformers)
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# every stage
RUN_CONFIG_NAME = "config.json"  # the settings of an rl or pipeline run (the sft and rm stages: below)
METRICS_NAME = "metrics.jsonl"  # training metrics, one line per logged step
TRAINER_STATE_NAME = "trainer_state.json"  # in a checkpoint of the rl stage's loop
METRICS_WINDOW_NAME = "metrics_window.json"  # in a Trainer checkpoint: the metrics of the steps not logged yet
EVAL_NAME = "eval.json"  # a stage's evaluation report (sft: embedded task only)

# sft stage
SFT_CONFIG_NAME = "sft_config.json"  # its settings (config.json is the model's)

# rm stage
RM_CONFIG_NAME = "rm_config.json"  # its settings (config.json is the model's)
LEGACY_CONFIG_NAME = "reward_model_config.json"  # the reward model's settings in its format before the HF model
PREDICTIONS_NAME = "predictions.safetensors"
DISTRIBUTIONS_NAME = "distributions.png"
RELIABILITY_NAME = "reliability.png"
ADAPTER_DIR = "adapter"  # --use_peft: the LoRA adapter and the head (PEFT's save_pretrained)

# rl stage
POLICY_DIR = "policy"
EVAL_SAMPLES_NAME = "eval_samples.jsonl"
CURVE_NAME = "curve.jsonl"

# pipeline: one sub-directory per stage, then its report and plots
SFT_DIR, RM_DIR, RL_DIR = "sft", "rm", "rl"
STAGE_DIRS = (SFT_DIR, RM_DIR, RL_DIR)
REPORT_NAME = "report.json"
HISTOGRAM_NAME = "reward_histogram.png"
CURVES_NAME = "training_curves.png"

# experiment grid (python -m distreward.experiments)
RESULTS_NAME = "results.json"
RESULTS_MARKDOWN_NAME = "results.md"
OVEROPTIMISATION_PLOT_NAME = "overoptimisation.png"
WORKER_LOG_NAME = "log.txt"  # in seed{s}/: the output of the worker process that runs seed s


def seed_dir(output_dir: str, seed: int) -> str:
    """The experiment grid's folder of ``seed``: its sft/, rm_{variant}/ and rl_{variant}_{shaping}/ runs."""
    return os.path.join(output_dir, f"seed{seed}")


# stage -> its "finished" mark, the file its run writes last: with it there and no checkpoint left, --resume has
# nothing to do. An sft run on the embedded task writes its eval.json after the weights: see finished_mark.
FINISHED_MARKS = {"pipeline": REPORT_NAME, "sft": WEIGHTS_NAME, "rm": DISTRIBUTIONS_NAME, "rl": EVAL_SAMPLES_NAME}


def finished_mark(stage: str, evaluates: bool = False) -> str:
    """``stage``'s finished mark; ``evaluates``: the sft run evaluates its policy on the embedded task (as the
    pipeline's does), so its last file is ``eval.json``."""
    return EVAL_NAME if stage == "sft" and evaluates else FINISHED_MARKS[stage]


def stage_dirs(output_dir: str) -> tuple:
    """A pipeline run's (sft, rm, rl) sub-directories of ``output_dir``."""
    return tuple(os.path.join(output_dir, name) for name in STAGE_DIRS)
