"""The embedded task: small prompts whose answers have a computable quality, scored 0-4 like HelpSteer2.

Four prompt kinds:

- ``add``: "What is 7 + 5?" -- an integer answer; credit falls by one point per unit of error.
- ``sort``: "Sort: 4 1 3" -- credit is 4 x the share of positions holding the right digit.
- ``count``: "How many a in: abca?" -- like ``add``.
- ``ambiguous``: "Pick a lucky digit." (64 phrasings) -- every single digit is as good as any other
  (quality 2, anything else 0), and annotators disagree strongly, so labels are noisy and
  uncertainty is real.

:func:`score_response` is the ground truth (a float in [0, 4]). :func:`make_preference_dataset`
builds pairs in the ``HelpSteer2_binarized`` schema: each answer's label is the mean of five noisy
annotator ratings on the 0-4 Likert scale (steps of 0.2, as ``average_rating_split``), the
``chosen`` answer is the one with the higher label. The ground truth never enters the labels other
than through those noisy ratings. Prompts and pairs are drawn from one split of
:mod:`distreward.splits` (by prompt), so train, validation and test share no prompt. Everything is
deterministic by seed.
"""
import random
import re

from datasets import Dataset

from distreward.splits import check_split, prompt_split

PROMPT_KINDS = ("add", "sort", "count", "ambiguous")
MAX_SCORE = 4.0
NUM_ANNOTATORS = 5
ANNOTATOR_NOISE = {"add": 0.4, "sort": 0.4, "count": 0.4, "ambiguous": 1.5}  # rating std per kind
AMBIGUOUS_PROMPTS = tuple(f"{verb} {thing}." for verb in ("Pick", "Choose", "Name", "Say", "Give me", "Think of",
                                                            "Tell me", "Write")
                          for thing in ("a lucky digit", "any digit", "your favourite digit", "a random digit",
                                        "one digit", "a digit you like", "a single digit", "some digit"))
LETTERS = "abc"

_ADD = re.compile(r"^What is (\d+) \+ (\d+)\?$")
_SORT = re.compile(r"^Sort: ([\d ]+)$")
_COUNT = re.compile(r"^How many ([a-z]) in: ([a-z]+)\?$")


def prompt_kind(prompt: str) -> str:
    """The kind (one of :data:`PROMPT_KINDS`) of a prompt made here; ValueError for any other text."""
    for kind, pattern in (("add", _ADD), ("sort", _SORT), ("count", _COUNT)):
        if pattern.match(prompt):
            return kind
    if prompt in AMBIGUOUS_PROMPTS:
        return "ambiguous"
    raise ValueError(f"not a prompt of the embedded task: {prompt!r}")


def prompt_region(prompt: str) -> str:
    """The prompt's group: "ambiguous" or "clear" (add, sort, count)."""
    return "ambiguous" if prompt_kind(prompt) == "ambiguous" else "clear"


def _reference_answer(prompt: str) -> str:
    """The best answer to a non-ambiguous prompt."""
    if match := _ADD.match(prompt):
        return str(int(match[1]) + int(match[2]))
    if match := _SORT.match(prompt):
        return " ".join(sorted(match[1].split()))
    match = _COUNT.match(prompt)
    return str(match[2].count(match[1]))


def score_response(prompt: str, response: str) -> float:
    """Ground-truth quality of ``response`` to ``prompt`` in [0, 4], with partial credit.

    ``add`` / ``count``: ``max(0, 4 - |answer - truth|)`` for an integer answer, else 0.
    ``sort``: 4 x the share of positions holding the right digit (a wrong length costs the rest).
    ``ambiguous``: 2 for any single digit, else 0.
    """
    kind = prompt_kind(prompt)
    answer = response.strip()
    if kind == "ambiguous":
        return 2.0 if re.fullmatch(r"\d", answer) else 0.0
    truth = _reference_answer(prompt)
    if kind == "sort":
        expected, given = truth.split(), answer.split()
        hits = sum(a == b for a, b in zip(expected, given))
        return MAX_SCORE * hits / max(len(expected), len(given))
    if not re.fullmatch(r"-?\d+", answer):
        return 0.0
    return max(0.0, MAX_SCORE - abs(int(answer) - int(truth)))


def _draw_prompt(rng: random.Random, ambiguous_share: float) -> str:
    if rng.random() < ambiguous_share:
        return rng.choice(AMBIGUOUS_PROMPTS)
    kind = rng.choice(PROMPT_KINDS[:-1])
    if kind == "add":
        return f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)}?"
    if kind == "sort":
        return "Sort: " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    return f"How many {rng.choice(LETTERS)} in: {text}?"


