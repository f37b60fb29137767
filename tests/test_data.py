"""The embedded task, the tiny tokenizer and preference-data loading in the HelpSteer2_binarized schema."""
import json

import pytest
import torch
from datasets import Dataset

from distreward import synthetic
from distreward.data import (IGNORE_INDEX, CompletionCollator, PreferenceCollator, load_preference_data,
                             load_sft_data)
from distreward.splits import SPLITS, prompt_split
from distreward.tiny import build_tiny_tokenizer

# "What is i + 1?" for these i falls in train, validation, test, train, ... (prompt_split, checked below)
SPREAD = (0, 7, 15, 1, 45, 22)


def helpsteer_rows(messages: bool, score_keys=("chosen_rating", "rejected_rating"),
                   scores=((3.4, 1.2), (2.0, 0.6), (2.2, 0.4))):
    """Rows as HelpSteer2_binarized stores them (message lists) or with plain-string answers; the
    prompts cycle through the train, validation and test splits."""
    rows = []
    for index, (good, bad) in enumerate(scores):
        number = SPREAD[index % len(SPREAD)]
        prompt = f"What is {number} + 1?"
        chosen, rejected = str(number + 1), "maybe"
        if messages:
            chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
            rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     score_keys[0]: good, score_keys[1]: bad})
    return rows


def all_splits(data, column: str) -> list:
    return [value for split in SPLITS for value in data[split][column]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- the embedded task ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, response, expected", [
    ("What is 3 + 5?", "8", 4.0),
    ("What is 3 + 5?", " 10 ", 2.0),   # off by two: two points lost
    ("What is 3 + 5?", "20", 0.0),     # far off: no credit, never negative
    ("What is 3 + 5?", "eight", 0.0),  # off-format
    ("Sort: 3 1 2", "1 2 3", 4.0),
    ("Sort: 3 1 2", "1 3 2", 4.0 / 3),  # one position of three right
    ("Sort: 3 1 2", "1 2", 8.0 / 3),    # two right, one missing
    ("How many a in: abaca?", "3", 4.0),
    ("How many a in: abaca?", "2", 3.0),
    ("Pick a lucky digit.", "7", 2.0),
    ("Pick a lucky digit.", "seven", 0.0),
])
def test_score_response_gives_partial_credit(prompt, response, expected):
    assert synthetic.score_response(prompt, response) == pytest.approx(expected)


def test_score_response_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a prompt"):
        synthetic.score_response("Tell me a joke.", "no")


def test_preference_dataset_is_deterministic_and_in_schema():
    first = synthetic.make_preference_dataset(300, seed=3)
    assert first.to_list() == synthetic.make_preference_dataset(300, seed=3).to_list()
    assert first.to_list() != synthetic.make_preference_dataset(300, seed=4).to_list()
    scores = torch.tensor([first["score_chosen"], first["score_rejected"]])
    assert (scores[0] > scores[1]).all() and scores.min() >= 0 and scores.max() <= 4
    steps = scores * 5  # means of five integer ratings: multiples of 0.2
    torch.testing.assert_close(steps, steps.round())
    row = first[0]
    assert [m["role"] for m in row["chosen"]] == ["user", "assistant"] and row["chosen"][0]["content"] == row["prompt"]
    assert set(first["kind"]) == set(synthetic.PROMPT_KINDS)


def test_ambiguous_labels_are_noisier_than_clear_ones():
    data = synthetic.make_preference_dataset(1500, seed=0)
    agree = {}
    for row in data:
        better = (synthetic.score_response(row["prompt"], row["chosen"][1]["content"])
                  > synthetic.score_response(row["prompt"], row["rejected"][1]["content"]))
        agree.setdefault(row["kind"], []).append(float(better))
    share = {kind: sum(values) / len(values) for kind, values in agree.items()}
    assert share["ambiguous"] < 0.6 < 0.85 < min(share[kind] for kind in ("add", "sort", "count"))


