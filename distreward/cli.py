"""The command line: ``python -m distreward.train [STAGE] [--flags]`` (or ``distreward [STAGE] [--flags]``), its
parsing and its user errors, which the other commands (``python -m distreward.experiments``, ``.evaluation``,
``.testbed_report``) share.

Each stage is a config dataclass (its fields are the flags, their ``help`` metadata the ``--help``
text, parsed by ``transformers.HfArgumentParser`` as TRL's scripts do) and a ``run`` function that
takes it. With no stage the whole embedded pipeline runs. A user's mistake is one ``error: ...`` line on
stderr and exit status 2, never a traceback.
"""
import argparse
import os
import sys

from accelerate import PartialState

from distreward import pipeline
from distreward.rl_trainer import ReinforceConfig, run_reinforce
from distreward.rm_trainer import RewardConfig, run_reward_training
from distreward.run_files import finished_mark, stage_dirs
from distreward.sft_trainer import SFTConfig, run_sft
from distreward.trainer_utils import TrainingInterrupted, list_checkpoints

# stage -> (config class, run function, one-line description)
STAGES = {
    "pipeline": (pipeline.PipelineConfig, pipeline.run_pipeline,
                 "the whole embedded pipeline: SFT warm-up, reward model, REINFORCE, evaluation (default)"),
    "sft": (SFTConfig, run_sft, "supervised warm-up of the policy (demonstrations on task v2)"),
    "rm": (RewardConfig, run_reward_training, "train and evaluate the distributional reward model"),
    "rl": (ReinforceConfig, run_reinforce, "REINFORCE with the uncertainty-shaped distributional reward"),
}
DEFAULT_STAGE = "pipeline"
# A user's mistake: bad settings or data (ValueError), a model or data set that cannot be read (OSError: transformers
# and datasets raise it for a directory without a model, or a hub id that does not exist or cannot be reached).
USER_ERRORS = (ValueError, OSError)


def usage() -> str:
    lines = ["usage: python -m distreward.train [STAGE] [--flags]   (STAGE --help lists its flags)", "", "stages:"]
    lines += [f"  {name:<9} {description}" for name, (_, _, description) in STAGES.items()]
    lines += ["", f"With no STAGE the {DEFAULT_STAGE} runs: `python -m distreward.train {DEFAULT_STAGE} --help` lists "
                  "its flags (they are the flags of `python -m distreward.train` itself)."]
    return "\n".join(lines)


def user_error(message) -> int:
    """Print ``error: message``, one line on stderr, and return the exit status of a user's mistake (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of a small command: abbreviations off, and a parse error one line and exit 2 (argparse
    prints the whole usage first)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.error = lambda message: sys.exit(user_error(f"{message} (see {prog} --help)"))
    return parser


class UsageError(ValueError):
    """A command line argparse cannot read (a value of the wrong type, a missing value): one line, exit 2."""


def join_negative_values(argv: list) -> list:
    """``["--flag", "-1e-3"]`` -> ``["--flag=-1e-3"]``: argparse before Python 3.14 takes a negative number in
    scientific notation for a flag ("expected one argument") instead of the value the validator should see."""
    joined = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if token.startswith("-") and previous.startswith("--") and "=" not in previous and is_number(token):
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_config(config_class, argv: list, prog: str) -> tuple:
    """(``config_class`` instance, unknown arguments) from ``argv`` with ``transformers.HfArgumentParser``.

    Abbreviations are off, so a typo (``--learning-rat``) is an unknown argument, never another flag.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class, prog=prog, allow_abbrev=False)

    def one_line_error(message: str):  # argparse would print the whole usage (30 lines) before it
        raise UsageError(f"{message} (see {prog} --help)")

    parser.error = one_line_error
    for action in parser._actions:  # HfArgumentParser gives --no_FLAG the help of --FLAG
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest} off (it is on by default)."
    config, unknown = parser.parse_args_into_dataclasses(args=join_negative_values(argv),
                                                         return_remaining_strings=True)
    return config, unknown


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage = argv.pop(0) if argv and not argv[0].startswith("-") else DEFAULT_STAGE
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    config_class, run, _ = STAGES[stage]
    try:  # a config validates when it is built: a bad setting raises while parsing
        config, unknown = parse_config(config_class, argv, prog=f"python -m distreward.train {stage}")
        if unknown:
            return user_error(f"unknown argument(s) for stage {stage!r}: {' '.join(unknown)} (see --help)")
        if config.resume and is_finished(stage, config.output_dir):
            print(f"{config.output_dir} is a finished {stage} run: nothing to resume (to train it again, run without "
                  f"--resume, which starts afresh and overwrites it)")
            return 0
        run(config)
        if stage == "rm" and PartialState().is_main_process:
            print(pipeline.reward_model_uses(config.output_dir))
    except USER_ERRORS as error:  # bad settings, data or paths: one clear line, no traceback
        return user_error(error)
    except KeyboardInterrupt as interrupt:  # Ctrl-C (or SIGTERM, below): one line, not a traceback
        resume = f"`python -m distreward.train {stage} {' '.join(argv)} --resume`"
        if isinstance(interrupt, TrainingInterrupted):  # training stopped at a step boundary and saved it
            print(f"\ninterrupted: saved {interrupt.checkpoint}; {resume} continues from it", file=sys.stderr)
        else:
            print(f"\ninterrupted: {resume} continues from the last checkpoint (every --save_steps steps)",
                  file=sys.stderr)
        return 130
    return 0


def is_finished(stage: str, output_dir: str) -> bool:
    """Whether ``output_dir`` holds a finished ``stage`` run (its finished mark, and no checkpoint to resume from)."""
    if not os.path.isfile(os.path.join(output_dir, finished_mark(stage))):
        return False
    directories = [output_dir, *(stage_dirs(output_dir) if stage == "pipeline" else ())]
    return not any(list_checkpoints(directory) for directory in directories)


def interrupt_on_sigterm() -> None:
    """A cluster scheduler's SIGTERM ends a run as Ctrl-C does (the one-line message and exit 130)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
