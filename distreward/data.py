"""Preference data in the ``esfrankel17/HelpSteer2_binarized`` schema, tokenised for training (docs/math.md §2).

Accepted rows: ``prompt`` (a string, or a list of chat messages), ``chosen`` / ``rejected`` (either
a list of ``{role, content}`` messages whose last turn is the assistant's answer, or the answer as a
plain string) and two scores, named ``score_chosen`` / ``score_rejected`` or ``chosen_rating`` /
``rejected_rating``. The source is ``"embedded"`` (the generated task of
:mod:`distreward.synthetic`), a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a hub id.
Scores map to ``mu = (s - score_min) / (score_max - score_min)`` in [0, 1]; a score outside the
range is an error, not a silent clip. Rows that keep each rater's ratings (``ratings_chosen`` /
``ratings_rejected``, as the embedded task ``v2`` does) can train on panel labels
(:mod:`distreward.labels`). The embedded source is one of :data:`EMBEDDED_TASKS` (``--task``). Every
source is split by prompt (task v2: by problem) into train / validation / test (:mod:`distreward.splits`):
SFT and the reward model train on ``train`` only.
"""
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
from datasets import Dataset, DatasetDict, load_dataset

from distreward import labels, synthetic, testbed
from distreward.defaults import NUM_BINS, SIGMA
from distreward.splits import SPLITS, check_split, prompt_split

EMBEDDED = "embedded"
SCORE_KEYS = (("score_chosen", "score_rejected"), ("chosen_rating", "rejected_rating"))
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100
HELD_OUT_SPLITS = ("test", "validation")  # where evaluation prompts may come from
# carried through tokenisation for evaluation
KEPT_COLUMNS = ("kind", "region", "truth_chosen", "truth_rejected", "ratings_chosen", "ratings_rejected")
# --task: the embedded tasks (v2, the default: demonstrations, a rater panel and regions; v1: the first task)
EMBEDDED_TASKS = {"v2": testbed, "v1": synthetic}


def embedded_task(name: str):
    """The module of embedded task ``name`` (:data:`EMBEDDED_TASKS`): make_prompts, make_preference_dataset,
    score_response, prompt_region and, where the task has a demonstrator, make_demonstrations."""
    if name not in EMBEDDED_TASKS:
        raise ValueError(f"--task must be one of {', '.join(EMBEDDED_TASKS)}, got {name!r}")
    return EMBEDDED_TASKS[name]