def test_make_prompts_are_scorable_and_seeded():
    prompts = synthetic.make_prompts(50, seed=1)
    assert prompts == synthetic.make_prompts(50, seed=1)
    assert all(synthetic.prompt_kind(prompt) in synthetic.PROMPT_KINDS for prompt in prompts)


def test_spread_prompts_cover_every_split():
    assert [prompt_split(f"What is {number} + 1?") for number in SPREAD] == list(SPLITS) * 2


@pytest.mark.parametrize("split", SPLITS)
def test_prompts_stay_in_their_split_and_unique_means_distinct(split):
    prompts = synthetic.make_prompts(300, seed=2, split=split)
    assert {prompt_split(prompt) for prompt in prompts} == {split}
    assert {synthetic.prompt_kind(prompt) for prompt in prompts} == set(synthetic.PROMPT_KINDS)
    distinct = synthetic.make_prompts(300, seed=2, split=split, unique=True)
    assert len(set(distinct)) == 300


def test_ambiguous_prompts_are_split_too():
    """Every split has its own ambiguous prompts: none is shared."""
    by_split = {split: {p for p in synthetic.AMBIGUOUS_PROMPTS if prompt_split(p) == split} for split in SPLITS}
    assert all(by_split.values())
    assert sum(len(prompts) for prompts in by_split.values()) == len(synthetic.AMBIGUOUS_PROMPTS)


def test_embedded_splits_share_no_prompt_and_no_pair(tokenizer):
    """SFT / RM training pairs, validation and test pairs: disjoint prompts, hence no exact duplicate pair."""
    raw = {split: synthetic.make_preference_dataset(300, seed=0, split=split) for split in SPLITS}
    prompts = {split: set(data["prompt"]) for split, data in raw.items()}
    pairs = {split: {json.dumps([row["chosen"], row["rejected"]]) for row in data} for split, data in raw.items()}
    for first, second in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not prompts[first] & prompts[second]
        assert not pairs[first] & pairs[second]
    tokenized = load_preference_data(tokenizer, num_pairs=300, eval_fraction=0.1, seed=0)
    assert {split: len(tokenized[split]) for split in SPLITS} == {"train": 300, "validation": 30, "test": 30}
    sft_prompts = {tokenizer.decode(ids) for ids in load_sft_data(tokenizer, num_pairs=300)["input_ids"]}
    test_texts = {tokenizer.decode(ids) for ids in tokenized["test"]["input_ids_chosen"]}
    assert not sft_prompts & test_texts


# --- the tiny tokenizer ---------------------------------------------------------------------------------

