"""``python -m distreward.experiments``: the over-optimisation experiment (after Gao et al. 2022, Coste et al. 2023).

An arm is ``RM/SHAPING``: a reward-model variant (:data:`RM_VARIANTS`, RewardConfig settings) and a reward
shaping (:data:`SHAPINGS`, ReinforceConfig settings). For every seed it trains one SFT policy, one reward
model per variant used and one REINFORCE run per arm, in ``output_dir/seed{s}/`` (``sft/``,
``rm_{variant}/``, ``rl_{variant}_{shaping}/``; finished stages are reused, so an interrupted experiment
picks up where it stopped), each REINFORCE run logging ground truth and KL along training
(``curve.jsonl``). ``--budget`` picks the stage settings (:data:`BUDGETS`; an explicit flag overrides
one), ``--jobs`` runs seeds in parallel worker processes, each handed its seed's stage configs. The results
(results.json, results.md, overoptimisation.png) come from the files on disk: :mod:`distreward.experiment_report`.
"""
import multiprocessing
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import field, fields, make_dataclass, replace
from typing import Optional

from distreward.experiment_report import run_dirs, split_arm, write_results
from distreward.pipeline import PipelineConfig, run_configured_stages, stage_configs
from distreward.rl_trainer import ReinforceConfig
from distreward.run_files import (OVEROPTIMISATION_PLOT_NAME, RESULTS_MARKDOWN_NAME, RESULTS_NAME, WORKER_LOG_NAME,
                                  seed_dir)
from distreward.cli import USER_ERRORS, parse_config, user_error

# name -> RewardConfig settings
RM_VARIANTS = {"bt_mean": {"loss_kind": "bt_mean"}, "bt_mean_t0.1": {"loss_kind": "bt_mean", "margin_temperature": 0.1},
               "bt_kl": {"loss_kind": "bt_kl"}, "dpl": {"loss_kind": "dpl"},
               "scalar_bt": {"loss_kind": "scalar_bt"}, "scalar_reg": {"loss_kind": "scalar_reg"}}
# name -> ReinforceConfig settings
SHAPINGS = {"none": {"shaping": "none"}, "std_penalty": {"shaping": "std_penalty"},
            "std_scale": {"shaping": "std_scale"}, "quantile": {"shaping": "quantile"},
            "std_scale_constant": {"shaping": "std_scale", "std_source": "constant"},
            "std_scale_shuffled": {"shaping": "std_scale", "std_source": "shuffled"},
            # the controls that stay meaningful under the rloo baseline (task v2's H2 test)
            "std_penalty_shuffled_within": {"shaping": "std_penalty", "std_source": "shuffled_within_prompt"},
            "std_scale_shuffled_within": {"shaping": "std_scale", "std_source": "shuffled_within_prompt"}}
# H2 and its controls on the bt_kl reward model (within-prompt shuffles: the controls that hold under rloo), and H1
# as RL sees it: every RM variant under shaping none
DEFAULT_ARMS = [f"bt_kl/{shaping}" for shaping in SHAPINGS] + [
    f"{variant}/none" for variant in RM_VARIANTS if variant != "bt_kl"]
GRID_FIELDS = ("seed", "loss_kind", "shaping")  # PipelineConfig's settings that the arms and --seeds set
# The pipeline's stage settings a budget sets (it sets --rl_batch_size and the curve's settings too).
PIPELINE_BUDGET = ("num_pairs", "sft_epochs", "rm_epochs", "rl_steps", "num_eval_prompts")
# full: the pipeline's defaults, a curve point every 10 steps. cpu: 8 seeds x 11 arms in about an hour on 2 cores
# (--jobs 2; measured at 1 thread on a loaded 2-core machine, CPU seconds per run: sft 27, rm 21, rl 28 + curve).
BUDGETS = {
    "full": {**{f.name: f.default for f in fields(PipelineConfig) if f.name in PIPELINE_BUDGET},
             "rl_batch_size": ReinforceConfig.per_device_train_batch_size, "curve_eval_steps": 10,
             "curve_eval_prompts": 64},
    "cpu": {"num_pairs": 1000, "sft_epochs": 3.0, "rm_epochs": 1.0, "rl_steps": 30, "num_eval_prompts": 128,
            "rl_batch_size": 8, "curve_eval_steps": 5, "curve_eval_prompts": 32},
}