def local_path_or_hub_id(name: str, what: str, required_file: Optional[str] = None, repo_type: str = "model") -> str:
    """``name`` as given (a hub id, or an existing path with ``~`` expanded), or ValueError ``"{what} {name} does
    not exist"`` when it looks like a local path: it starts with ``/``, ``.`` or ``~``, has a path separator
    beyond the hub's one ``org/name`` slash, or lies in an existing directory. Such a typo never goes to the network.
    An existing directory must hold ``required_file`` when it is given. A hub id (of ``repo_type``: model or
    dataset) is looked up once (:func:`check_hub_id`), so a name that is neither fails at once.
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path) and required_file and not os.path.isfile(os.path.join(path, required_file)):
        raise ValueError(f"{what} {name} has no {required_file}")
    if os.path.exists(path):
        return path
    parent = os.path.dirname(path)
    beyond_org_name = os.sep in name.replace("/", "", 1)  # posix: a second "/"; Windows: any "\\"
    if name.startswith(("/", ".", "~")) or beyond_org_name or (parent and os.path.isdir(parent)):
        raise ValueError(f"{what} {name} does not exist")
    check_hub_id(name, what, repo_type)
    return name


def check_hub_id(name: str, what: str, repo_type: str = "model") -> None:
    """ValueError naming both readings of ``name`` (a local path that does not exist, a hub id that cannot be had)
    unless the hub id is in the local cache or the hub answers one look-up for it: one probe, where the loaders
    would retry five times (~40 s) before failing offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{name.replace('/', '--')}")):
        return
    readings = f"{what} {name} is no local path, and the hub {repo_type} {name}"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{readings} is not in the local cache (HF_HUB_OFFLINE is set)")
    try:
        HfApi().repo_info(name, repo_type=repo_type, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(f"{readings} does not exist (or is private: log in with `hf auth login`)") from None
    except HfHubHTTPError:
        return  # the hub answered (a gated repository, say): the loader says what it needs
    except Exception as error:  # the transport's errors (DNS, refused, timeout) have no common base but Exception
        raise ValueError(f"{readings} cannot be looked up: the hub is unreachable ({error})") from None


def load_raw_preferences(name_or_path: str, hub_split: str = "train", num_pairs: int = 4000, seed: int = 0,
                         split: str = "train", task: str = "v2") -> Dataset:
    """The untokenised rows of one prompt ``split`` (:data:`~distreward.splits.SPLITS`): the embedded
    ``task`` (``num_pairs`` pairs on that split's prompts, by ``seed``), or the rows of a local file or of
    the hub split ``hub_split`` whose prompt falls in ``split`` (:func:`~distreward.splits.prompt_split`)."""
    check_split(split)
    if name_or_path == EMBEDDED:
        return embedded_task(task).make_preference_dataset(num_pairs, seed, split=split)
    extension = os.path.splitext(name_or_path)[1].lower()
    if extension in LOCAL_FORMATS and not os.path.isfile(os.path.expanduser(name_or_path)):
        raise ValueError(f"data file {name_or_path} does not exist")
    path = local_path_or_hub_id(name_or_path, "data file", repo_type="dataset")
    if os.path.isfile(path):
        if extension not in LOCAL_FORMATS:
            raise ValueError(f"{name_or_path}: a local data file must be .jsonl, .json or .parquet")
        if extension == ".jsonl":
            check_json_lines(path)
        raw = load_dataset(LOCAL_FORMATS[extension], data_files=path, split="train")
        if len(raw) == 0:
            raise ValueError(f"data file {name_or_path} has no rows")
    else:
        raw = load_dataset(path, split=hub_split)
    if "prompt" not in raw.column_names:
        raise ValueError(f"{name_or_path} has no 'prompt' column; found {', '.join(raw.column_names)}")
    return raw.filter(lambda row: prompt_split(row["prompt"]) == split)


def check_json_lines(path: str) -> None:
    """ValueError naming the file, line and column of the first line of a ``.jsonl`` file that is not one JSON
    object, or saying that the file has no rows (datasets would raise a bare StopIteration or a message without
    either)."""
    rows = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}, column {error.colno}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}")
            rows += 1
    if rows == 0:
        raise ValueError(f"data file {path} has no rows")


def score_columns(column_names) -> tuple:
    """The (chosen, rejected) score column names present, or ValueError naming what is missing."""
    missing = [name for name in ("prompt", "chosen", "rejected") if name not in column_names]
    keys = next((pair for pair in SCORE_KEYS if set(pair) <= set(column_names)), None)
    if missing or keys is None:
        wanted = missing + ([] if keys else ["score_chosen/score_rejected (or chosen_rating/rejected_rating)"])
        raise ValueError(f"preference data lacks column(s) {', '.join(wanted)}; found {', '.join(column_names)}")
    return keys


def check_score_range(dataset: Dataset, keys: tuple, score_min: float, score_max: float) -> None:
    """ValueError when a score is missing or lies outside [score_min, score_max]."""
    if not score_min < score_max:
        raise ValueError(f"score_min must be below score_max, got {score_min} and {score_max}")
    for key in keys:
        scores = torch.tensor([float("nan") if s is None else s for s in dataset[key]], dtype=torch.float64)
        if bool(scores.isnan().any()):
            raise ValueError(f"column {key} has missing scores")
        low, high = scores.min().item(), scores.max().item()
        if low < score_min or high > score_max:
            raise ValueError(f"column {key} has scores in [{low:g}, {high:g}], outside the range "
                             f"[{score_min:g}, {score_max:g}]: set --score_min / --score_max to the data's range")


