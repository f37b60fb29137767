"""The embedded task v2 (distreward.testbed): problems and splits, the demonstrator, the rater panel, panel labels
and the evaluation pieces that read them (regions, the within-prompt std control, the sharpened baseline)."""
import collections
import json
import random
import statistics

import pytest
import torch

from distreward import labels, policy_comparison, rm_metrics, testbed
from distreward.data import (PreferenceCollator, embedded_task, load_preference_data, load_sft_data,
                             tokenize_pairs)
from distreward.ops import bin_centers
from distreward.rewards import replace_std
from distreward.splits import SPLITS, prompt_split
from distreward.tiny import build_tiny_tokenizer

ADD_CARRY = "Mira has 7 apples, gets 5 more. How many?"
ADD_CARRY_OTHER = "Mira: 7 apples and 5 more apples?"
ADD_PLAIN = "Mira has 1 apples, gets 5 more. How many?"


def test_every_phrasing_parses_and_one_problem_has_one_split():
    rng = random.Random(0)
    for family, phrasings in testbed.PHRASINGS.items():
        for _ in range(50):
            fields = testbed._draw_problem(rng, family)
            prompts = [text.format(**fields) for text in phrasings]
            assert {testbed.prompt_kind(p) for p in prompts} == {family}
            assert len({testbed.problem_key(p) for p in prompts}) == 1
            assert len({prompt_split(testbed.problem_key(p)) for p in prompts}) == 1
    with pytest.raises(ValueError, match="not a prompt"):
        testbed.parse("Tell me a joke.")
    with pytest.raises(ValueError, match="not a prompt"):  # the thing must be one of THINGS, named alike twice
        testbed.parse("Mira: 7 apples and 5 more pens?")


def test_no_problem_in_two_splits_and_the_test_split_has_64_problems_per_family():
    problems = {split: {testbed.problem_key(row["prompt"]) for row in testbed.make_preference_dataset(400, 1, split)}
                for split in SPLITS}
    assert not problems["train"] & problems["test"] and not problems["train"] & problems["validation"]
    assert not problems["validation"] & problems["test"]
    test_prompts = testbed.make_prompts(4 * 80, seed=0, split="test", unique=True)
    per_family = collections.Counter(testbed.prompt_kind(p) for p in test_prompts)
    assert per_family == {family: 80 for family in testbed.FAMILIES}
    assert len({testbed.problem_key(p) for p in test_prompts}) == len(test_prompts)
    with pytest.raises(ValueError, match="distinct taste problems"):  # 4,900 names, ~490 in test
        testbed.make_prompts(4 * 600, seed=0, split="test", unique=True)


def test_the_data_are_deterministic_by_seed():
    first = testbed.make_preference_dataset(200, seed=3)
    assert first.to_list() == testbed.make_preference_dataset(200, seed=3).to_list()
    assert first.to_list() != testbed.make_preference_dataset(200, seed=4).to_list()
    assert testbed.make_demonstrations(50, 3).to_list() == testbed.make_demonstrations(50, 3).to_list()


def test_ground_truth():
    assert testbed.score_response(ADD_CARRY, "12") == 4.0
    assert testbed.score_response(ADD_CARRY, "2") == 0.0  # the dropped carry is off by 10
    assert testbed.score_response(ADD_CARRY_OTHER, "11") == 3.0
    assert testbed.score_response("Sort: 4 1 3", "1 3 4") == 4.0
    assert testbed.score_response("Sort: 4 1 3", "1 3 5") == pytest.approx(4 / 3)  # one digit wrong: at most half
    assert testbed.score_response("Sort: 4 1 3 2", "2 1 3 4") == pytest.approx(1.0)  # 2 of 4 in place: 2 x 1/2
    assert testbed.score_response("Count the letter a in abca.", "2") == 4.0
    assert testbed.score_response("Pick a lucky digit for Mira.", "7") == 2.5
    assert testbed.score_response("Pick a lucky digit for Mira.", "3") == 2.0
    assert testbed.score_response("Pick a lucky digit for Mira.", "ten") == 0.0


def test_regions():
    assert testbed.prompt_region(ADD_CARRY) == "bug"
    assert testbed.prompt_region(ADD_PLAIN) == "careful"
    assert testbed.prompt_region("Sort: 4 1 3") == testbed.prompt_region("Sort: 4 1 3 2 9 9") == "superficial"
    assert testbed.prompt_region("How many a in: abca?") == "careful"
    assert testbed.prompt_region("How many a in: abcab?") == "consensus"
    assert testbed.prompt_region("Choose a digit for Mira.") == "taste"