def check_arm(arm: str) -> None:
    variant, shaping = split_arm(arm)
    if variant not in RM_VARIANTS or shaping not in SHAPINGS:
        raise ValueError(f"unknown arm {arm!r}: RM one of {', '.join(RM_VARIANTS)}; shaping one of "
                         f"{', '.join(SHAPINGS)}")


def check_experiment(config) -> None:
    """Check the arms, budget and parallelism, and fill the budget's settings that no flag gave."""
    for arm in config.arms:
        check_arm(arm)
    if config.budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}, got {config.budget!r}")
    if config.jobs < 1 or config.threads < 0:
        raise ValueError(f"--jobs must be >= 1 and --threads >= 0, got {config.jobs} and {config.threads}")
    for name, value in BUDGETS[config.budget].items():
        if getattr(config, name) is None:
            setattr(config, name, value)


def arm_stage_configs(config, seed: int, arm: str) -> tuple:
    """(SFTConfig, RewardConfig, ReinforceConfig) of one arm at one seed (ValueError on a setting a stage rejects)."""
    variant, shaping = split_arm(arm)
    shared = {f.name: getattr(config, f.name) for f in fields(PipelineConfig) if f.name not in GRID_FIELDS}
    sft, rm, rl = stage_configs(PipelineConfig(**shared, seed=seed), *run_dirs(config.output_dir, seed, arm))
    curves = ({"curve_eval_steps": config.curve_eval_steps, "curve_eval_prompts": config.curve_eval_prompts}
              if config.curve_eval_steps > 0 else {})  # 0: off, the rl stage's default
    return sft, replace(rm, **RM_VARIANTS[variant]), replace(
        rl, per_device_train_batch_size=config.rl_batch_size, **SHAPINGS[shaping], **curves)


def seed_plan(config, seed: int) -> list:
    """[(arm, its (SFTConfig, RewardConfig, ReinforceConfig))] of every arm at ``seed`` (ValueError on a setting a
    stage rejects)."""
    return [(arm, arm_stage_configs(config, seed, arm)) for arm in config.arms]


def run_seed(seed: int, plan: list, reuse: bool) -> None:
    """Every arm of :func:`seed_plan` ``plan`` in this process (with ``reuse``, finished stages reused)."""
    for arm, configs in plan:
        print(f"\n=== seed {seed}, arm {arm}", flush=True)
        run_configured_stages(configs, reuse)