def to_messages(prompt, answer) -> list:
    """One side of a pair as chat messages ``[..., {"role": "assistant", "content": answer}]``."""
    if isinstance(answer, list):
        if not answer or answer[-1].get("role") != "assistant":
            raise ValueError("a chosen/rejected message list must end with the assistant's answer")
        return answer
    history = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return history + [{"role": "assistant", "content": answer}]


def render(tokenizer, messages: list) -> tuple:
    """(prompt text ready for generation, answer text) with the tokenizer's chat template, if it has one."""
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt_text, full_text[len(prompt_text):]
    prompt_text = "\n".join(message["content"] for message in messages[:-1]) + "\n"
    return prompt_text, messages[-1]["content"] + (tokenizer.eos_token or "")


def encode(tokenizer, messages: list) -> tuple:
    """(prompt ids, answer ids) of a conversation, without extra special tokens."""
    prompt_text, answer_text = render(tokenizer, messages)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return prompt_ids, tokenizer(answer_text, add_special_tokens=False)["input_ids"]


MIN_HELD_OUT_PAIRS = 2  # fewer validation or test pairs have no accuracy spread, no bootstrap interval


def held_out_pairs(num_pairs: int, eval_fraction: float) -> int:
    """Pairs the embedded task generates for validation, and again for test: ``eval_fraction`` of ``num_pairs``
    (ValueError below :data:`MIN_HELD_OUT_PAIRS`, too few to evaluate)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"--eval_fraction must lie in (0, 1), got {eval_fraction}")
    held_out = round(eval_fraction * num_pairs)
    if held_out < MIN_HELD_OUT_PAIRS:
        raise ValueError(f"--num_pairs {num_pairs} with --eval_fraction {eval_fraction} leaves {held_out} validation "
                         f"and {held_out} test pairs, too few to evaluate (at least {MIN_HELD_OUT_PAIRS} each): raise "
                         f"--num_pairs or --eval_fraction")
    return held_out


def load_preference_data(tokenizer, name_or_path: str = EMBEDDED, hub_split: str = "train", num_pairs: int = 4000,
                         score_min: float = 0.0, score_max: float = 4.0, eval_fraction: float = 0.1,
                         max_length: int = 256, seed: int = 0, task: str = "v2", label_kind: str = "gaussian",
                         sigma: float = SIGMA, num_bins: int = NUM_BINS) -> DatasetDict:
    """Tokenised ``train`` / ``validation`` / ``test`` pairs for the reward model, split by prompt.

    Each row holds ``input_ids_chosen`` / ``input_ids_rejected`` (chat-templated prompt + answer),
    ``target_chosen`` / ``target_rejected`` (scores mapped to [0, 1]) and, for the embedded task,
    ``kind`` and the ground truth ``truth_chosen`` / ``truth_rejected`` (evaluation only), and the panel
    labels of ``label_kind`` (:func:`tokenize_pairs`). The embedded task makes ``num_pairs`` training pairs
    and ``eval_fraction * num_pairs`` pairs for each
    held-out split; other data keep their rows. Pairs longer than ``max_length`` tokens are dropped.
    """
    held_out = held_out_pairs(num_pairs, eval_fraction)
    data = {}
    for split in SPLITS:
        raw = load_raw_preferences(name_or_path, hub_split, num_pairs if split == "train" else held_out, seed, split,
                                   task)
        data[split] = tokenize_pairs(tokenizer, raw, score_min, score_max, max_length, label_kind, sigma, num_bins)
        if len(data[split]) == 0:
            raise ValueError(f"no {split} pair fits in max_length={max_length} tokens (the data have "
                             f"{len(raw)} {split} pairs, split by prompt)")
    return DatasetDict(data)


def tokenize_pairs(tokenizer, raw: Dataset, score_min: float, score_max: float, max_length: int,
                   label_kind: str = "gaussian", sigma: float = SIGMA, num_bins: int = NUM_BINS) -> Dataset:
    """:func:`load_preference_data`'s rows from untokenised pairs (scores checked against the range). A panel
    ``label_kind`` (:mod:`distreward.labels`; ``auto`` resolves to one where the rows keep ratings) adds
    ``sigma_chosen`` / ``sigma_rejected`` (``gaussian_spread``) or ``q_chosen`` / ``q_rejected`` [K]
    (``mixture``) from the ``ratings_*`` columns, which it requires."""
    keys = score_columns(raw.column_names)
    label_kind = labels.resolve_label_kind(label_kind, "ratings_chosen" in raw.column_names)
    if len(raw):
        check_score_range(raw, keys, score_min, score_max)
    span = score_max - score_min

    def tokenize(row):
        encoded = {}
        for side, score_key in zip(("chosen", "rejected"), keys):
            prompt_ids, answer_ids = encode(tokenizer, to_messages(row["prompt"], row[side]))
            encoded[f"input_ids_{side}"] = prompt_ids + answer_ids
            encoded[f"target_{side}"] = (row[score_key] - score_min) / span
            if label_kind == "gaussian_spread":
                encoded[f"sigma_{side}"] = labels.spread_sigma(row[f"ratings_{side}"], sigma, score_min, score_max)
            elif label_kind == "mixture":
                encoded[f"q_{side}"] = labels.mixture_label(row[f"ratings_{side}"], sigma, score_min, score_max,
                                                            num_bins)
        return encoded

    kept = [name for name in KEPT_COLUMNS if name in raw.column_names]
    tokenized = raw.map(tokenize, remove_columns=[c for c in raw.column_names if c not in kept])
    return tokenized.filter(lambda row: max(len(row["input_ids_chosen"]), len(row["input_ids_rejected"]))
                            <= max_length)


def load_sft_data(tokenizer, name_or_path: str = EMBEDDED, hub_split: str = "train", num_pairs: int = 4000,
                  max_length: int = 256, seed: int = 0, task: str = "v2") -> Dataset:
    """The SFT conversations of the ``train`` prompts, tokenised: ``input_ids`` and ``labels`` (prompt tokens
    -100). An embedded task with a demonstrator (``v2``) gives ``num_pairs`` demonstrations, separate from
    the preference pairs (as InstructGPT); other data give the chosen sides of the reward model's training pairs."""
    source = embedded_task(task) if name_or_path == EMBEDDED else None
    if hasattr(source, "make_demonstrations"):
        raw = source.make_demonstrations(num_pairs, seed, "train")
    else:
        raw = load_raw_preferences(name_or_path, hub_split, num_pairs, seed, "train", task)
        score_columns(raw.column_names)

    def tokenize(row):
        prompt_ids, answer_ids = encode(tokenizer, to_messages(row["prompt"], row["chosen"]))
        return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}

    tokenized = raw.map(tokenize, remove_columns=raw.column_names)
    tokenized = tokenized.filter(lambda row: len(row["input_ids"]) <= max_length)
    if len(tokenized) == 0:
        raise ValueError(f"no conversation fits in max_length={max_length} tokens")
    return tokenized