def answers(prompt, draws=2000, seed=0):
    rng = random.Random(seed)
    return collections.Counter(testbed.demonstrate(prompt, rng) for _ in range(draws))


def test_the_demonstrator_drops_the_carry_so_its_mode_is_wrong():
    counts = answers(ADD_CARRY)
    assert counts.most_common(1)[0][0] == "2"
    assert 0.8 < counts["2"] / 2000 < 0.9 and 0.08 < counts["12"] / 2000 < 0.16
    assert answers(ADD_PLAIN).most_common(1)[0][0] == "6"  # no carry: right
    assert answers("Sort: 4 1 3 2").most_common(1)[0][0] == "1 2 3 4"
    assert answers("Pick a lucky digit for Mira.").most_common(1)[0][0] == "7"


def panel(prompt, response, repeats=200):
    rng = random.Random(1)
    ratings = [testbed.rate(prompt, response, rng) for _ in range(repeats)]
    means = [statistics.mean(r) for r in ratings]
    return statistics.mean(means), statistics.mean(statistics.pstdev(r) for r in ratings)


def test_the_panel_regions_behave_as_designed():
    careful_mean, careful_sd = panel(ADD_CARRY, "2")  # careful raters see the bug
    assert careful_mean < 0.3 and careful_sd < 0.3
    assert panel(ADD_CARRY, "12")[0] > 3.7
    truth = testbed.score_response("Sort: 4 1 3 2", "1 2 3 5")
    for wrong in ("1 2 3 5", "2 1 3 4", "4 1 3 2"):  # a wrong digit, a swap, the input: well-formed, all of them
        truth = testbed.score_response("Sort: 4 1 3 2", wrong)
        superficial_mean, superficial_sd = panel("Sort: 4 1 3 2", wrong)
        assert superficial_mean > truth + 0.8 and superficial_sd > 1.0  # mean wrong, spread high
    right_mean, right_sd = panel("Sort: 4 1 3 2", "1 2 3 4")
    assert right_mean > 3.7 and right_sd < 0.3  # every rater agrees on a right answer
    short = testbed.score_response("Sort: 4 1 3 2", "1 2 3")  # not well-formed: every rater is careful
    assert panel("Sort: 4 1 3 2", "1 2 3")[0] == pytest.approx(short, abs=0.2)
    consensus_mean, consensus_sd = panel("How many a in: abcabca?", "2")  # the truth is 3; raters say 2
    assert consensus_mean > 3.7 and consensus_sd < 0.3 and testbed.score_response("How many a in: abcabca?", "2") == 3
    taste_mean, taste_sd = panel("Pick a lucky digit for Mira.", "7")
    assert taste_mean == pytest.approx(2.5, abs=0.2) and taste_sd > 1.0  # bimodal, mean right
    assert testbed.panel_spread("Sort: 4 1 3 2", "1 2 3 5") == testbed.panel_spread("Sort: 4 1 3 2", "1 2 3 5")


def test_pairs_keep_the_panel_and_prefer_the_higher_mean():
    data = testbed.make_preference_dataset(300, seed=0)
    for row in data:
        assert len(row["ratings_chosen"]) == testbed.NUM_RATERS
        assert row["score_chosen"] == pytest.approx(statistics.mean(row["ratings_chosen"]))
        assert row["score_chosen"] > row["score_rejected"]
        assert row["region"] == testbed.prompt_region(row["prompt"])
    assert set(data["region"]) == set(testbed.REGIONS)


def test_panel_labels():
    assert labels.spread_sigma([2, 2, 2, 2, 2], 0.1, 0, 4) == pytest.approx(0.1)
    spread = statistics.pstdev([4, 4, 1, 1, 4]) / 4  # 1.47 / 4
    assert labels.spread_sigma([4, 4, 1, 1, 4], 0.1, 0, 4) == pytest.approx((0.1 ** 2 + spread ** 2) ** 0.5)
    q = torch.tensor(labels.mixture_label([4, 4, 1, 1, 4], 0.1, 0, 4, 10))
    assert q.sum().item() == pytest.approx(1.0, abs=1e-9)
    centers = bin_centers(10, dtype=torch.float64)
    per_rater = [torch.softmax(-(centers - r / 4) ** 2 / (2 * 0.1 ** 2), 0) for r in (4, 4, 1, 1, 4)]
    q = q.double()
    assert torch.allclose(q, torch.stack(per_rater).mean(0), atol=1e-12)
    assert q[2] > q[4] < q[9]  # two modes, at 1/4 and 1
    with pytest.raises(ValueError, match="outside the score range"):
        labels.spread_sigma([5], 0.1, 0, 4)


