"""Splitting data by prompt into ``train`` / ``validation`` / ``test``.

A prompt's split is a pure function of its text (a SHA-256 hash), so every stage, every seed and
every process agrees on it without coordination: SFT and the reward model train on ``train``
prompts, settings are tuned on ``validation`` prompts and reports use ``test`` prompts, and no
prompt (hence no pair) is in two splits.
"""
import hashlib
import json

SPLITS = ("train", "validation", "test")
HELD_OUT_SHARE = 0.1  # share of prompts in validation, and again in test


def check_split(split: str) -> None:
    """ValueError unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def prompt_split(prompt) -> str:
    """The split of ``prompt`` (a string, or chat messages): validation and test get HELD_OUT_SHARE each."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    position = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64
    if position < HELD_OUT_SHARE:
        return "validation"
    return "test" if position < 2 * HELD_OUT_SHARE else "train"