def pad(sequences: list, value: int, length: Optional[int] = None) -> torch.Tensor:
    """Right-pad lists of ids to ``length`` (default: the longest) -> int64 [len(sequences), length]."""
    length = length or max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def attention_mask_for(sequences: list, length: int) -> torch.Tensor:
    """1 on real tokens, 0 on padding -> int64 [len(sequences), length]."""
    return pad([[1] * len(sequence) for sequence in sequences], 0, length)


def padded_batch(sequences: list, pad_token_id: int) -> tuple:
    """(input_ids, attention_mask), both int64 [len(sequences), longest], of lists of ids right-padded with
    ``pad_token_id``."""
    length = max(len(sequence) for sequence in sequences)
    return pad(sequences, pad_token_id, length), attention_mask_for(sequences, length)


def conversation_ids(tokenizer, messages: list) -> list:
    """The ids a reward model reads for a conversation ending with the assistant's answer (:func:`to_messages`):
    the prompt's and the answer's ids back to back (:func:`encode`), as the RL stage, the TRL reward functions and
    the reward server all build them."""
    prompt_ids, answer_ids = encode(tokenizer, messages)
    return prompt_ids + answer_ids


@dataclass
class PreferenceCollator:
    """Pads a list of tokenised pairs to one length (both sides alike, so they can share a forward).

    Returns ``input_ids_chosen`` / ``input_ids_rejected`` and their ``attention_mask_*`` [B, T] int64,
    ``target_chosen`` / ``target_rejected`` [B] fp32 and, where the rows have panel labels, ``sigma_*`` [B]
    or ``q_*`` [B, K] fp32.
    """

    pad_token_id: int

    def __call__(self, rows: list) -> dict:
        chosen = [row["input_ids_chosen"] for row in rows]
        rejected = [row["input_ids_rejected"] for row in rows]
        length = max(len(sequence) for sequence in chosen + rejected)
        batch = {}
        for side, sequences in (("chosen", chosen), ("rejected", rejected)):
            batch[f"input_ids_{side}"] = pad(sequences, self.pad_token_id, length)
            batch[f"attention_mask_{side}"] = attention_mask_for(sequences, length)
            for label in ("target", "sigma", "q"):
                if f"{label}_{side}" in rows[0]:
                    batch[f"{label}_{side}"] = torch.tensor([row[f"{label}_{side}"] for row in rows],
                                                            dtype=torch.float32)
        return batch


