"""``python -m distreward.evaluation RUN_DIR RUN_DIR ...``: compares finished ``rm`` runs side by side (a markdown
table of their ``eval.json`` and one PNG of their predictions).

The metrics are :mod:`distreward.rm_metrics`'s, the figure :mod:`distreward.plots`', the table
:mod:`distreward.tables`'.
"""
import json
import os
import sys

from safetensors.torch import load_file

from distreward.cli import argument_parser, user_error
from distreward.plots import plot_runs
from distreward.run_files import EVAL_NAME, PREDICTIONS_NAME, RM_CONFIG_NAME, RUN_CONFIG_NAME
from distreward.tables import markdown_table


def run_settings_path(run_dir: str) -> str:
    """The settings file of an ``rm`` run: ``rm_config.json``, or a run's from before it, ``config.json``."""
    path = os.path.join(run_dir, RM_CONFIG_NAME)
    legacy = os.path.join(run_dir, RUN_CONFIG_NAME)  # runs before the Hugging Face model kept it in config.json
    return path if os.path.isfile(path) or not os.path.isfile(legacy) else legacy


def compare_runs(run_dirs: list, output_path: str) -> str:
    """Side-by-side PNG of finished ``rm`` runs (named by their loss_kind) and their metrics table."""
    runs, metrics = {}, {}
    for run_dir in run_dirs:
        with open(run_settings_path(run_dir)) as handle:
            name = f"{json.load(handle)['loss_kind']} ({os.path.basename(os.path.normpath(run_dir))})"
        with open(os.path.join(run_dir, EVAL_NAME)) as handle:
            metrics[name] = json.load(handle)
        runs[name] = load_file(os.path.join(run_dir, PREDICTIONS_NAME))
    plot_runs(runs, output_path)
    return markdown_table(metrics)


def main(argv=None) -> int:
    parser = argument_parser("python -m distreward.evaluation",
                             "Compare finished reward-model runs (e.g. bt_mean vs bt_kl).")
    parser.add_argument("run_dirs", nargs="+", help="output_dir of each `python -m distreward.train rm` run")
    parser.add_argument("--output", default="rm_comparison.png", help="path of the side-by-side PNG")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        missing = [os.path.basename(path) for path in (run_settings_path(run_dir), os.path.join(run_dir, EVAL_NAME),
                                                       os.path.join(run_dir, PREDICTIONS_NAME))
                   if not os.path.isfile(path)]
        if missing:
            return user_error(f"{run_dir} is not a finished `python -m distreward.train rm` run "
                              f"(no {', '.join(missing)})")
    print(compare_runs(args.run_dirs, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