def test_tiny_tokenizer_round_trips_and_pads_with_eos(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 3 1"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nSort: 3 1<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


# --- loading and normalisation --------------------------------------------------------------------------

def test_embedded_data_normalises_scores_and_holds_out_seeded_splits(tokenizer):
    data = load_preference_data(tokenizer, num_pairs=100, eval_fraction=0.2, seed=1, task="v1")
    assert [len(data[split]) for split in SPLITS] == [100, 20, 20]
    raw = synthetic.make_preference_dataset(100, seed=1)
    assert data["train"]["target_chosen"] == pytest.approx([score / 4 for score in raw["score_chosen"]])
    assert data["train"]["truth_chosen"] == raw["truth_chosen"]
    again = load_preference_data(tokenizer, num_pairs=100, eval_fraction=0.2, seed=1, task="v1")
    assert list(again["test"]["input_ids_chosen"]) == list(data["test"]["input_ids_chosen"])


@pytest.mark.parametrize("messages, score_keys, file_format", [
    (True, ("chosen_rating", "rejected_rating"), "jsonl"),
    (False, ("score_chosen", "score_rejected"), "jsonl"),
    (True, ("score_chosen", "score_rejected"), "parquet"),
])
def test_local_files_in_both_schema_forms_give_the_same_tokens(tmp_path, tokenizer, messages, score_keys,
                                                                file_format):
    rows = helpsteer_rows(messages, score_keys, scores=[(3.4, 1.2)] * 6 + [(2.0, 0.6)] * 6)
    path = str(tmp_path / f"pairs.{file_format}")
    if file_format == "jsonl":
        write_jsonl(tmp_path / "pairs.jsonl", rows)
    else:
        Dataset.from_list(rows).to_parquet(path)
    data = load_preference_data(tokenizer, path, seed=0)
    assert [len(data[split]) for split in SPLITS] == [4, 4, 4]  # two prompts a split, each in two pairs
    row = data["test"][0]
    prompt = tokenizer.decode(row["input_ids_chosen"])
    assert prompt.startswith("<|im_start|>user\nWhat is ") and prompt.endswith("<|im_end|>\n")
    assert prompt_split(prompt.split("\n")[1].split("<")[0]) == "test"
    assert tokenizer.decode(row["input_ids_rejected"]).endswith("assistant\nmaybe<|im_end|>\n")
    targets = sorted(all_splits(data, "target_chosen"))
    assert targets == pytest.approx([0.5] * 6 + [0.85] * 6)


def test_missing_columns_name_what_is_missing(tmp_path, tokenizer):
    rows = [{key: value for key, value in row.items() if key != "rejected_rating"} for row in helpsteer_rows(True)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError, match="lacks column.*score_chosen/score_rejected"):
        load_preference_data(tokenizer, path)


def test_scores_outside_the_range_are_an_error_not_a_clip(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", helpsteer_rows(True, scores=[(7.2, 1.0), (2.0, 0.6), (3.0, 0.6)]))
    with pytest.raises(ValueError, match=r"chosen_rating has scores in \[7.2, 7.2\], outside the range \[0, 4\]"):
        load_preference_data(tokenizer, path)
    data = load_preference_data(tokenizer, path, score_max=8.0)  # goodness_score-like range
    assert max(all_splits(data, "target_chosen")) == pytest.approx(0.9)


def test_missing_local_file_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_data(tokenizer, "no/such/pairs.jsonl")


def test_tokenizer_without_chat_template_joins_prompt_and_answer(tmp_path, tokenizer):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    path = write_jsonl(tmp_path / "pairs.jsonl", helpsteer_rows(False))
    data = load_preference_data(plain, path)
    texts = {plain.decode(ids) for ids in all_splits(data, "input_ids_chosen")}
    assert texts == {"What is 0 + 1?\n1<|im_end|>", "What is 7 + 1?\n8<|im_end|>", "What is 15 + 1?\n16<|im_end|>"}


def test_data_without_a_test_prompt_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", helpsteer_rows(True, scores=[(3.4, 1.2), (2.0, 0.6)]))
    with pytest.raises(ValueError, match="no test pair"):
        load_preference_data(tokenizer, path)


# --- collators ------------------------------------------------------------------------------------------

def test_preference_collator_pads_both_sides_to_one_length(tokenizer):
    rows = [{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [5], "target_chosen": 0.9, "target_rejected": 0.1},
            {"input_ids_chosen": [8], "input_ids_rejected": [8, 9], "target_chosen": 0.6, "target_rejected": 0.4}]
    batch = PreferenceCollator(pad_token_id=2)(rows)
    assert batch["input_ids_chosen"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["input_ids_rejected"].tolist() == [[5, 2, 2], [8, 9, 2]]
    assert batch["attention_mask_rejected"].tolist() == [[1, 0, 0], [1, 1, 0]]
    torch.testing.assert_close(batch["target_chosen"], torch.tensor([0.9, 0.6]))


def test_sft_labels_cover_only_the_answer(tokenizer):
    data = load_sft_data(tokenizer, num_pairs=20)
    batch = CompletionCollator(tokenizer.pad_token_id)(data.select(range(4)).to_list())
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        answer = ids[labels != IGNORE_INDEX]
        text = tokenizer.decode(answer)
        assert text.endswith("<|im_end|>\n") and "<|im_start|>" not in text
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        assert tokenizer.decode(ids[mask.bool()]).endswith("<|im_start|>assistant\n" + text)