@dataclass
class CompletionCollator:
    """Pads SFT rows: ``input_ids`` / ``attention_mask`` / ``labels`` [B, T] int64 (labels padded with -100)."""

    pad_token_id: int

    def __call__(self, rows: list) -> dict:
        ids = [row["input_ids"] for row in rows]
        length = max(len(sequence) for sequence in ids)
        return {"input_ids": pad(ids, self.pad_token_id, length), "attention_mask": attention_mask_for(ids, length),
                "labels": pad([row["labels"] for row in rows], IGNORE_INDEX, length)}


def unique_prompts(raw, seed: int) -> list:
    """The distinct ``prompt`` values of a data set, shuffled by ``seed``."""
    unique = list({json.dumps(prompt): prompt for prompt in raw["prompt"]}.values())
    random.Random(seed).shuffle(unique)
    return unique


def load_prompts(config):
    """(train prompts, evaluation prompts, ground-truth scorer or None), split by prompt, for the settings of
    ``config`` (a :class:`~distreward.rl_trainer.ReinforceConfig`).

    Training prompts come from the ``train`` split; the evaluation prompts are
    ``num_eval_prompts`` distinct prompts of ``config.eval_split`` (``test`` for reports,
    ``validation`` for tuning), so no evaluation prompt was seen by SFT, the RM or REINFORCE.
    """
    if config.dataset_name == EMBEDDED:
        task = embedded_task(config.task)
        train = task.make_prompts(config.num_train_prompts, seed=config.seed, split="train")
        held_out = task.make_prompts(config.num_eval_prompts, seed=config.seed, split=config.eval_split, unique=True)
        return train, held_out, task.score_response
    train = unique_prompts(load_raw_preferences(config.dataset_name, config.dataset_split, split="train"),
                           config.seed)[:config.num_train_prompts]
    held_out = unique_prompts(load_raw_preferences(config.dataset_name, config.dataset_split,
                                                   split=config.eval_split), config.seed)[:config.num_eval_prompts]
    if not train or not held_out:
        raise ValueError(f"{config.dataset_name} has {len(train)} train and {len(held_out)} {config.eval_split} "
                         f"prompts (split by prompt): it needs at least one of each")
    return train, held_out, None