@pytest.mark.parametrize("label_kind, column", [("gaussian_spread", "sigma"), ("mixture", "q")])
def test_the_collator_carries_panel_labels(label_kind, column):
    tokenizer = build_tiny_tokenizer()
    raw = testbed.make_preference_dataset(8, seed=0)
    rows = tokenize_pairs(tokenizer, raw, 0.0, 4.0, 256, label_kind, 0.1, 10)
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(rows))
    shape = (8,) if column == "sigma" else (8, 10)
    assert batch[f"{column}_chosen"].shape == shape and batch[f"{column}_rejected"].shape == shape
    assert "q_chosen" not in PreferenceCollator(tokenizer.pad_token_id)(
        list(tokenize_pairs(tokenizer, raw, 0.0, 4.0, 256)))


def test_panel_labels_need_ratings_and_auto_picks_by_the_data():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="ratings"):
        load_preference_data(tokenizer, num_pairs=20, task="v1", label_kind="mixture")
    v1 = load_preference_data(tokenizer, num_pairs=20, task="v1", label_kind="auto")["train"]
    v2 = load_preference_data(tokenizer, num_pairs=20, task="v2", label_kind="auto")["train"]
    assert "q_chosen" not in v1.column_names and "sigma_chosen" not in v1.column_names
    assert "q_chosen" in v2.column_names and labels.resolve_label_kind("auto", True) == labels.PANEL_DEFAULT


def test_sft_trains_on_demonstrations_not_on_chosen_answers():
    tokenizer = build_tiny_tokenizer()
    demonstrations = load_sft_data(tokenizer, num_pairs=50, seed=0, task="v2")
    assert len(demonstrations) == 50
    expected = testbed.make_demonstrations(50, 0)
    first = tokenizer.decode(demonstrations[0]["input_ids"])
    assert expected[0]["chosen"][1]["content"] in first
    with pytest.raises(ValueError, match="--task"):
        embedded_task("v3")


def test_shuffled_within_prompt_permutes_inside_each_prompt():
    std = torch.arange(12, dtype=torch.float32)
    shuffled = replace_std(std, "shuffled_within_prompt", torch.Generator().manual_seed(0), samples_per_prompt=4)
    assert not torch.equal(shuffled, std)
    for group in range(3):
        assert sorted(shuffled[4 * group:4 * group + 4].tolist()) == std[4 * group:4 * group + 4].tolist()
    again = replace_std(std, "shuffled_within_prompt", torch.Generator().manual_seed(0), samples_per_prompt=4)
    assert torch.equal(shuffled, again)
    with pytest.raises(ValueError, match="groups of 5"):
        replace_std(std, "shuffled_within_prompt", samples_per_prompt=5)


def records(policy, values, region="bug"):
    return [{"policy": policy, "prompt": f"p{i}", "region": region, "ground_truth": v, "reward": v / 4, "std": 0.1,
             "rater_spread": 0.0, "kl": 0.0} for i, v in enumerate(values)]


def test_region_gains_and_the_sharpening_verdict():
    samples = records("sharpened", [0.0, 0.0, 1.0, 0.0]) + records("trained", [4.0, 4.0, 4.0, 3.0])
    gains = policy_comparison.region_gains(samples, "sharpened", "trained")
    assert gains["bug"]["num_prompts"] == 4
    assert gains["bug"]["ground_truth"]["gain"] == pytest.approx(3.5)
    result = {"temperature": 0.5, "chosen_on": "4 validation prompts",
              **policy_comparison.paired_gains(samples, "sharpened", "trained")}
    assert policy_comparison.sharpening_verdict(result).startswith("the trained policy BEATS")
    worse = records("sharpened", [4.0, 4.0, 4.0, 3.0]) + records("trained", [0.0, 0.0, 1.0, 0.0])
    result.update(policy_comparison.paired_gains(worse, "sharpened", "trained"))
    assert "LOSES TO" in policy_comparison.sharpening_verdict(result)


