"""``python -m distreward.testbed_report RUN_DIR [RUN_DIR ...]``: the task v2 acceptance table over seeds.

Each RUN_DIR is a finished ``python -m distreward.train --seed S --output_dir RUN_DIR`` (its ``sft/``,
``rm/`` and ``rl/`` ``eval.json``), one per seed. The table gives, per criterion of docs/results.md, each
seed's value, the mean and (for the policy gains) the 95% t-interval over seeds, and whether the target
is met (T3's rows compare the trained policy decoded as the SFT policy is, at the temperature chosen on
validation problems, with the best sharpened SFT policy; the trained policy at T = 1 is reported beside
them), then T3 per region; ``--output`` writes it as JSON too. With ``--overoptimisation REGION``, each
RUN_DIR is an ``rl`` stage's output instead, and the table says per seed whether, in REGION, the RM
reward rose while the ground truth fell (trained vs SFT, paired by prompt). With ``--answers REGION``,
the table says what the reward model sees of each policy's right and wrong answers in REGION (mean RM
reward, RM std, raters' sd).
"""
import json
import math
import os
import sys

from scipy import stats

from distreward.cli import argument_parser, user_error
from distreward.run_files import EVAL_NAME, EVAL_SAMPLES_NAME, STAGE_DIRS

# (name, target, reader of (sft, rm, rl) eval.json, interval over seeds?)
CRITERIA = (
    ("SFT greedy ground truth, careful region", ">= 3.6", lambda s, m, r: s["by_region"]["careful"]["mean"], False),
    ("SFT greedy ground truth, bug region", "<= 1.0", lambda s, m, r: s["by_region"]["bug"]["mean"], False),
    ("RM accuracy on bug pairs whose truth differs", ">= 0.90",
     lambda s, m, r: m["panel"]["by_region"]["bug"]["ground_truth_accuracy"], False),
    ("RM std, superficial / careful-correct", "", lambda s, m, r: m["panel"]["by_region"]["superficial"][
        "std_ratio_to_careful_correct"], False),
    ("RM std, taste / careful-correct", "", lambda s, m, r: m["panel"]["by_region"]["taste"][
        "std_ratio_to_careful_correct"], False),
    ("RM std, disputed superficial answers / careful-correct", ">= 2", lambda s, m, r: m["panel"]["by_region"][
        "superficial"]["disputed_std_ratio_to_careful_correct"], False),
    ("RM std, disputed taste answers / careful-correct", ">= 2", lambda s, m, r: m["panel"]["by_region"]["taste"][
        "disputed_std_ratio_to_careful_correct"], False),
    ("Spearman(RM std, raters' sd)", ">= 0.5", lambda s, m, r: m["panel"]["std_spread_spearman"], False),
    ("sharpening temperature chosen on validation", "", lambda s, m, r: r["sharpened_sft"]["temperature"], False),
    ("ground truth: trained - SFT at T = 1", "", lambda s, m, r: r["comparison"]["ground_truth"]["gain"], True),
    ("ground truth: trained (T = 1) - best sharpened SFT", "",
     lambda s, m, r: r["sharpened_sft"]["ground_truth"]["gain"], True),
    ("ground truth, bug region: trained (T = 1) - best sharpened SFT", "",
     lambda s, m, r: r["sharpened_sft"]["by_region"]["bug"]["ground_truth"]["gain"], True),
    ("temperature of the sharpened trained policy", "", lambda s, m, r: r["sharpened_sft"]["trained_sharpened"][
        "temperature"], False),
    ("ground truth: sharpened trained - best sharpened SFT", ">= +0.10, interval above 0",
     lambda s, m, r: r["sharpened_sft"]["trained_sharpened"]["ground_truth"]["gain"], True),
    ("ground truth, bug region: sharpened trained - best sharpened SFT", ">= +0.8",
     lambda s, m, r: r["sharpened_sft"]["trained_sharpened"]["by_region"]["bug"]["ground_truth"]["gain"], True),
    ("KL to the SFT policy, trained", "", lambda s, m, r: r["trained"]["kl_to_ref"], False),
)