def _make_prompt(rng: random.Random, ambiguous_share: float, split: str) -> str:
    """A prompt of ``split``: draws until one falls in it (the kinds keep their shares within a split)."""
    ambiguous = rng.random() < ambiguous_share
    while True:
        prompt = _draw_prompt(rng, 1.0 if ambiguous else 0.0)
        if prompt_split(prompt) == split:
            return prompt


def _split_rng(seed: int, split: str) -> random.Random:
    """A random stream per (seed, split): the splits' draws do not depend on one another."""
    return random.Random(f"{seed}/{split}")


def make_prompts(num: int, seed: int = 0, ambiguous_share: float = 0.2, split: str = "train",
                 unique: bool = False) -> list:
    """``num`` user prompts of the embedded task from ``split``, ``ambiguous_share`` of them ambiguous
    (in expectation); ``unique`` drops repeats (keeps drawing until ``num`` distinct prompts)."""
    check_split(split)
    rng, prompts, seen = _split_rng(seed, split), [], set()
    while len(prompts) < num:
        prompt = _make_prompt(rng, ambiguous_share, split)
        if not (unique and prompt in seen):
            prompts.append(prompt)
            seen.add(prompt)
    return prompts


def _candidate_response(rng: random.Random, prompt: str) -> str:
    """One answer of random quality: right, slightly off, far off, or off-format."""
    kind = prompt_kind(prompt)
    if kind == "ambiguous":
        return str(rng.randint(0, 9)) if rng.random() < 0.8 else rng.choice(["ten", "no", "12", "a digit"])
    truth = _reference_answer(prompt)
    style = rng.random()
    if style < 0.35:
        return truth
    if style < 0.9 and kind == "sort":
        digits = truth.split()
        for _ in range(rng.randint(1, 2)):  # a few swaps or a replaced digit
            i, j = rng.randrange(len(digits)), rng.randrange(len(digits))
            digits[i], digits[j] = digits[j], (str(rng.randint(0, 9)) if rng.random() < 0.3 else digits[i])
        if rng.random() < 0.2:
            digits = digits[:-1]
        return " ".join(digits)
    if style < 0.9:
        return str(max(0, int(truth) + rng.choice([-3, -2, -1, 1, 2, 3, 5, 8])))
    return rng.choice(["I don't know.", "maybe", "?", "yes"])


def annotate(rng: random.Random, kind: str, quality: float) -> float:
    """Mean of :data:`NUM_ANNOTATORS` noisy integer ratings in [0, 4] around ``quality`` (steps of 0.2)."""
    noise = ANNOTATOR_NOISE[kind]
    ratings = [min(MAX_SCORE, max(0.0, round(quality + rng.gauss(0.0, noise)))) for _ in range(NUM_ANNOTATORS)]
    return round(sum(ratings) / NUM_ANNOTATORS, 1)


def _chat(prompt: str, response: str) -> list:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def make_preference_dataset(num_pairs: int, seed: int = 0, ambiguous_share: float = 0.2,
                            split: str = "train") -> Dataset:
    """``num_pairs`` preference pairs on prompts of ``split``, in the ``HelpSteer2_binarized`` schema.

    Columns: ``prompt`` (str), ``chosen`` / ``rejected`` (``[user, assistant]`` chat messages),
    ``score_chosen`` / ``score_rejected`` (annotator means in [0, 4], chosen > rejected), ``kind``
    (the prompt kind, for per-kind evaluation) and ``truth_chosen`` / ``truth_rejected`` (the
    ground truth of each answer, for evaluation only: training never reads them).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    check_split(split)
    rng = _split_rng(seed, split)
    rows = []
    while len(rows) < num_pairs:
        prompt = _make_prompt(rng, ambiguous_share, split)
        kind = prompt_kind(prompt)
        first, second = _candidate_response(rng, prompt), _candidate_response(rng, prompt)
        truth_first, truth_second = score_response(prompt, first), score_response(prompt, second)
        score_first, score_second = annotate(rng, kind, truth_first), annotate(rng, kind, truth_second)
        if first == second or score_first == score_second:  # a tie carries no preference
            continue
        if score_first < score_second:
            first, second, score_first, score_second = second, first, score_second, score_first
            truth_first, truth_second = truth_second, truth_first
        rows.append({"prompt": prompt, "chosen": _chat(prompt, first), "rejected": _chat(prompt, second),
                     "score_chosen": score_first, "score_rejected": score_second, "kind": kind,
                     "truth_chosen": truth_first, "truth_rejected": truth_second})
    return Dataset.from_list(rows)