def test_panel_metrics_on_hand_made_predictions():
    sharp, flat = [0.0] * 9 + [8.0], [0.0] * 10  # a confident correct answer, a spread-out one
    pairs = {"region": ["careful", "taste"], "truth_chosen": [4.0, 2.5], "truth_rejected": [0.0, 2.0],
             "ratings_chosen": [[4, 4, 4, 4, 4], [4, 1, 4, 1, 4]], "ratings_rejected": [[0] * 5, [2] * 5]}
    predictions = {"logits_chosen": torch.tensor([sharp, flat]), "logits_rejected": torch.tensor([sharp[::-1], sharp]),
                   "target_chosen": torch.tensor([1.0, 0.7]), "target_rejected": torch.tensor([0.0, 0.5])}
    metrics = rm_metrics.panel_metrics(predictions, pairs)
    assert metrics["by_region"]["careful"]["ground_truth_accuracy"] == 1.0
    assert metrics["by_region"]["taste"]["ground_truth_accuracy"] == 0.0  # E(flat) = 0.5 < E(sharp at 1)
    assert metrics["by_region"]["taste"]["std_ratio_to_careful_correct"] > 2
    assert metrics["by_region"]["taste"]["num_disputed_answers"] == 1  # "7", rated 4 1 4 1 4
    assert metrics["by_region"]["taste"]["disputed_std_ratio_to_careful_correct"] > 2
    assert metrics["by_region"]["careful"]["disputed_std_ratio_to_careful_correct"] is None
    assert metrics["std_spread_spearman"] > 0.5