def t_interval(values: list) -> tuple:
    """The 95% t-interval (low, high) of the mean of ``values`` (NaN with fewer than 2)."""
    if len(values) < 2:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def meets(target: str, mean: float, low: float) -> str:
    """Whether a ``target`` such as ``>= 3.6`` or ``>= +0.10, interval above 0`` is met ('' when it names none)."""
    if not target:
        return ""
    bound = float(target.split()[1].rstrip(","))
    ok = mean >= bound if target.startswith(">=") else mean <= bound
    if "interval above 0" in target:
        ok = ok and low > 0
    return "yes" if ok else "no"


def read_run(run_dir: str) -> tuple:
    runs = []
    for stage in STAGE_DIRS:
        path = os.path.join(run_dir, stage, EVAL_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{run_dir} is not a finished pipeline run (no {stage}/{EVAL_NAME})")
        with open(path) as handle:
            runs.append(json.load(handle))
    return tuple(runs)


def acceptance(runs: list) -> list:
    """One dict per criterion over ``runs`` (:func:`read_run` of each): name, target, values (one per run), mean,
    ci95 (gains only), met."""
    rows = []
    for name, target, read, interval in CRITERIA:
        values = [read(*run) for run in runs]
        mean = sum(values) / len(values)
        low, high = t_interval(values) if interval else (math.nan, math.nan)
        rows.append({"criterion": name, "target": target, "values": values, "mean": mean,
                     "ci95": [low, high] if interval else None, "met": meets(target, mean, low)})
    return rows


def region_rows(runs: list) -> list:
    """T3 per region over ``runs`` (:func:`read_run` of each): one dict per region with the sharpened trained
    policy's ground-truth gain over the best sharpened SFT policy per run (``values``), their mean and 95%
    t-interval, and the test problems per run."""
    reports = [rl["sharpened_sft"]["trained_sharpened"]["by_region"] for _, _, rl in runs]
    rows = []
    for region in sorted(set().union(*reports)):
        values = [report[region]["ground_truth"]["gain"] for report in reports if region in report]
        rows.append({"region": region, "values": values, "mean": sum(values) / len(values),
                     "ci95": list(t_interval(values)), "num_prompts": [r[region]["num_prompts"] for r in reports
                                                                        if region in r]})
    return rows


def answer_rows(run_dirs: list, region: str) -> list:
    """In ``region``, per policy of ``rl/eval_samples.jsonl`` and per right (ground truth 4) or wrong answer, pooled
    over the runs: the number of answers and their mean RM reward, RM std and raters' sd (what the reward model
    sees of each policy's right and wrong answers)."""
    groups = {}
    for run_dir in run_dirs:
        path = os.path.join(run_dir, STAGE_DIRS[2], EVAL_SAMPLES_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{run_dir} is not a finished pipeline run (no {STAGE_DIRS[2]}/{EVAL_SAMPLES_NAME})")
        with open(path) as handle:
            for record in map(json.loads, handle):
                if record["region"] == region:
                    key = (record["policy"], "right" if record["ground_truth"] == 4.0 else "wrong")
                    groups.setdefault(key, []).append(record)
    if not groups:
        raise ValueError(f"no answer in region {region!r} in these runs")
    return [{"policy": policy, "answers": kind, "num": len(records),
             **{name: sum(r[name] for r in records) / len(records) for name in ("reward", "std", "rater_spread")}}
            for (policy, kind), records in sorted(groups.items())]


def answers_markdown(rows: list, region: str) -> str:
    lines = [f"| policy | {region} answers | number | RM reward E | RM std | raters' sd |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {row['policy']} | {row['answers']} | {row['num']} | {row['reward']:.3f} | {row['std']:.3f} | "
              f"{row['rater_spread']:.2f} |" for row in rows]
    return "\n".join(lines)


def overoptimisation(rl_dirs: list, region: str) -> list:
    """One dict per ``rl`` output dir: ``region``'s RM reward and ground-truth gains (trained - SFT, with their
    95% paired intervals) and ``over_optimised``: the reward rose while the ground truth fell."""
    rows = []
    for rl_dir in rl_dirs:
        path = os.path.join(rl_dir, EVAL_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{rl_dir} is not a finished rl run (no {EVAL_NAME})")
        with open(path) as handle:
            gains = json.load(handle)["comparison"]["by_region"][region]
        rows.append({"run": rl_dir, "reward": gains["reward"], "ground_truth": gains["ground_truth"],
                     "kl": gains["kl"]["trained"],
                     "over_optimised": gains["reward"]["gain"] > 0 and gains["ground_truth"]["gain"] < 0})
    return rows


def overoptimisation_markdown(rows: list, region: str) -> str:
    lines = [f"| run | {region}: RM reward gain | ground-truth gain | KL | reward up, truth down |",
             "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[key]['gain']:+.3f} [{row[key]['ci95'][0]:+.3f}, {row[key]['ci95'][1]:+.3f}]"
                 for key in ("reward", "ground_truth")]
        verdict = "yes" if row["over_optimised"] else "no"
        lines.append(f"| {row['run']} | {' | '.join(cells)} | {row['kl']:.2f} | {verdict} |")
    lines.append(f"\n{sum(row['over_optimised'] for row in rows)} of {len(rows)} runs over-optimised in {region}.")
    return "\n".join(lines)


def markdown(rows: list, regions: list) -> str:
    lines = ["| criterion | target | per seed | mean [95% t-interval] | met |", "|---|---|---|---|---|"]
    for row in rows:
        interval = f" [{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}]" if row["ci95"] else ""
        lines.append(f"| {row['criterion']} | {row['target']} | {' '.join(f'{v:.3g}' for v in row['values'])} | "
                     f"{row['mean']:.3f}{interval} | {row['met']} |")
    lines += ["", "| region | test problems per seed | ground truth: sharpened trained - best sharpened SFT, per "
                  "seed | mean [95% t-interval] |", "|---|---|---|---|"]
    lines += [f"| {row['region']} | {min(row['num_prompts'])}-{max(row['num_prompts'])} | "
              f"{' '.join(f'{v:+.2f}' for v in row['values'])} | {row['mean']:+.3f} [{row['ci95'][0]:+.3f}, "
              f"{row['ci95'][1]:+.3f}] |" for row in regions]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argument_parser("python -m distreward.testbed_report",
                             "Task v2 acceptance over finished pipeline runs, one per seed.")
    parser.add_argument("run_dirs", nargs="+", help="output_dir of each `python -m distreward.train` run")
    parser.add_argument("--output", help="also write the rows as JSON here")
    parser.add_argument("--overoptimisation", metavar="REGION", help="RUN_DIRs are rl outputs: over-optimisation "
                                                                     "in REGION (e.g. superficial) per run")
    parser.add_argument("--answers", metavar="REGION", help="RM reward, RM std and raters' sd of each policy's right "
                                                            "and wrong answers in REGION, pooled over the runs")
    args = parser.parse_args(argv)
    try:
        if args.overoptimisation:
            rows = overoptimisation(args.run_dirs, args.overoptimisation)
            text = overoptimisation_markdown(rows, args.overoptimisation)
        elif args.answers:
            rows = answer_rows(args.run_dirs, args.answers)
            text = answers_markdown(rows, args.answers)
        else:
            runs = [read_run(run_dir) for run_dir in args.run_dirs]
            rows, regions = acceptance(runs), region_rows(runs)
            text = markdown(rows, regions)
            rows = {"criteria": rows, "regions": regions}
    except (ValueError, KeyError) as error:
        return user_error(error)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