def run_worker(seed: int, plan: list, reuse: bool, threads: int, log_path: str) -> int:
    """A worker process's job: :func:`run_seed` on ``threads`` torch threads, its output (stdout and stderr) into
    ``log_path``. Returns the exit status: 0, 2 after a user's error (one line), 1 after another (its traceback)."""
    import torch

    torch.set_num_threads(threads)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
        try:
            run_seed(seed, plan, reuse)
        except USER_ERRORS as error:
            return user_error(error)
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return 0


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` worker processes, a fresh one (spawned: no copy of this process's state) per seed."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


def run_workers(config, plans: dict) -> list:
    """Run each seed's plan (seed -> :func:`seed_plan`) in one of ``config.jobs`` worker processes (output in
    ``seed{s}/log.txt``); returns the failed seeds."""
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.jobs)
    reuse = config.reuse_finished_stages or config.resume
    logs = {seed: os.path.join(seed_dir(config.output_dir, seed), WORKER_LOG_NAME) for seed in plans}
    with worker_pool(config.jobs) as pool:
        runs = {}
        for seed, plan in plans.items():
            os.makedirs(os.path.dirname(logs[seed]), exist_ok=True)
            print(f"seed {seed}: worker started ({threads} threads), log in {logs[seed]}", flush=True)
            runs[seed] = pool.submit(run_worker, seed, plan, reuse, threads, logs[seed])
        failed = [seed for seed, run in runs.items() if run.result() != 0]
    for seed in failed:
        print(f"seed {seed} failed, see {logs[seed]}", file=sys.stderr)
    return failed


def run_experiments(config) -> list:
    """Train what is not finished (unless ``aggregate_only``), then write the results; returns the failed seeds."""
    failed = []
    if not config.aggregate_only:
        plans = {seed: seed_plan(config, seed) for seed in config.seeds}  # every setting checked before a run starts
        if config.jobs > 1 and len(config.seeds) > 1:
            failed = run_workers(config, plans)
        else:
            if config.threads:
                import torch
                torch.set_num_threads(config.threads)
            for seed, plan in plans.items():
                run_seed(seed, plan, config.reuse_finished_stages or config.resume)
    if config.aggregate or config.aggregate_only:
        _, markdown = write_results(config.output_dir, config.seeds, config.arms)
        print(f"\n{markdown}\nwritten: {RESULTS_NAME}, {RESULTS_MARKDOWN_NAME}, {OVEROPTIMISATION_PLOT_NAME} in "
              f"{config.output_dir}")
    return failed


def optional(name: str, help_text: str) -> tuple:
    """A budget setting's field: None until :func:`check_experiment` fills it from the budget."""
    kind = float if name.endswith("_epochs") else int
    return name, Optional[kind], field(default=None, metadata={"help": f"{help_text} (unset: the --budget's)."})


PIPELINE_FIELDS = {f.name: f for f in fields(PipelineConfig)}
OWN_FIELDS = [  # the experiment's settings; then every other pipeline setting that the arms and --seeds leave alone
    ("output_dir", str, field(default="runs/experiments", metadata={"help": "Root of the runs and the results."})),
    ("arms", list[str], field(default_factory=lambda: list(DEFAULT_ARMS), metadata={
        "help": f"Arms RM/SHAPING to run; RM one of {', '.join(RM_VARIANTS)}, SHAPING one of {', '.join(SHAPINGS)}."})),
    ("seeds", list[int], field(default_factory=lambda: list(range(8)), metadata={"help": "Seeds to run."})),
    ("budget", str, field(default="cpu", metadata={
        "help": f"Stage settings: {'; '.join(f'{name}: {values}' for name, values in BUDGETS.items())}."})),
    *[optional(name, PIPELINE_FIELDS[name].metadata["help"].rstrip(".")) for name in PIPELINE_BUDGET],
    optional("rl_batch_size", "Prompts per REINFORCE step"),
    optional("curve_eval_steps", "Evaluate ground truth and KL every this many REINFORCE steps, 0: off"),
    optional("curve_eval_prompts", "Held-out prompts of each curve point"),
    ("reuse_finished_stages", bool, field(default=True, metadata={
        "help": "Skip a stage whose finished output is already there, so an interrupted experiment picks up "
                "where it stopped."})),
    ("jobs", int, field(default=1, metadata={"help": "Worker processes, one seed each at a time."})),
    ("threads", int, field(default=0, metadata={"help": "Torch threads per process (0: cores // jobs with "
                                                        "--jobs > 1, torch's default otherwise)."})),
    ("aggregate", bool, field(default=True, metadata={"help": "Write the results once the runs finish."})),
    ("aggregate_only", bool, field(default=False, metadata={
        "help": "Train nothing: rebuild the results from the finished runs on disk."})),
]
ExperimentConfig = make_dataclass("ExperimentConfig", OWN_FIELDS + [
    (f.name, f.type, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
    for f in fields(PipelineConfig)
    if f.name not in GRID_FIELDS and f.name not in {name for name, _, _ in OWN_FIELDS}],
    namespace={"__doc__": "The over-optimisation experiment: every arm at every seed.",
               "__post_init__": check_experiment})


def main(argv=None) -> int:
    try:  # a config validates when it is built: a bad setting raises while parsing
        config, unknown = parse_config(ExperimentConfig, list(sys.argv[1:] if argv is None else argv),
                                       prog="python -m distreward.experiments")
        if unknown:
            return user_error(f"unknown argument(s): {' '.join(unknown)} (see --help)")
        failed = run_experiments(config)
    except USER_ERRORS as error:
        return user_error(error)
    if failed:
        user_error(f"seeds {failed} failed, see their seed{{s}}/{WORKER_LOG_NAME}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