def fake_run(root, gain, bug_gain, careful=3.7):
    """A pipeline run directory with the eval.json fields the acceptance table reads."""
    region = {"careful": {"mean": careful}, "bug": {"mean": 0.2}}
    panel = {"std_spread_spearman": 0.6, "by_region": {
        "bug": {"ground_truth_accuracy": 0.95},
        "superficial": {"std_ratio_to_careful_correct": 1.2, "disputed_std_ratio_to_careful_correct": 2.5},
        "taste": {"std_ratio_to_careful_correct": 1.1, "disputed_std_ratio_to_careful_correct": 1.5}}}
    rl = {"trained": {"kl_to_ref": 0.5}, "comparison": {"ground_truth": {"gain": gain + 0.3}},
          "sharpened_sft": {"temperature": 0.5, "ground_truth": {"gain": gain},
                            "by_region": {"bug": {"ground_truth": {"gain": bug_gain}}},
                            "trained_sharpened": {"temperature": 0.0, "ground_truth": {"gain": gain - 0.2},
                                                  "by_region": {"bug": {"ground_truth": {"gain": bug_gain},
                                                                        "num_prompts": 30},
                                                                "superficial": {"ground_truth": {"gain": -gain},
                                                                                "num_prompts": 64}}}}}
    for stage, report in (("sft", {"by_region": region}), ("rm", {"panel": panel}), ("rl", rl)):
        (root / stage).mkdir(parents=True)
        (root / stage / "eval.json").write_text(json.dumps(report))
    samples = [{"policy": "sft", "region": "superficial", "ground_truth": truth, "reward": reward, "std": std,
                "rater_spread": spread} for truth, reward, std, spread in ((4.0, 0.8, 0.2, 0.0), (1.0, 0.6, 0.4, 1.2),
                                                                         (1.5, 0.7, 0.3, 1.0))]
    samples.append({**samples[0], "region": "bug"})  # another region: left out
    (root / "rl" / "eval_samples.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return str(root)


def test_the_acceptance_table_over_seeds(tmp_path, capsys):
    from distreward import testbed_report

    runs = [fake_run(tmp_path / f"seed{s}", gain, bug) for s, (gain, bug) in enumerate([(0.2, 1.0), (0.3, 0.9),
                                                                                        (0.25, 0.7)])]
    rows = {row["criterion"]: row for row in testbed_report.acceptance(list(map(testbed_report.read_run, runs)))}
    beat = rows["ground truth: sharpened trained - best sharpened SFT"]
    assert beat["values"] == pytest.approx([0.0, 0.1, 0.05]) and beat["mean"] == pytest.approx(0.05)
    half = 4.302653 * 0.05 / 3 ** 0.5  # t(0.975, 2) x sd / sqrt(n)
    assert beat["ci95"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-5) and beat["met"] == "no"
    assert rows["ground truth, bug region: sharpened trained - best sharpened SFT"]["met"] == "yes"  # mean 0.867
    assert rows["ground truth: trained (T = 1) - best sharpened SFT"]["met"] == ""  # reported, no target
    runs = [fake_run(tmp_path / f"good{s}", gain, 1.0) for s, gain in enumerate([0.4, 0.5, 0.45])]
    assert {row["criterion"]: row for row in testbed_report.acceptance(list(map(testbed_report.read_run, runs)))}[
        "ground truth: sharpened trained - best sharpened SFT"]["met"] == "yes"  # mean 0.25, interval above 0
    assert rows["RM std, disputed taste answers / careful-correct"]["met"] == "no"
    assert rows["RM std, disputed superficial answers / careful-correct"]["met"] == "yes"
    assert rows["SFT greedy ground truth, bug region"]["met"] == "yes"
    assert testbed_report.main(runs) == 0 and "| criterion |" in capsys.readouterr().out
    assert testbed_report.main([str(tmp_path / "missing")]) == 2
    regions = {row["region"]: row for row in testbed_report.region_rows(list(map(testbed_report.read_run, runs)))}
    assert regions["superficial"]["values"] == [-0.4, -0.5, -0.45] and regions["bug"]["num_prompts"] == [30] * 3
    assert regions["superficial"]["ci95"] == pytest.approx([-0.45 - half, -0.45 + half], abs=1e-5)
    answers = {(row["policy"], row["answers"]): row for row in testbed_report.answer_rows(runs, "superficial")}
    assert answers["sft", "right"]["num"] == 3 and answers["sft", "wrong"]["num"] == 6  # pooled over 3 runs
    assert answers["sft", "wrong"]["reward"] == pytest.approx(0.65)
    assert answers["sft", "wrong"]["std"] == pytest.approx(0.35)
    assert answers["sft", "wrong"]["rater_spread"] == pytest.approx(1.1)
    assert testbed_report.main([*runs, "--answers", "superficial"]) == 0
    assert "| sft | wrong | 6 | 0.650 | 0.350 | 1.10 |" in capsys.readouterr().out
    assert testbed_report.main([*runs, "--answers", "taste"]) == 2  # no answer there


def test_the_overoptimisation_table(tmp_path, capsys):
    from distreward import testbed_report

    def gain(value):
        return {"gain": value, "ci95": [value - 0.1, value + 0.1], "trained": 1.5}

    runs = []
    for seed, (reward, truth) in enumerate([(0.1, -0.3), (0.05, 0.2), (-0.01, -0.2)]):
        (tmp_path / f"a{seed}").mkdir()
        (tmp_path / f"a{seed}" / "eval.json").write_text(json.dumps({"comparison": {"by_region": {
            "superficial": {"reward": gain(reward), "ground_truth": gain(truth), "kl": gain(0.0)}}}}))
        runs.append(str(tmp_path / f"a{seed}"))
    rows = testbed_report.overoptimisation(runs, "superficial")
    assert [row["over_optimised"] for row in rows] == [True, False, False]
    assert testbed_report.main([*runs, "--overoptimisation", "superficial"]) == 0
    assert "1 of 3 runs over-optimised in superficial." in capsys.readouterr().out
    assert testbed_report.main([*runs, "--overoptimisation", "taste"]) == 2  # no such region in these runs


def test_split_composition_counts_distinct_problems(monkeypatch):
    taste = list(testbed.all_problems("taste"))
    assert len(taste) == len(set(taste)) == (len(testbed.CONSONANTS) * len(testbed.VOWELS)) ** 2
    assert sum(1 for _ in testbed.all_problems("count")) == 3 * sum(3 ** n for n in range(3, 9))
    monkeypatch.setattr(testbed, "FAMILIES", ("taste",))  # the whole space of the others takes ~30 s
    composition = {split: testbed.split_composition(split)["taste"]["taste"] for split in SPLITS}
    assert sum(composition.values()) == len(taste) and composition["test"] >= 64
    assert composition["test"] == sum(prompt_split(testbed.problem_key(p)) == "test" for p in taste)


def test_the_tiny_tokenizer_has_one_token_per_phrasing_word_and_keeps_names_digits_and_letters_as_characters():
    """Word tokens shorten task v2's prompts (distreward.tiny.SPACED_WORDS / SENTENCE_WORDS) without changing what
    they encode: every prompt decodes back to itself; names, digits and a count string's letters stay characters."""
    tokenizer = build_tiny_tokenizer()
    for prompt in testbed.make_prompts(200, seed=0):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == prompt
        assert len(ids) < len(prompt)  # every phrasing has a word token
    tokens = tokenizer.convert_ids_to_tokens(
        tokenizer("Mira has 7 apples, gets 5 more. How many a in: abca?", add_special_tokens=False)["input_ids"])
    assert tokens == ["M", "i", "r", "a", " has", " ", "7", " apples", ",", " gets", " ", "5", " more", ".", " How",
                      " many", " ", "a", " in", ":", " ", "a", "b", "c", "a", "?"]
