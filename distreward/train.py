"""``python -m distreward.train [STAGE] [--flags]``: the command-line entry point.

Each stage is a config dataclass (its fields are the flags, their ``help`` metadata the ``--help``
text, parsed by ``transformers.HfArgumentParser`` as TRL's scripts do) and a ``run`` function that
takes it. With no stage the whole embedded pipeline runs.
"""
import importlib
import sys

# stage -> (module, config class, run function, one-line description)
STAGES = {
    "pipeline": ("distreward.pipeline", "PipelineConfig", "run_pipeline",
                 "the whole embedded pipeline: SFT warm-up, reward model, REINFORCE, evaluation (default)"),
    "sft": ("distreward.sft", "SFTConfig", "run_sft", "supervised warm-up of the policy on chosen answers"),
    "rm": ("distreward.rm_trainer", "RewardConfig", "run_reward_training",
           "train and evaluate the distributional reward model"),
    "rl": ("distreward.reinforce", "ReinforceConfig", "run_reinforce",
           "REINFORCE with the uncertainty-shaped distributional reward"),
}
DEFAULT_STAGE = "pipeline"


def usage() -> str:
    lines = ["usage: python -m distreward.train [STAGE] [--flags]   (STAGE --help lists its flags)", "", "stages:"]
    lines += [f"  {name:<9} {spec[3]}" for name, spec in STAGES.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_STAGE
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, config_name, run_name, _ = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"error: stage {stage!r} is not implemented yet ({module_name} is missing)", file=sys.stderr)
        return 2
    from transformers import HfArgumentParser

    parser = HfArgumentParser(getattr(module, config_name), prog=f"python -m distreward.train {stage}")
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        print(f"error: unknown argument(s) for stage {stage!r}: {' '.join(unknown)} (see --help)", file=sys.stderr)
        return 2
    try:
        getattr(module, run_name)(config)
    except ValueError as error:  # bad settings or data: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
